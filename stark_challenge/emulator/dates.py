"""Stark Bank's calendar: dates are São Paulo dates, moments are aware UTC datetimes.

A transfer ``scheduled`` for a date runs from the start of that day in São Paulo; an
invoice ``due`` on a date is due until the end of that day there; a date "in the past"
is one before today's date in São Paulo. Brazil has had no daylight saving time since
2019, so São Paulo is UTC-3 all year. Pure functions, no state.
"""

import datetime
import re

__all__ = ["SAO_PAULO", "iso", "parse_datetime", "local_date", "start_of", "end_of"]

SAO_PAULO = datetime.timezone(datetime.timedelta(hours=-3), "America/Sao_Paulo")


def iso(moment):
    """Return moment (aware datetime) in the UTC ISO form the SDK parses."""
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def parse_datetime(text):
    """Return (value, is_date) for an ISO date or datetime string; raise ValueError otherwise.

    A datetime without an offset is taken as UTC; "Z" is accepted (fromisoformat on 3.10
    does not know it).
    """
    if not isinstance(text, str):
        raise ValueError("not a string")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return datetime.date.fromisoformat(text), True
    value = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value, False


def local_date(text_or_moment):
    """Return the São Paulo date of an aware datetime or of an ISO date/datetime string."""
    if isinstance(text_or_moment, str):
        value, is_date = parse_datetime(text_or_moment)
        if is_date:
            return value
        text_or_moment = value
    return text_or_moment.astimezone(SAO_PAULO).date()


def start_of(text):
    """Return the moment an ISO date (its São Paulo midnight) or datetime string stands for."""
    value, is_date = parse_datetime(text)
    if is_date:
        return datetime.datetime.combine(value, datetime.time(), SAO_PAULO).astimezone(datetime.timezone.utc)
    return value


def end_of(text):
    """Return the moment an ISO date (the end of its day in São Paulo) or datetime string ends."""
    value, is_date = parse_datetime(text)
    if is_date:
        return start_of((value + datetime.timedelta(days=1)).isoformat())
    return value
