"""Handler: one complete HTTP request, dispatched by ``http.server`` and answered with the Gate's Reply.

The server's pool threads build a ``Handler`` over a request the selector thread
received whole (``server``): its head, read once by ``gate.read_head`` when it
arrived (``http.server``'s own parser, built on the ``email`` package, was the
dearest part of a request after the signature check), and its body. It sets what
``BaseHTTPRequestHandler`` would, asks ``gate.Gate.answer`` what to answer, and
writes the answer in one write on the non-blocking socket (``render`` builds every
answer, the selector thread's own refusals too; ``send_all`` waits for room only if
the client stops reading, and never past the request timeout). No decision is made here: routes, checks and statuses are
the Gate's. A database that is unavailable (StoreError from any route) is a 503, so
clients try again; an unexpected error is a 500 whose traceback is logged at most once
a minute.
"""

import email.utils
import io
import json
import logging
import select
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from .errors import StoreError

__all__ = ["Handler", "HttpDate", "keeps_alive", "log_access", "render", "send_all"]

# The HTTP transport's logger: its lines (send_error, unexpected errors) are the server's, as before the split.
logger = logging.getLogger("stark_challenge.server")


def render(status, body, headers=(), close=False, *, date, with_body=True):
    """Return a whole answer as bytes: status line, headers, body, in one piece for one write.

    ``body`` is JSON-able, or text (str) sent as it is, its Content-Type among
    ``headers``. ``date`` is the Date header's value (``HttpDate``); ``with_body``
    False leaves the body out (HEAD) and keeps its Content-Length. The Server header
    says what answers, not which Python does (http.server would add it).
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


def keeps_alive(head):
    """Return True if the connection of a request with this head (``gate.Head``) may carry another.

    As ``http.server`` decides: HTTP/1.1 keeps the connection unless told to close,
    HTTP/1.0 closes it unless told to keep it.
    """
    connection = head.headers.get("Connection", "").lower()
    if connection == "close":
        return False
    if connection == "keep-alive":
        return True
    return head.version == "HTTP/1.1"


def log_access(client, head, status):
    """Log one answer's access line, at DEBUG only (next to the service's own lines they are noise).

    ``head`` is the request's ``gate.Head``; nothing is formatted unless DEBUG is on.
    """
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug('%s "%s %s %s" %s -', client, head.method, head.target, head.version, HTTPStatus(status).value)


def send_all(sock, data, timeout_s, clock=time.monotonic):
    """Send ``data`` whole on a non-blocking socket, waiting at most ``timeout_s`` for room; return True if sent.

    Return False if the client has not taken it all in time; raise OSError if the
    connection failed. Either way the caller closes it. An answer fits the socket's
    buffer unless the client stops reading, so the first ``send`` nearly always takes
    it all and nothing waits.
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


class Handler(BaseHTTPRequestHandler):
    """Answers one complete request with the Reply of ``server.gate``.

    Built by a pool thread with the request's head, already read by
    ``gate.read_head`` on the selector thread, and its body: ``parse_request`` sets
    ``command``, ``path``, ``request_version``, ``headers`` (a ``gate.Headers``) and
    ``close_connection`` from it, as ``http.server`` would, without parsing the head
    again. ``rfile`` reads the body, ``wfile`` collects the answer (one ``render``),
    and ``finish`` sends it in one write on the non-blocking socket (on a keep-alive
    connection, headers and body written apart wait for the client's delayed ACK, up
    to 40 ms a request). Leaves ``close_connection`` saying whether the connection may
    carry another request.

    The ``BaseHTTPRequestHandler`` internals overridden, and why: ``setup``/``finish``
    (buffers instead of the socket's files), ``handle`` (one request, not a loop: the
    selector thread brings the next), ``parse_request`` (the head is read already),
    ``send_error`` (JSON, throttled log, close), ``date_time_string`` (formatted once a
    second), ``log_message`` (DEBUG only); ``render`` writes the status line and headers
    that ``send_response`` would.
    Routing and every check are the Gate's: this class only parses and writes.
    """

    # HTTP/1.1 keeps connections open for Stark Bank's (and the benchmark's) next request.
    protocol_version = "HTTP/1.1"

    def __init__(self, connection, head, body, server, signed=False):
        self._head = head  # gate.Head, its framing accepted
        self._body = body  # bytes: the body, whole
        self._signed = signed  # Gate.screen passed it, signature included: the Gate only stores its event
        super().__init__(connection, server.peer_of(connection), server)

    def date_time_string(self, timestamp=None):
        return self.server.http_date() if timestamp is None else super().date_time_string(timestamp)

    def setup(self):
        self.connection = self.request
        self.rfile = io.BytesIO(self._body)
        self.wfile = io.BytesIO()

    def handle(self):
        # handle_one_request without its reading: one request, dispatched as http.server does.
        self.close_connection = True
        self.parse_request()  # True: the head was checked when it arrived
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        method()

    def parse_request(self):
        """Set the request's attributes from its head, as ``http.server`` does; return True.

        Nothing is left to refuse here: ``gate.read_head`` refused every malformed head
        before the request was read whole.
        """
        head = self._head
        self.command, self.path, self.request_version = head.method, head.target, head.version
        self.requestline = f"{head.method} {head.target} {head.version}"
        self.headers = head.headers
        if self.path.startswith("//"):  # as http.server: "//host/x" is no network path here (gh-87389)
            self.path = "/" + self.path.lstrip("/")
        self.close_connection = not keeps_alive(head)
        return True

    def finish(self):
        try:
            if send_all(self.connection, self.wfile.getvalue(), self.server.request_timeout_s):
                return
        except OSError:  # the client is gone: nothing to tell it, nor the log
            self.close_connection = True
            return
        self.close_connection = True
        self.server.gate.refusals.log(logger, logging.WARNING,
                                          "answer to %s not read within %g s; connection closed",
                                          self.client_address[0], self.server.request_timeout_s,
                                          kind="unread answer")

    def _reply(self, status, body, headers=(), close=False):
        if close:
            self.close_connection = True
        answer = render(status, body, headers, close, date=self.date_time_string(), with_body=self.command != "HEAD")
        log_access(self.client_address[0], self._head, status)
        self.wfile.write(answer)

    def _answer(self):
        try:
            body = self.rfile.read() if self.headers.get("Content-Length") is not None else None
            reply = self.server.gate.answer(self.command, self.path, self.headers, body, self.client_address[0],
                                            signed=self._signed)
            self._reply(reply.status, reply.body, reply.headers, close=self.close_connection)  # say so if closing
        except StoreError as e:  # the database is away (a server restarting, say): try again later, not a bug
            self.server.gate.refusals.log(logger, logging.WARNING, "%s %s: the database is unavailable (%s); "
                                          "answering 503", self.command, self.path.split("?", 1)[0][:64], e,
                                          kind="store unavailable")
            self.wfile = io.BytesIO()  # whatever was half-written is dropped
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the database is unavailable; try again later"},
                        close=True)
        except Exception:
            self._unexpected()

    # Every method a route may name, and the usual others (404/405 from the Gate); any
    # other method is http.server's 501.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def _unexpected(self):
        # A bug, not the client's doing: the traceback once a minute, a throttled line otherwise.
        path = self.path.split("?", 1)[0][:64]
        if not self.server.tracebacks.log(logger, logging.ERROR, "%s %s failed; answering 500",
                                          self.command, path, exc_info=True, kind="traceback"):
            self.server.gate.refusals.log(logger, logging.ERROR,
                                     "%s %s failed; answering 500 (traceback logged at most once a minute)",
                                     self.command, path)
        self.wfile = io.BytesIO()  # whatever was half-written is dropped
        self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, close=True)

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusal (a method it has no do_ for) answers JSON too, and
        # closes: what follows a request it could not handle cannot be trusted.
        self.close_connection = True
        self.server.gate.refusals.log(logger, logging.WARNING, "request refused (%d): %s from %s",
                                 code, message or HTTPStatus(code).phrase, self.client_address[0], kind="send_error")
        self._reply(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def log_message(self, format, *args):
        # Access lines are noise next to the service's own log lines; keep them for DEBUG
        # (and format them only then: this runs for every answer).
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.client_address[0], format % args)
