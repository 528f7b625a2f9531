"""Logs: set up ``logging`` for a person (text), for machines (JSON lines) or for journald (native).

``setup(level, fmt)`` installs one handler on the root logger, writing to stderr:

- ``text``: ``2026-11-28 14:00:00 INFO    round 0 issued: 9 invoices, total R$ 3,120.00``, for a
  person: the message after the time and level, the logger's name only on warnings and errors;
- ``json``: ``{"time": "...", "level": "INFO", "logger": "stark_challenge.invoicer", "message": "..."}``
  one object a line, with ``exception`` when there is a traceback, and the record's
  fields (below) as keys of their own;
- ``journal``: one entry per record sent to journald's socket in its native protocol:
  ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and the record's fields in capitals
  (``INVOICE_ID=...``), so ``journalctl -p err`` and ``journalctl INVOICE_ID=...`` work.
  If the socket cannot take an entry, the line goes to stderr as below.

Started by systemd with stderr connected to the journal (``JOURNAL_STREAM`` names
stderr's device and inode), every line written to stderr starts with its syslog
priority, ``<3>`` for ERROR, ``<4>`` WARNING, ``<6>`` INFO, ``<7>`` DEBUG, which journald
reads (the unit's ``SyslogLevelPrefix=yes``) and strips, and text lines leave out the
timestamp journald adds. So do lines to any stderr that is not a terminal while
``JOURNAL_STREAM`` is set at all (``priority_prefixes``): a service whose stderr a wrapper
redirected still runs under systemd, and its errors must not lose their priority.

Fields: ids and amounts a line is about, given by the caller as
``logger.info("...", ..., extra=logs.fields(invoice_id=..., amount_cents=...))``.

Times are UTC. Messages never carry secrets: the modules log ids, amounts and masked
tax ids only, and ``redact`` is applied to every line (tracebacks included) as a last
guard against a PEM key, an Authorization header, a URL's password or a full CPF/CNPJ
slipping into an exception message.

``Throttle`` keeps a flood of refused requests from becoming a flood of lines: the
first of each kind is logged, then at most one a second, with the count held back.

This module formats and writes; it opens no file and starts no thread (the journal
handler holds one datagram socket).
"""

import datetime
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time

from .taxid import mask_tax_id

__all__ = ["setup", "redact", "fields", "priority", "under_journald", "priority_prefixes", "TextFormatter", "JsonFormatter",
           "JournalHandler", "Throttle", "JOURNAL_SOCKET"]

# Where journald takes entries in its native protocol (systemd's sd_journal_send uses it).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Python's levels to syslog priorities (RFC 5424 severities), highest first.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# (pattern, replacement, a lowercase word every match contains): the word is looked for
# first, so the patterns run only on the rare lines that may hold a secret.
_SECRETS = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
     "[private key redacted]", "private key"),
    # "Authorization: Basic x", and the dict repr "'Authorization': 'Basic x'" of a headers object.
    (re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*['"]?\s*(?:(?:basic|bearer|digest)\s+)?"""
                r"""|authorization\s+(?:basic|bearer|digest)\s+)[^\s'",}]+"""),
     r"\1[redacted]", "authorization"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@"), r"\1[redacted]@", "@"),
)
# A CPF (11 digits) or CNPJ (14), formatted or bare, standing on its own: a whole run
# of digits, dots, slashes and dashes begins with it, and no digit follows it, right
# after or past one separator (so a 16-digit Stark Bank id is not one). Tried in this
# order, on runs of 11 characters or more (the shortest form's length).
_NUMBER_RUN = re.compile(r"[\d./-]{11,}")
_TAX_ID_FORMS = tuple(re.compile(form) for form in (
    r"\d{3}\.\d{3}\.\d{3}-\d{2}", r"\d{2}\.\d{3}\.\d{3}/\d{4}-\d{2}", r"\d{11}", r"\d{14}"))


def redact(text):
    """Return ``text`` with private keys, Authorization values, URL passwords and tax ids hidden.

    Tax ids are masked as ``taxid.mask_tax_id`` does (``***.456.789-**``), so a line
    still tells two payers apart. Runs on every log line: cheap checks first.
    """
    lowered = text.lower()
    for pattern, replacement, word in _SECRETS:
        if word in lowered:
            text = pattern.sub(replacement, text)
    return _NUMBER_RUN.sub(_mask_run, text)


def _mask_run(match):
    """Return a run of digits and separators with the tax id it begins with masked (see _TAX_ID_FORMS)."""
    run = match.group(0)
    for form in _TAX_ID_FORMS:
        found = form.match(run)
        if found is None:
            continue
        rest = run[found.end():]
        if not rest or (rest[0] in "./-" and not rest[1:2].isdigit()):
            return mask_tax_id(found.group(0)) + rest
    return run


def fields(**values):
    """Return logging's ``extra=`` carrying ``values`` (ids, amounts in cents) as the record's fields.

    Names are lowercase words (``invoice_id``, ``amount_cents``): the JSON format writes
    them as keys, the journal format as ``INVOICE_ID=``. Raise ValueError on another name.
    """
    for name in values:
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"log field names are lowercase words: {name!r}")
    return {"fields": values}


def priority(levelno):
    """Return the syslog priority (0-7) of a ``logging`` level: ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return 7


def under_journald(stream=None, environ=None):
    """Return True if ``stream`` (stderr) is the journal stream systemd connected (``JOURNAL_STREAM``).

    systemd sets JOURNAL_STREAM to ``device:inode`` of the stream it connected; a
    child whose stderr was redirected elsewhere keeps the variable but not the inode.
    """
    environ = os.environ if environ is None else environ
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        found = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (found.st_dev, found.st_ino) == (device, inode)


def priority_prefixes(stream=None, environ=None):
    """Return True if lines written to ``stream`` (stderr) start with their priority (``<3>``...).

    True under journald (``under_journald``), and whenever systemd's ``JOURNAL_STREAM`` is
    set and ``stream`` is not a terminal: a service whose stderr was redirected (a wrapper
    script, a copy to a file) is still a service, and whatever reads its lines honours the
    prefix. A person at a terminal never sees one.
    """
    environ = os.environ if environ is None else environ
    if under_journald(stream, environ):
        return True
    try:
        return bool(environ.get("JOURNAL_STREAM")) and not (stream or sys.stderr).isatty()
    except (ValueError, AttributeError):
        return False


def _utc(record):
    return datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)


class TextFormatter(logging.Formatter):
    """One readable line per record: time (UTC), level, message; warnings and errors name the short logger.

    With ``journald``: ``<priority>short name: message``, every line of a traceback
    prefixed too; journald has the time and reads the level from the prefix.
    """

    def __init__(self, journald=False):
        super().__init__()
        self._journald = journald

    def format(self, record):
        name = record.name.rsplit(".", 1)[-1]
        if self._journald:
            line = f"{name}: {record.getMessage()}"
        else:
            where = f"{name}: " if record.levelno >= logging.WARNING else ""
            line = f"{_utc(record):%Y-%m-%d %H:%M:%S} {record.levelname:<7} {where}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        line = redact(line)
        if self._journald:
            prefix = f"<{priority(record.levelno)}>"
            line = "\n".join(prefix + part for part in line.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception), then the record's fields.

    With ``journald``, the line starts with ``<priority>`` (see the module docstring).
    """

    def __init__(self, journald=False):
        super().__init__()
        self._journald = journald

    def format(self, record):
        entry = {
            "time": _utc(record).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        for name, value in getattr(record, "fields", {}).items():
            entry.setdefault(name, redact(value) if isinstance(value, str) else value)
        line = json.dumps(entry, ensure_ascii=False)
        return f"<{priority(record.levelno)}>{line}" if self._journald else line


class JournalHandler(logging.Handler):
    """Send each record to journald's native socket: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, LOGGER, fields.

    The message is redacted as every line is; a traceback goes in the same MESSAGE.
    If the socket is missing or refuses the datagram (too large), the record is
    written to ``stream`` as a prefixed text line instead, so nothing is lost.
    Thread-safe (logging's handler lock, one datagram per record).
    """

    def __init__(self, stream=None, socket_path=JOURNAL_SOCKET, identifier="stark-challenge"):
        super().__init__()
        self._stream = stream or sys.stderr
        self._path = socket_path
        self._identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._text = TextFormatter(journald=True)

    def entry(self, record):
        """Return the native-protocol datagram (bytes) of ``record``."""
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        pairs = [("MESSAGE", redact(message)), ("PRIORITY", str(priority(record.levelno))),
                 ("SYSLOG_IDENTIFIER", self._identifier), ("LOGGER", record.name)]
        for name, value in getattr(record, "fields", {}).items():
            pairs.append((name.upper(), redact(str(value))))
        return b"".join(_journal_field(name, value) for name, value in pairs)

    def emit(self, record):
        try:
            datagram = self.entry(record)
            try:
                self._socket.sendto(datagram, self._path)
            except OSError:
                self._stream.write(self._text.format(record) + "\n")
                self._stream.flush()
        except Exception:  # logging's contract: a failing handler reports, never raises
            self.handleError(record)

    def close(self):
        self._socket.close()
        super().close()


def _journal_field(name, value):
    """Return one field in journald's native protocol: NAME=value, or length-prefixed if it has a newline."""
    data = value.encode("utf-8", errors="replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


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


def setup(level="INFO", fmt="text", stream=None, journald=None, journal_socket=JOURNAL_SOCKET):
    """Send every log record at ``level`` and above to ``stream`` (stderr), as ``fmt`` ('text', 'json' or
    'journal': to ``journal_socket``). ``journald`` (default: ``priority_prefixes(stream)``) prefixes
    each line with its priority. Return the handler."""
    # Neither format shows the caller's file and line, thread or process: skip collecting
    # them for every record (the logging HOWTO's "Optimization"; a third of a line's CPU).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = stream or sys.stderr
    journald = priority_prefixes(stream) if journald is None else journald
    if fmt == "journal":
        handler = JournalHandler(stream, journal_socket)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter(journald) if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, JournalHandler):
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # The SDK's HTTP stack logs every connection at DEBUG; keep it to warnings.
    for noisy in ("urllib3", "requests"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
