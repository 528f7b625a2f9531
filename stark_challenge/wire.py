"""Wire: HTTP/1.1 as bytes: a request head read within its limits, a request framed, an answer written.

Everything here is about bytes and framing, nothing about what a request may do or
what it gets (that is ``gate``'s). ``server`` finds a head's end (``head_end``), reads it
once (``read_head``: its framing, request line and fields, or why it is refused), builds
the ``Request`` when the body is whole (``request``: the one place that says whether a
request has a body), writes an answer in one piece (``render``: status line, headers,
``Date`` from ``HttpDate``, body), and sends it on a non-blocking socket (``send_all``).
``keeps_alive`` says whether a connection may carry another request.

The rules are those of ``http.server`` where a client could tell the difference (bare LF
line ends accepted, a ``//`` path read as ``/``, HTTP/1.0 closing unless asked to keep
alive, ``100 Continue`` for an ``Expect``), and stricter where leniency lets two parsers
disagree (request smuggling): see ``read_head``. Pure functions and immutable values,
except ``HttpDate``'s cache: thread-safe.
"""

import email.utils
import json
import logging
import re
import select
import time
from http import HTTPStatus
from typing import NamedTuple

__all__ = ["Framing", "Head", "Headers", "HttpDate", "Request", "CONTINUE", "MAX_BODY_BYTES", "MAX_HEAD_BYTES",
           "MAX_HEADER_LINES", "answer", "head_end", "keeps_alive", "log_access", "read_head", "render", "request",
           "send_all"]

# The access lines are the HTTP transport's: logged under the server's name.
logger = logging.getLogger("stark_challenge.server")

# Stark Bank's events are a few KiB; anything larger is not one of them.
MAX_BODY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; Stark Bank's are well under 2 KiB
MAX_HEADER_LINES = 64  # header lines in one request; Stark Bank sends about ten
# The interim answer to a client that waits for leave to send its body (RFC 9110, 10.1.1).
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class Framing(NamedTuple):
    """What the head of a request says about its framing, or why it is refused."""

    error: HTTPStatus = None  # None if the request may be read; else the status to refuse it with
    reason: str = ""  # one line for the client and the log when refused
    body_bytes: int = 0  # length of the body that follows the head
    expect_continue: bool = False  # the client waits for "100 Continue" before sending the body


class Headers:
    """A request's header fields, read once by ``read_head``: ``get(name)`` in any case of ``name``.

    The part of ``http.client.HTTPMessage`` a request needs: ``get`` and ``[]`` give the
    value of the first field of that name, or None; ``in``, ``len`` and ``items()``
    (every field, in order, names as sent). Values are decoded as Latin-1, as
    ``http.client`` decodes them, and stripped of the spaces and tabs around them
    (RFC 9110, 5.5). Read-only; thread-safe.
    """

    __slots__ = ("_fields", "_first")

    def __init__(self, fields=()):
        self._fields = tuple(fields)  # (name, value) pairs, as sent
        self._first = {}  # lower-case name -> the value of its first field
        for name, value in self._fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name, default=None):
        """Return the value of the first field named ``name`` (any case), or ``default``."""
        return self._first.get(name.lower(), default)

    def __getitem__(self, name):
        return self._first.get(name.lower())  # None when absent, as email.message.Message answers

    def __contains__(self, name):
        return name.lower() in self._first

    def __len__(self):
        return len(self._fields)

    def items(self):
        """Return every (name, value) field, in the order sent."""
        return list(self._fields)


class Head(NamedTuple):
    """A request head read by ``read_head``: its framing and, when not refused, its request line and fields."""

    framing: Framing  # framing.error is None if the request may be read
    method: str = ""  # the request line's first word, as sent (a token)
    target: str = ""  # its second word: the path and query, Latin-1 decoded
    version: str = ""  # "HTTP/1.0" or "HTTP/1.1"
    headers: Headers = Headers()  # the header fields; empty when refused


class Request(NamedTuple):
    """A complete request, as ``gate.Gate.admit`` decides it (built by ``request``)."""

    method: str  # as sent, e.g. "POST"
    path: str  # the target: path and query ("//x" read as "/x")
    headers: Headers  # or any mapping with ``get`` (tests pass dicts)
    body: bytes = None  # None when the request has no body (no Content-Length)
    client: str = "?"  # the client's address, for the log


def _refused(status, reason):
    return Head(Framing(status, reason))


def read_head(head):
    """Return the Head of a request head (bytes, without its closing blank line): framing, request line, fields.

    Every line is read once, here, so a request that passes needs no other parser.
    Strict where leniency lets two parsers disagree (request smuggling): the request
    line is ``METHOD target HTTP/1.x``; every header line is ``name: value`` (no folding,
    no space before the colon); ``Content-Length`` is ASCII digits, and its copies, if
    any, agree, and at most ``MAX_BODY_BYTES`` (413 otherwise); ``Transfer-Encoding`` is
    refused whatever its value (Stark Bank sends a Content-Length); at most
    ``MAX_HEADER_LINES`` lines (431). A refused head gives its Framing only. Pure.
    """
    lines = head.split(b"\n")
    if len(lines) - 1 > MAX_HEADER_LINES:
        return _refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADER_LINES} header lines")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or not _VERSION.fullmatch(parts[2]):
        return _refused(HTTPStatus.BAD_REQUEST, "malformed request line")
    lengths, expect_continue, fields = set(), False, []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return _refused(HTTPStatus.BAD_REQUEST, "malformed header line")
        value = value.strip(b" \t")
        fields.append((name.decode("ascii"), value.decode("latin-1")))  # a token is ASCII
        name = name.lower()
        if name == b"transfer-encoding":
            return _refused(HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted; send a Content-Length")
        if name == b"content-length":
            if not _DIGITS.fullmatch(value):
                return _refused(HTTPStatus.BAD_REQUEST, "Content-Length must be ASCII digits")
            lengths.add(value.lstrip(b"0") or b"0")
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
    if len(lengths) > 1:
        return _refused(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
    length = lengths.pop() if lengths else b"0"
    # Digits are counted before int(): a length of thousands of digits is refused unparsed.
    if len(length) > 9 or int(length) > MAX_BODY_BYTES:
        return _refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    version = parts[2].decode("ascii")
    framing = Framing(body_bytes=int(length), expect_continue=expect_continue and version == "HTTP/1.1")
    return Head(framing, parts[0].decode("ascii"), parts[1].decode("latin-1"), version, Headers(fields))


def head_end(buffer):
    """Return (end of the head, start of the body) in ``buffer``, or None while the head is incomplete."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return None


def request(head, body, client):
    """Return the Request of an accepted ``head`` (Head) whose body (bytes) has arrived whole.

    A request has a body when it says its length (``Content-Length``, even 0), and
    none otherwise (``body`` None), whatever the method. As ``http.server``, a target
    beginning with ``//`` is a path here, not a network path.
    """
    target = head.target
    if target.startswith("//"):
        target = "/" + target.lstrip("/")
    return Request(head.method, target, head.headers, body if "Content-Length" in head.headers else None, client)


def keeps_alive(head):
    """Return True if the connection of a request with this head (Head) may carry another.

    As ``http.server`` decides: HTTP/1.1 keeps the connection unless told to close,
    HTTP/1.0 closes it unless told to keep it.
    """
    connection = head.headers.get("Connection", "").lower()
    if connection == "close":
        return False
    if connection == "keep-alive":
        return True
    return head.version == "HTTP/1.1"


def render(status, body, headers=(), close=False, *, date, with_body=True):
    """Return a whole answer as bytes: status line, headers, body, in one piece for one write.

    ``body`` is JSON-able, or text (str) sent as it is, its Content-Type among
    ``headers``. ``date`` is the Date header's value (``HttpDate``); ``with_body``
    False leaves the body out (HEAD) and keeps its Content-Length; ``close`` adds
    ``Connection: close``. The Server header says what answers, not which Python does.
    """
    if isinstance(body, str):
        payload = body.encode("utf-8")
    else:
        payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        headers = (("Content-Type", "application/json"), *headers)
    status = HTTPStatus(status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: stark_challenge", f"Date: {date}",
             f"Content-Length: {len(payload)}", "Cache-Control: no-store"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + payload if with_body else head


def answer(head, status, body, headers=(), close=False, *, date):
    """Return (the bytes, whether the connection closes after them) of the answer to a request with this head.

    ``render``'s answer, closing if ``close`` or the request asks for it (``keeps_alive``),
    without a body for HEAD.
    """
    close = close or not keeps_alive(head)
    return render(status, body, headers, close, date=date, with_body=head.method != "HEAD"), close


def log_access(client, head, status):
    """Log one answer's access line, at DEBUG only (next to the service's own lines they are noise).

    ``head`` is the request's Head; nothing is formatted unless DEBUG is on.
    """
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug('%s "%s %s %s" %s -', client, head.method, head.target, head.version, HTTPStatus(status).value)


def send_all(sock, data, timeout_s, clock=time.monotonic):
    """Send ``data`` whole on a non-blocking socket, waiting at most ``timeout_s`` for room; return True if sent.

    Return False if the client has not taken it all in time; raise OSError if the
    connection failed. Either way the caller closes it. Waits only while the socket's
    buffer is full, that is while the client does not read.
    """
    view, deadline, poller = memoryview(data), None, None
    while view:
        try:
            view = view[sock.send(view):]
            continue
        except (BlockingIOError, InterruptedError):
            pass
        if deadline is None:
            deadline = clock() + timeout_s
            poller = select.poll()  # not select.select: a descriptor may be numbered past FD_SETSIZE
            poller.register(sock, select.POLLOUT)
        left = deadline - clock()
        if left <= 0:
            return False
        poller.poll(left * 1000)
    return True


class HttpDate:
    """The Date header's value (RFC 9110 IMF-fixdate), formatted once a second, not once an answer.

    Thread-safe: the cached (second, text) pair is replaced whole; two threads that
    both find it stale both format the same text.
    """

    def __init__(self, clock=time.time):
        self._clock = clock  # () -> seconds since the epoch
        self._cached = (None, "")  # (the whole second, its text)

    def __call__(self):
        second = int(self._clock())
        cached_second, text = self._cached
        if second != cached_second:
            text = email.utils.formatdate(second, usegmt=True)
            self._cached = (second, text)
        return text
