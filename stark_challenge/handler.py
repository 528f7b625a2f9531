"""Handler: one complete HTTP request, parsed by ``http.server`` and answered with the Gate's Reply.

The server's pool threads build a ``Handler`` over the bytes of a request the
selector thread received whole (``server``); it parses them with
``BaseHTTPRequestHandler``, asks ``gate.Gate.answer`` what to answer, and writes
the answer in one write (``render`` writes the answers the selector thread sends
itself). No decision is made here: routes, checks and statuses are
the Gate's. An unexpected error is a 500 whose traceback is logged at most once a
minute.
"""

import io
import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

__all__ = ["Handler", "render"]

# The HTTP transport's logger: its lines (send_error, unexpected errors) are the server's, as before the split.
logger = logging.getLogger("stark_challenge.server")


def render(status, body, headers=(), close=False):
    """Return a whole JSON answer as bytes: status line, headers, body."""
    payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    status = HTTPStatus(status)
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: stark_challenge",
             "Content-Type: application/json", f"Content-Length: {len(payload)}", "Cache-Control: no-store"]
    lines += [f"{name}: {value}" for name, value in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class Handler(BaseHTTPRequestHandler):
    """Answers one complete request with the Reply of ``server.gate``.

    Built by a pool thread with the request's bytes: ``rfile`` reads them, ``wfile``
    collects the answer, and ``finish`` sends it in one write (on a keep-alive
    connection, headers and body written apart wait for the client's delayed ACK, up
    to 40 ms a request). Leaves ``close_connection`` saying whether the
    connection may carry another request.

    The ``BaseHTTPRequestHandler`` internals overridden, and why: ``setup``/``finish``
    (buffers instead of the socket's files), ``handle`` (one request, not a loop: the
    selector thread brings the next), ``handle_expect_100`` (the selector thread
    already sent "100 Continue"), ``send_error`` (JSON, throttled log, close),
    ``version_string`` (no Python version), ``log_message`` (DEBUG only). Routing and
    every check are the Gate's: this class only parses and writes.
    """

    # The Server header says what answers, not which Python does (http.server adds it).
    server_version = "stark_challenge"
    sys_version = ""
    # HTTP/1.1 keeps connections open for Stark Bank's (and the benchmark's) next request.
    protocol_version = "HTTP/1.1"

    def __init__(self, connection, data, server):
        self._data = data
        super().__init__(connection, server.peer_of(connection), server)

    def version_string(self):
        return self.server_version

    def setup(self):
        self.connection = self.request
        self.rfile = io.BytesIO(self._data)
        self.wfile = io.BytesIO()

    def handle(self):
        self.close_connection = True
        self.handle_one_request()

    def finish(self):
        answer = self.wfile.getvalue()
        if answer:
            try:
                self.connection.sendall(answer)
            except OSError:
                self.close_connection = True

    def handle_expect_100(self):
        # The selector thread sent "100 Continue" when the head arrived: the body is here.
        return True

    def _reply(self, status, body, headers=(), close=False):
        if isinstance(body, str):  # text (the metrics), its Content-Type among the Reply's headers
            payload = body.encode("utf-8")
        else:
            payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
            headers = (("Content-Type", "application/json"), *headers)
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _answer(self):
        try:
            body = self.rfile.read() if self.headers.get("Content-Length") is not None else None
            reply = self.server.gate.answer(self.command, self.path, self.headers, body, self.client_address[0])
            self._reply(reply.status, reply.body, reply.headers)
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
        self._headers_buffer = []
        self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, close=True)

    def send_error(self, code, message=None, explain=None):
        # http.server's own checks (request line, headers) answer JSON too, with a
        # status line, and close: what follows an unparsable request cannot be trusted.
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.server.gate.refusals.log(logger, logging.WARNING, "request refused (%d): %s from %s",
                                 code, message or HTTPStatus(code).phrase, self.client_address[0], kind="send_error")
        self._reply(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def log_message(self, format, *args):
        # Access lines are noise next to the service's own log lines; keep them for DEBUG
        # (and format them only then: this runs for every answer).
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.client_address[0], format % args)
