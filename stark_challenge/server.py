"""Server: the HTTP front door, a bounded ``ThreadingHTTPServer`` with a thin handler.

Routes (a request ``X /path`` is handled by ``do_X``, as in ``http.server``):

- ``POST /webhook``: Stark Bank's events, decided by ``webhook.Intake``;
- ``GET /health``: liveness and the state of the scheduler, worker and store;
- ``GET /status``: the money summary (behind the webhook's basic auth).

Any other path is 404, another method on a known path 405. Every answer is JSON.

Bounds: at most ``max_connections`` connections are served at once, one thread
each; a connection that finds no free slot within ``QUEUE_WAIT_S`` gets 503 and is
closed, so a flood cannot grow threads or memory without limit. A client that
stalls (mid-request, or idle between keep-alive requests) is cut off after the
server's ``request_timeout_s`` (``REQUEST_TIMEOUT``). Bodies over 64 KiB are refused
from their Content-Length, unread. Refusals are logged through a ``logs.Throttle``
(the first of each kind, then at most one a second with a count), so a flood of
them costs neither a line each nor the CPU to write it.

``serve()`` starts it in a thread and returns the server; ``server.stop()`` stops
accepting, waits for in-flight requests, and closes the socket.
"""

import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import __version__
from .logs import Throttle
from .webhook import MAX_BODY_BYTES

__all__ = ["Server", "Handler", "serve"]

logger = logging.getLogger(__name__)

QUEUE_WAIT_S = 0.5  # how long a new connection may wait for a free slot before 503
REQUEST_TIMEOUT_S = 10.0  # default socket timeout: a client silent this long is cut off (slowloris)
ROUTES = {"/webhook": ("POST",), "/health": ("GET", "HEAD"), "/status": ("GET", "HEAD")}


class Handler(BaseHTTPRequestHandler):
    """Dispatches to the server's collaborators (``server.intake``, ``server.health``, ``server.report``)."""

    server_version = f"stark_challenge/{__version__}"
    # HTTP/1.1 keeps connections open for Stark Bank's (and the benchmark's) next request.
    protocol_version = "HTTP/1.1"
    # Seconds a client may stall before its connection is dropped (slowloris).
    timeout = REQUEST_TIMEOUT_S
    # A reply goes out in one write (status line, headers and body buffered until
    # ``handle_one_request`` flushes), and without Nagle's algorithm: on a keep-alive
    # connection, headers and body written apart wait for the client's delayed ACK,
    # up to 40 ms a request (issue #6).
    wbufsize = -1
    disable_nagle_algorithm = True

    def handle_one_request(self):
        try:
            super().handle_one_request()
        finally:
            # Between requests a keep-alive connection is idle: stop() may close it.
            if self.server.mark_idle(self.connection):
                self.close_connection = True

    def setup(self):
        self.timeout = self.server.request_timeout_s  # the per-server value wins over the class default
        super().setup()

    def parse_request(self):
        self.server.mark_busy(self.connection)
        return super().parse_request()

    def handle_expect_100(self):
        # The interim "100 Continue" must leave now, not with the final answer: the
        # client waits for it before sending the body (wfile is buffered, see wbufsize).
        ok = super().handle_expect_100()
        self.wfile.flush()
        return ok

    def _reply(self, status, body, headers=(), close=False):
        payload = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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

    def _route(self):
        """Return True if the path exists and allows the method; otherwise answer 404/405 and return False."""
        path = self.path.split("?", 1)[0]
        allowed = ROUTES.get(path)
        if allowed is None:
            self._discard_body()
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return False
        if self.command not in allowed:
            self._discard_body()
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"},
                        (("Allow", ", ".join(allowed)),))
            return False
        return True

    def _discard_body(self):
        # A body we do not want must still leave the stream before the next request
        # on this connection; an unknown or large one just ends the connection.
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        elif length or self.headers.get("Transfer-Encoding"):
            self.close_connection = True

    def _read_body(self):
        """Return the body as bytes, or None after answering 411/413/400."""
        if self.headers.get("Transfer-Encoding"):
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "chunked bodies are not accepted"}, close=True)
            return None
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"}, close=True)
            return None
        if int(length) > MAX_BODY_BYTES:
            self.server.refusals.log(logger, logging.WARNING, "webhook refused: body of %s bytes is over the %d limit",
                                     length, MAX_BODY_BYTES)
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        {"error": f"body over {MAX_BODY_BYTES} bytes"}, close=True)
            return None
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            self.close_connection = True
            return None
        return body

    def do_POST(self):
        try:
            if not self._route():
                return
            denied = self.server.intake.authorize(self.headers)
            if denied is not None:
                self.server.refusals.log(logger, logging.WARNING, "webhook refused: bad or missing basic auth from %s",
                                         self.client_address[0])
                self._discard_body()
                self._reply(denied.status, denied.body, denied.headers)
                return
            body = self._read_body()
            if body is None:
                return
            reply = self.server.intake.receive(self.headers, body)
            self._reply(reply.status, reply.body, reply.headers)
        except (socket.timeout, ConnectionError):
            self.close_connection = True
        except Exception:
            logger.exception("POST %s failed", self.path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, close=True)

    def do_GET(self):
        try:
            if not self._route():
                return
            path = self.path.split("?", 1)[0]
            if path == "/health":
                status, body = self.server.health()
                self._reply(status, body)
                return
            denied = self.server.intake.authorize(self.headers)
            if denied is not None:
                self.server.refusals.log(logger, logging.WARNING, "status refused: bad or missing basic auth from %s",
                                         self.client_address[0])
                self._reply(denied.status, denied.body, denied.headers)
                return
            self._reply(HTTPStatus.OK, self.server.report())
        except (socket.timeout, ConnectionError):
            self.close_connection = True
        except Exception:
            logger.exception("GET %s failed", self.path)
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, close=True)

    do_HEAD = do_GET

    def _unsupported(self):
        self._route()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _unsupported

    def send_error(self, code, message=None, explain=None):
        # Malformed request lines and headers (http.server's own checks) answer JSON too,
        # with a status line: http.server would answer an unparsable line as HTTP/0.9, bare.
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self._reply(code, {"error": message or HTTPStatus(code).phrase}, close=True)
        except OSError:
            pass

    def log_message(self, format, *args):
        # Access lines are noise next to the service's own log lines; keep them for DEBUG
        # (and format them only then: this runs for every answer).
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.client_address[0], format % args)


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves at most ``max_connections`` connections at once."""

    daemon_threads = True  # in-flight requests are awaited by stop(), not by the interpreter
    request_queue_size = 128

    def __init__(self, address, intake, health, report, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S):
        self.intake = intake  # webhook.Intake
        self.health = health  # () -> (HTTPStatus, dict)
        self.report = report  # () -> dict
        self.request_timeout_s = request_timeout_s  # socket timeout of every connection
        self.refusals = Throttle()  # refusal lines: the first of a kind, then at most one a second
        self._max = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._thread = None
        self._conn_lock = threading.Lock()
        self._idle = {}  # connection socket -> True when waiting for its next request
        self._stopping = False
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(timeout=QUEUE_WAIT_S):
            self.refusals.log(logger, logging.WARNING, "all %d connection slots busy; answering 503 to %s",
                              self._max, client_address[0])
            try:
                body = b'{"error":"busy, try again"}\n'
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
        thread.start()

    def _serve_one(self, request, client_address):
        with self._conn_lock:
            self._idle[request] = True
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._conn_lock:
                self._idle.pop(request, None)
            self.shutdown_request(request)
            self._slots.release()

    def mark_busy(self, connection):
        """Note that a request is being served on ``connection``."""
        with self._conn_lock:
            self._idle[connection] = False

    def mark_idle(self, connection):
        """Note that ``connection`` waits for its next request; return True if the server is stopping."""
        with self._conn_lock:
            self._idle[connection] = True
            return self._stopping

    def handle_error(self, request, client_address):
        logger.exception("connection from %s failed", client_address[0])

    @property
    def port(self):
        """Return the port the server is bound to (useful with port 0)."""
        return self.server_address[1]

    def start(self):
        """Serve in a daemon thread; return self."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Stop accepting, wait up to ``timeout`` s for in-flight requests, close the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout)
        with self._conn_lock:
            self._stopping = True
            idle = [conn for conn, waiting in self._idle.items() if waiting]
        for conn in idle:  # keep-alive connections between requests: nothing in flight
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        taken = 0
        for _ in range(self._max):  # every slot back = no request in flight
            if not self._slots.acquire(timeout=timeout):
                logger.warning("stopping with requests still in flight")
                break
            taken += 1
        for _ in range(taken):
            self._slots.release()
        self.server_close()


def serve(host, port, intake, health, report, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S):
    """Bind, start serving in a thread, and return the Server. Raise OSError if the port is taken."""
    return Server((host, port), intake, health, report, max_connections, request_timeout_s).start()
