"""Logs: set up ``logging`` for a person (text) or for journald and machines (JSON lines).

``setup(level, fmt)`` installs one handler on the root logger, writing to stderr:

- ``text``: ``2026-11-28 14:00:00 INFO  invoicer: round 0 issued: 9 invoices, total R$ 3,120.00``
- ``json``: ``{"time": "...", "level": "INFO", "logger": "stark_challenge.invoicer", "message": "..."}``
  one object a line, with ``exception`` when there is a traceback.

Times are UTC. Messages never carry secrets: the modules log ids, amounts and masked
tax ids only, and ``redact`` is applied to every line (tracebacks included) as a last
guard against a PEM key, an Authorization header, a URL's password or a full CPF/CNPJ
slipping into an exception message.

``Throttle`` keeps a flood of refused requests from becoming a flood of lines: the
first of each kind is logged, then at most one a second, with the count held back.

This module only formats; it opens no file and starts no thread.
"""

import datetime
import json
import logging
import re
import sys
import threading
import time

from .taxid import mask_tax_id

__all__ = ["setup", "redact", "TextFormatter", "JsonFormatter", "Throttle"]

_SECRETS = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     "[private key redacted]"),
    # "Authorization: Basic x", and the dict repr "'Authorization': 'Basic x'" of a headers object.
    (re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*['"]?\s*(?:(?:basic|bearer|digest)\s+)?"""
                r"""|authorization\s+(?:basic|bearer|digest)\s+)[^\s'",}]+"""),
     r"\1[redacted]"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@"), r"\1[redacted]@"),
)
_URL_PASSWORD = _SECRETS[-1][0]
# A CPF (11 digits) or CNPJ (14), formatted or bare, standing on its own (not inside a
# longer number such as a 16-digit Stark Bank id). It opens with a bare \d (the first
# digit, then "not after [\d./-]" checked behind it) so that the regex engine skips
# straight to digits: redacting is most of the cost of a log line.
_TAX_ID = re.compile(
    r"\d(?<![\d./-]\d)(?:\d{2}\.\d{3}\.\d{3}-\d{2}|\d\.\d{3}\.\d{3}/\d{4}-\d{2}|\d{10}|\d{13})(?![\d./-]?\d)"
)


def redact(text):
    """Return ``text`` with private keys, Authorization values, URL passwords and tax ids hidden.

    Tax ids are masked as ``taxid.mask_tax_id`` does (``***.456.789-**``), so a line
    still tells two payers apart.
    """
    for pattern, replacement in _SECRETS:
        if pattern is not _URL_PASSWORD or "://" in text:  # a literal in it: skip the scan without one
            text = pattern.sub(replacement, text)
    return _TAX_ID.sub(lambda m: mask_tax_id(m.group(0)), text)


def _utc(record):
    return datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)


class TextFormatter(logging.Formatter):
    """One readable line per record: time (UTC), level, short logger name, message."""

    def format(self, record):
        name = record.name.rsplit(".", 1)[-1]
        line = f"{_utc(record):%Y-%m-%d %H:%M:%S} {record.levelname:<7} {name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record):
        entry = {
            "time": _utc(record).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class Throttle:
    """Logs a line of each kind at most once per ``interval_s``, and counts the lines held back.

    A kind is the message template (its %-format string) unless the caller names one.
    The first line of a kind goes out as is; later ones within ``interval_s`` of the
    last one logged are only counted, and the next line logged says how many were
    held back. Made for refusals:
    logging each one of a flood of forged requests costs more CPU than refusing it
    and would fill the disk for whoever sends them. ``clock`` is monotonic
    seconds. Thread-safe; the kinds are the call sites' literals, so the state is bounded.
    """

    def __init__(self, interval_s=1.0, clock=time.monotonic):
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds = {}  # message template -> [clock time the next line may go out, lines held back]

    def log(self, logger, level, msg, *args, kind=None, exc_info=False):
        """Log ``msg % args`` on ``logger`` unless this kind was logged less than ``interval_s`` ago.

        ``kind`` (default: ``msg``) must come from a small fixed set. ``exc_info`` adds
        the current traceback to a line that goes out. Return True if the line was
        logged, False if it was held back (and counted).
        """
        if not logger.isEnabledFor(level):
            return False
        kind = msg if kind is None else kind
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is not None and now < state[0]:
                state[1] += 1
                return False
            held = state[1] if state is not None else 0
            self._kinds[kind] = [now + self._interval_s, 0]
        if held:
            logger.log(level, msg + " (%d more like it held back since the last one logged)", *args, held,
                       exc_info=exc_info)
        else:
            logger.log(level, msg, *args, exc_info=exc_info)
        return True


def setup(level="INFO", fmt="text", stream=None):
    """Send every log record at ``level`` and above to ``stream`` (stderr), as ``fmt`` ('text' or 'json')."""
    # Neither format shows the caller's file and line, thread or process: skip collecting
    # them for every record (the logging HOWTO's "Optimization"; a third of a line's CPU).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK's HTTP stack logs every connection at DEBUG; keep it to warnings.
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
