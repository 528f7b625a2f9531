"""List queries: the filters the SDK sends, checked as Stark Bank checks them, and paging.

`select(rows, query, kind)` takes a kind's rows (oldest first, with their sequence
numbers) and the decoded query string, and returns one page, newest first: up to `limit`
(1..100, default 100) rows matching every filter present, and the opaque cursor of the
next page (None on the last). Filters: ids, status, tags (any of them, without regard to
case), types, transactionIds, taxId (by its digits), isDelivered, after/before (on the
creation date), and the parent ids of logs (invoiceIds, transferIds) and attempts
(eventIds, webhookIds). A status or log type the API does not know is refused (400),
not silently matched to nothing. Raise `validate.Rejected` for a bad filter. Pure.
"""

import datetime

from . import taxid
from .validate import Rejected

__all__ = ["select", "MAX_PAGE"]

# The SDK never asks for more; Stark Bank refuses larger pages.
MAX_PAGE = 100

_STATUSES = {
    "invoice": ("created", "registered", "paid", "overdue", "expired", "canceled", "voided", "reversed"),
    "transfer": ("created", "processing", "success", "failed", "canceled"),
}
_TYPES = {
    "invoice-log": ("created", "registered", "updated", "paid", "credited", "overdue", "expired", "canceled",
                    "voided", "reversed"),
    "transfer-log": ("created", "processing", "success", "failed", "canceled"),
}
# The error code for an unknown log type, as the SDK's own tests against Stark Bank expect.
_TYPE_CODES = {"invoice-log": "invalidInvoiceLog", "transfer-log": "invalidTransferLog"}
# A filter on ids of another entity: query parameter -> the row's field (or its parent's).
_LINKS = {
    "invoice-log": ("invoiceIds", lambda row: row["invoice"]["id"]),
    "transfer-log": ("transferIds", lambda row: row["transfer"]["id"]),
}
_ATTEMPT_LINKS = (("eventIds", "eventId"), ("webhookIds", "webhookId"))


def _csv(query, name):
    """Return the comma-separated values of a query parameter, or None if absent."""
    if name not in query:
        return None
    return [value for value in query[name].split(",") if value]


def _date(query, name):
    if name not in query:
        return None
    try:
        return datetime.date.fromisoformat(query[name][:10])
    except ValueError:
        raise Rejected.one("invalid" + name[0].upper() + name[1:], "%s must be a date like 2024-01-31" % name) \
            from None


def _known(values, allowed, code, name):
    unknown = [value for value in values if value not in allowed]
    if unknown:
        raise Rejected.one(code, "unknown %s %s; known: %s" % (name, ", ".join(unknown), ", ".join(allowed)))


def _matcher(query, kind):
    """Return a predicate over rows for the filters present in query."""
    checks = []
    ids = _csv(query, "ids")
    if ids is not None:
        checks.append(lambda row: row["id"] in ids)
    status = _csv(query, "status")
    if status is not None:
        _known(status, _STATUSES.get(kind, ()), "invalidStatus", "status")
        checks.append(lambda row: row.get("status") in status)
    tags = _csv(query, "tags")
    if tags is not None:
        wanted = {tag.lower() for tag in tags}
        checks.append(lambda row: bool(wanted.intersection(row.get("tags") or ())))
    types = _csv(query, "types")
    if types is not None:
        _known(types, _TYPES.get(kind, ()), _TYPE_CODES.get(kind, "invalidTypes"), "type")
        checks.append(lambda row: row.get("type") in types)
    transaction_ids = _csv(query, "transactionIds")
    if transaction_ids is not None:
        checks.append(lambda row: bool(set(transaction_ids).intersection(row.get("transactionIds") or ())))
    if "taxId" in query:
        digits = taxid.digits_of(query["taxId"])
        checks.append(lambda row: taxid.digits_of(row.get("taxId", "")) == digits)
    links = [_LINKS[kind]] if kind in _LINKS else []
    if kind == "event-attempt":
        links = [(name, lambda row, field=field: row[field]) for name, field in _ATTEMPT_LINKS]
    for name, parent_of in links:
        parent_ids = _csv(query, name)
        if parent_ids is not None:
            checks.append(lambda row, parent_of=parent_of, wanted=parent_ids: parent_of(row) in wanted)
    if "isDelivered" in query:
        flag = query["isDelivered"].lower()
        if flag not in ("true", "false"):
            raise Rejected.one("invalidIsDelivered", "isDelivered must be true or false")
        checks.append(lambda row: row.get("isDelivered") == (flag == "true"))
    after, before = _date(query, "after"), _date(query, "before")
    if after is not None:
        checks.append(lambda row: datetime.date.fromisoformat(row["created"][:10]) >= after)
    if before is not None:
        checks.append(lambda row: datetime.date.fromisoformat(row["created"][:10]) <= before)
    return lambda row: all(check(row) for check in checks)


def select(rows, query, kind):
    """Return (page of rows newest first, next cursor or None); raise Rejected for a bad filter."""
    matches = _matcher(query, kind)
    limit = query.get("limit", str(MAX_PAGE))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
        raise Rejected.one("invalidLimit", "limit must be an integer from 1 to %d" % MAX_PAGE)
    cursor = query.get("cursor") or None
    if cursor is not None and not cursor.isdigit():
        raise Rejected.one("invalidCursor", "cursor %r was not issued by this server" % cursor)
    found = [(sequence, row) for sequence, row in reversed(rows)
             if (cursor is None or sequence < int(cursor)) and matches(row)]
    page = found[:int(limit)]
    next_cursor = str(page[-1][0]) if len(found) > len(page) else None
    return [row for _, row in page], next_cursor
