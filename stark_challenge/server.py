"""Server: the HTTP front door: one selector thread reads requests, a bounded pool answers them.

Routes (a request ``X /path`` is handled by ``Handler.do_X``, as in ``http.server``):

- ``POST /webhook``: Stark Bank's events, decided by ``webhook.Intake``;
- ``GET /health``: status only (ok, starting, degraded) and its HTTP code, for probes;
- ``GET /status``: the money summary and the service's details (behind the webhook's basic auth).

Any other path is 404, another method on a known path 405. Every answer is JSON.

How a request travels. One thread (``http``) owns the listening socket and every
connection that is waiting for a request, all non-blocking, multiplexed with
``selectors``. It accepts at once, reads what arrives, and checks the framing the
moment the head is complete (``check_head``): a refused request is answered from
that thread and its connection closed. Only a complete request, head and body, is
handed to the pool of ``max_connections`` handler threads, which parse it with
``http.server``'s ``BaseHTTPRequestHandler`` (over the bytes received, not the
socket), answer it in one write, and give a keep-alive connection back to the
selector thread. When every handler is busy and ``max_connections`` more requests
are queued, the next complete request gets 503 (Stark Bank delivers again later;
the worker's event pull catches up on what it never redelivers).

Why this design and not threads per connection: a thread per connection lets a
client hold a thread by being slow, so ``max_connections`` slow or silent clients
shut every genuine one out (a slowloris), and a socket timeout is per read, so a
client sending one byte a second is never cut. Evicting the slowest connection
when the house is full is the other way out, but it still costs one thread per
waiting client and it turns the contest into one of numbers. Here a waiting
client costs a buffer and a file descriptor, not a thread, and the handler
threads only ever do work that is ready. Measured (``make bench``, hostile phase,
``MAX_CONNECTIONS=8``): with 96 slow, silent and huge-head clients reconnecting as
they are cut, plus 6.3 MB heads and malformed requests, every genuine webhook was
answered, p99 23 ms, peak RSS 41 MB. The price: the hand-over from this thread to a
handler and back costs about 0.15 ms of CPU per request (8-12%, measured against
the thread-per-connection server), small next to a signature check (about 1.2 ms).

Bounds, every one a constant or a constructor argument:

- deadlines, not read timeouts: a request must arrive whole within
  ``request_timeout_s`` of its first byte; a connection idle that long (new, or
  between keep-alive requests) is closed. A trickling client is cut at the deadline;
- at most ``max_open`` connections are held (default ``OPEN_PER_SLOT`` per handler
  thread); when full, a new connection evicts the held one closest to its deadline,
  so accepting never waits;
- a head of at most ``MAX_HEAD_BYTES`` and ``MAX_HEADER_LINES`` lines (431 beyond), a
  body of at most ``webhook.MAX_BODY_BYTES`` (413, unread): a held connection costs
  at most about 80 KiB;
- strict framing: ``Content-Length`` is ASCII digits, conflicting copies of it, any
  ``Transfer-Encoding``, folded header lines and malformed request lines are 400,
  answered and closed whatever the path. A body is always read whole before the
  request is handled, so no refused request leaves bytes for the next one to parse.

Refusals are logged through a ``logs.Throttle`` (the first of each kind, then at
most one a second with a count). An unexpected error is a 500 whose traceback is
logged at most once a minute: no client can fill the log.

``serve()`` binds, starts the threads and returns the server; ``server.stop()``
stops accepting, closes waiting connections, lets in-flight requests finish, and
closes the socket.
"""

import collections
import errno
import io
import json
import logging
import queue
import re
import resource
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import NamedTuple

from .logs import Throttle
from .webhook import MAX_BODY_BYTES

__all__ = ["Server", "Handler", "serve", "check_head", "Framing", "MAX_HEAD_BYTES", "MAX_HEADER_LINES"]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # default deadline for a whole request, and for an idle connection
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; Stark Bank's are well under 2 KiB
MAX_HEADER_LINES = 64  # header lines in one request; Stark Bank sends about ten
OPEN_PER_SLOT = 16  # connections held while they send, per handler thread
SWEEP_S = 0.1  # how often deadlines are checked: the precision of a cut
LINGER_S = 1.0  # after a refusal, how long the client's unread bytes are drained before closing
LINGER_BYTES = 256 * 1024  # and how many at most: a refused flood is not read to its end
RECV_BYTES = 64 * 1024  # the most read from a connection at once
SPARE_FILES = 64  # descriptors kept free of held connections: database, Stark Bank calls, handlers
ROUTES = {"/webhook": ("POST",), "/health": ("GET", "HEAD"), "/status": ("GET", "HEAD")}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class Framing(NamedTuple):
    """What the head of a request says about its framing, or why it is refused."""

    error: HTTPStatus = None  # None if the request may be read; else the status to refuse it with
    reason: str = ""  # one line for the client and the log when refused
    body_bytes: int = 0  # length of the body that follows the head
    expect_continue: bool = False  # the client waits for "100 Continue" before sending the body


def _refused(status, reason):
    return Framing(status, reason)


def check_head(head):
    """Return the Framing of a request head (bytes, without its closing blank line).

    Strict where leniency lets two parsers disagree (request smuggling): the request
    line is ``METHOD target HTTP/1.x``; every header line is ``name: value`` (no folding,
    no space before the colon); ``Content-Length`` is ASCII digits, and its copies, if
    any, agree; ``Transfer-Encoding`` is refused whatever its value (Stark Bank sends a
    Content-Length). Pure; thread-safe.
    """
    lines = head.split(b"\n")
    if len(lines) - 1 > MAX_HEADER_LINES:
        return _refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADER_LINES} header lines")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or not _VERSION.fullmatch(parts[2]):
        return _refused(HTTPStatus.BAD_REQUEST, "malformed request line")
    lengths, expect_continue = set(), False
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return _refused(HTTPStatus.BAD_REQUEST, "malformed header line")
        name, value = name.lower(), value.strip(b" \t")
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
    return Framing(body_bytes=int(length), expect_continue=expect_continue and parts[2] == b"HTTP/1.1")


def _head_end(buffer):
    """Return (end of the head, start of the body) in ``buffer``, or None while the head is incomplete."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return None


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


def _open_bound(wanted):
    """Return ``wanted``, or fewer if the process may not open that many files (RLIMIT_NOFILE).

    ``SPARE_FILES`` descriptors stay free for the database, the calls to Stark Bank and
    the handlers' connections.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - SPARE_FILES))


def _name_native_thread(name):
    """Give the calling thread ``name`` in the kernel too (``top -H``, ``/proc/<pid>/task/*/comm``).

    Python's thread names stay inside Python; Linux takes a new one written to the
    thread's ``comm`` (15 bytes at most). Cosmetic: elsewhere, or without /proc, nothing happens.
    """
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        return


class _Connection:
    """A client connection and what it has sent so far. Owned by one thread at a time."""

    __slots__ = ("sock", "address", "buffer", "deadline", "framing", "body_at", "closing")

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address  # (host, port) of the client
        self.buffer = bytearray()  # bytes received and not yet handed on
        self.deadline = deadline  # monotonic time by which the current request must be whole
        self.framing = None  # Framing of the current request once its head is complete
        self.body_at = 0  # offset of the current request's body in buffer
        self.closing = False  # refused: draining what the client still sends, then closed


class Handler(BaseHTTPRequestHandler):
    """Answers one complete request; collaborators come through ``server`` (intake, health, report).

    Built by a pool thread with the request's bytes: ``rfile`` reads them, ``wfile``
    collects the answer, and ``finish`` sends it in one write (on a keep-alive
    connection, headers and body written apart wait for the client's delayed ACK, up
    to 40 ms a request; issue #6). Leaves ``close_connection`` saying whether the
    connection may carry another request.

    The ``BaseHTTPRequestHandler`` internals overridden, and why: ``setup``/``finish``
    (buffers instead of the socket's files), ``handle`` (one request, not a loop: the
    selector thread brings the next), ``handle_expect_100`` (the selector thread
    already sent "100 Continue"), ``send_error`` (JSON, throttled log, close),
    ``version_string`` (no Python version), ``log_message`` (DEBUG only).
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
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return False
        if self.command not in allowed:
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"},
                        (("Allow", ", ".join(allowed)),))
            return False
        return True

    def _read_body(self):
        """Return the body as bytes, or None after answering 411 (the selector thread checked the rest)."""
        if self.headers.get("Content-Length") is None:
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return None
        return self.rfile.read()

    def _refuse(self, status, reason, headers=(), close=False):
        self.server.refusals.log(logger, logging.WARNING, "%s %s refused (%d): %s from %s",
                                 self.command, self.path.split("?", 1)[0][:64], status, reason,
                                 self.client_address[0], kind=reason)
        self._reply(status, {"error": reason}, headers, close)

    def do_POST(self):
        try:
            if not self._route():
                return
            denied = self.server.intake.authorize(self.headers)
            if denied is not None:
                self.server.refusals.log(logger, logging.WARNING, "webhook refused: bad or missing basic auth from %s",
                                         self.client_address[0])
                self._reply(denied.status, denied.body, denied.headers)
                return
            body = self._read_body()
            if body is None:
                return
            reply = self.server.intake.receive(self.headers, body)
            self._reply(reply.status, reply.body, reply.headers)
        except Exception:
            self._unexpected()

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
        except Exception:
            self._unexpected()

    do_HEAD = do_GET

    def _unsupported(self):
        self._route()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _unsupported

    def _unexpected(self):
        # A bug, not the client's doing: the traceback once a minute, a throttled line otherwise.
        path = self.path.split("?", 1)[0][:64]
        if not self.server.tracebacks.log(logger, logging.ERROR, "%s %s failed; answering 500",
                                          self.command, path, exc_info=True, kind="traceback"):
            self.server.refusals.log(logger, logging.ERROR,
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
        self.server.refusals.log(logger, logging.WARNING, "request refused (%d): %s from %s",
                                 code, message or HTTPStatus(code).phrase, self.client_address[0], kind="send_error")
        self._reply(code, {"error": message or HTTPStatus(code).phrase}, close=True)

    def log_message(self, format, *args):
        # Access lines are noise next to the service's own log lines; keep them for DEBUG
        # (and format them only then: this runs for every answer).
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.client_address[0], format % args)


class Server:
    """The front door: a selector thread that reads requests, a pool of threads that answers them.

    ``max_connections`` requests are handled at once and as many more may wait in the
    queue; ``max_open`` connections may be held while they send. Thread-safe:
    the selector thread alone touches the selector and the connections it holds; a
    connection in a handler's hands is not in the selector, and comes back through
    ``_returned`` (a deque) and a wake-up socket.
    """

    def __init__(self, address, intake, health, report, max_connections=32,
                 request_timeout_s=REQUEST_TIMEOUT_S, max_open=None, clock=time.monotonic):
        self.intake = intake  # webhook.Intake
        self.health = health  # () -> (HTTPStatus, dict)
        self.report = report  # () -> dict
        self.request_timeout_s = request_timeout_s  # deadline of a whole request, and of an idle connection
        self.refusals = Throttle()  # refusal lines: the first of a kind, then at most one a second
        self.tracebacks = Throttle(interval_s=60.0)  # unexpected errors: a traceback at most once a minute
        self._max = max_connections
        self._max_open = max_open or _open_bound(OPEN_PER_SLOT * max_connections)
        self._clock = clock
        self._listener = socket.create_server(address, backlog=128)
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()
        self._selector = selectors.DefaultSelector()
        self._waker, self._wake_sock = socket.socketpair()
        self._waker.setblocking(False)
        self._wake_sock.setblocking(False)
        self._held = {}  # socket -> _Connection, the connections the selector thread holds
        self._peers = {}  # socket -> client address, for every open connection (handlers read it)
        self._returned = collections.deque()  # connections handed back by handlers
        self._work = queue.Queue()  # complete requests for the handlers, bounded by _in_flight
        self._in_flight = 0  # requests handed on and not yet answered: at most 2 * max_connections
        self._in_flight_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stop_deadline = None  # clock time by which stop() gives up on requests in flight
        self._accepting = False  # the listener is registered with the selector
        self._threads = []

    # -- life ------------------------------------------------------------------

    @property
    def port(self):
        """Return the port the server is bound to (useful with port 0)."""
        return self.server_address[1]

    def start(self):
        """Start the selector thread and the handler threads; return self."""
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._accepting = True
        self._selector.register(self._wake_sock, selectors.EVENT_READ, "wake")
        reader = threading.Thread(target=self._run, name="http", daemon=True)
        self._threads.append(reader)
        for n in range(self._max):
            self._threads.append(threading.Thread(target=self._handle_loop, name=f"http-{n}", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout=5.0):
        """Stop accepting, close idle connections, wait up to ``timeout`` s for requests in flight.

        A request in flight is one whose first bytes have arrived: it may finish arriving
        and is answered, then its connection closed.
        """
        self._stop_deadline = self._clock() + timeout
        self._stopping.set()
        self._wake()
        if self._threads:
            self._threads[0].join(timeout)  # the selector thread: requests still arriving, then closes
        for _ in self._threads[1:]:
            self._work.put(None)  # after the requests already queued
        for thread in self._threads[1:]:
            thread.join(max(0.0, self._stop_deadline - self._clock()))
        if any(t.is_alive() for t in self._threads):
            logger.warning("stopping with requests still in flight")
        self._close_quietly(self._listener)
        while self._returned:  # handed back while the selector thread was stopping
            self._close_quietly(self._returned.popleft().sock)
        for sock in (self._waker, self._wake_sock):
            sock.close()

    def alive(self):
        """Return True while the selector thread runs: without it no request is read."""
        return bool(self._threads) and self._threads[0].is_alive()

    def peer_of(self, sock):
        """Return the client address of an open connection."""
        return self._peers.get(sock, ("?", 0))

    # -- the selector thread -----------------------------------------------------

    def _run(self):
        _name_native_thread(threading.current_thread().name)
        next_sweep = self._clock() + SWEEP_S
        try:
            while not self._stopping.is_set() or self._wind_down():
                for key, _ in self._selector.select(SWEEP_S):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    else:
                        self._receive(key.data)
                now = self._clock()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_S
        except Exception:
            logger.exception("the HTTP selector thread failed; no new requests are read")
        finally:
            self._stop_accepting()
            for conn in list(self._held.values()):
                self._drop(conn)
            self._selector.close()

    def _stop_accepting(self):
        if self._accepting:
            self._accepting = False
            self._selector.unregister(self._listener)
            self._close_quietly(self._listener)

    def _wind_down(self):
        """While stopping: refuse new connections, close idle ones; return True while a request is still arriving.

        A request whose first bytes came before the stop may finish arriving (until the
        stop's deadline) and is answered, as a thread per connection would have done.
        """
        self._stop_accepting()
        for conn in [c for c in self._held.values() if c.closing or not c.buffer]:
            self._drop(conn)
        return bool(self._held) and self._clock() < self._stop_deadline

    def _accept(self):
        for _ in range(64):  # a burst at a time, so held connections are read in between
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, or the client already gone
                self.refusals.log(logger, logging.WARNING, "accept failed: %s", e.strerror or e, kind="accept")
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._held:
                    self._evict()  # make room, or the listener stays readable and the loop spins
                    continue
                return
            if len(self._held) >= self._max_open:
                self._evict()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each answer is one write
            conn = _Connection(sock, address, self._clock() + self.request_timeout_s)
            self._peers[sock] = address
            self._hold(conn)

    def _hold(self, conn):
        self._held[conn.sock] = conn
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _evict(self):
        victim = min(self._held.values(), key=lambda c: c.deadline)
        self.refusals.log(logger, logging.WARNING,
                          "%d connections held; closing the one closest to its deadline (%s)",
                          self._max_open, victim.address[0], kind="evict")
        self._drop(victim)

    def _drop(self, conn):
        if self._held.pop(conn.sock, None) is not None:
            self._selector.unregister(conn.sock)
        self._peers.pop(conn.sock, None)
        self._close_quietly(conn.sock)

    def _release(self, conn):
        """Take ``conn`` out of the selector: a handler thread owns it now."""
        del self._held[conn.sock]
        self._selector.unregister(conn.sock)

    def _sweep(self, now):
        for conn in [c for c in self._held.values() if c.deadline <= now]:
            if conn.buffer and not conn.closing:
                self.refusals.log(logger, logging.WARNING,
                                  "request from %s not complete within %g s; connection closed",
                                  conn.address[0], self.request_timeout_s)
            self._drop(conn)

    def _receive(self, conn):
        want = RECV_BYTES
        if conn.framing is None and not conn.closing:
            want = max(1, MAX_HEAD_BYTES + 4 - len(conn.buffer))  # enough to see the head end, or that it is too long
        elif conn.framing is not None:
            want = max(1, min(RECV_BYTES, conn.body_at + conn.framing.body_bytes - len(conn.buffer)))
        try:
            data = conn.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if conn.closing:  # drained and dropped: the answer was sent already
            conn.body_at += len(data)  # counts the bytes drained
            if conn.body_at > LINGER_BYTES:
                self._drop(conn)
            return
        if not conn.buffer:
            conn.deadline = self._clock() + self.request_timeout_s  # the request's first byte
        conn.buffer += data
        self._advance(conn)

    def _advance(self, conn):
        """Check the head once it is complete; hand the request on once its body is here too."""
        if conn.framing is None:
            ends = _head_end(conn.buffer)
            if ends is None or ends[0] > MAX_HEAD_BYTES:
                if len(conn.buffer) > MAX_HEAD_BYTES:
                    self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                 f"request head over {MAX_HEAD_BYTES} bytes")
                return
            framing = check_head(bytes(conn.buffer[:ends[0]]))
            if framing.error is not None:
                self._refuse(conn, framing.error, framing.reason)
                return
            conn.framing, conn.body_at = framing, ends[1]
            if framing.expect_continue and len(conn.buffer) < ends[1] + framing.body_bytes:
                self._send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        end = conn.body_at + conn.framing.body_bytes
        if len(conn.buffer) < end:
            return
        data = bytes(conn.buffer[:end])
        del conn.buffer[:end]
        conn.framing = None
        self._release(conn)
        with self._in_flight_lock:
            full = self._in_flight >= 2 * self._max  # every handler busy, and as many waiting
            if not full:
                self._in_flight += 1
        if not full:
            self._work.put((conn, data))
        else:
            self.refusals.log(logger, logging.WARNING, "all %d handlers busy and %d requests queued; 503 to %s",
                              self._max, self._max, conn.address[0], kind="busy")
            self._send_quietly(conn.sock, render(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy, try again"},
                                                 (("Retry-After", "1"),), close=True))
            self._peers.pop(conn.sock, None)
            self._close_quietly(conn.sock)

    def _refuse(self, conn, status, reason):
        """Answer a request refused from its head, and close its connection after a short drain."""
        self.refusals.log(logger, logging.WARNING, "request refused (%d): %s from %s",
                          status, reason, conn.address[0], kind=reason)
        self._send_quietly(conn.sock, render(status, {"error": reason}, close=True))
        # Closing with unread bytes would reset the connection and could destroy the
        # answer before the client reads it: stop reading requests, drain a little, close.
        conn.closing, conn.framing, conn.body_at = True, None, 0
        conn.buffer = bytearray()
        conn.deadline = self._clock() + min(LINGER_S, self.request_timeout_s)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)

    def _wake(self):
        try:
            self._waker.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or the server is closed: either way nothing is lost

    def _take_back(self):
        try:
            while self._wake_sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._returned:
            conn = self._returned.popleft()
            conn.deadline = self._clock() + self.request_timeout_s  # idle, or a pipelined request began
            self._hold(conn)
            if conn.buffer:
                self._advance(conn)

    # -- the handler threads -----------------------------------------------------

    def _handle_loop(self):
        _name_native_thread(threading.current_thread().name)
        while True:
            item = self._work.get()
            if item is None:
                return
            conn, data = item
            keep = False
            try:
                conn.sock.settimeout(self.request_timeout_s)  # the answer's write is bounded too
                keep = not Handler(conn.sock, data, self).close_connection
            except Exception:
                if not self.tracebacks.log(logger, logging.ERROR, "request from %s failed", conn.address[0],
                                           exc_info=True, kind="traceback"):
                    self.refusals.log(logger, logging.ERROR, "request from %s failed", conn.address[0])
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1
            if keep and not self._stopping.is_set():
                conn.sock.setblocking(False)
                self._returned.append(conn)
                self._wake()
            else:
                self._peers.pop(conn.sock, None)
                self._close_quietly(conn.sock)

    # -- helpers ---------------------------------------------------------------

    @staticmethod
    def _send_quietly(sock, data):
        # Small answers to a connection that sent us a request: they fit in the socket's
        # buffer; a client that does not read them loses them, nothing waits.
        try:
            sock.send(data)
        except OSError:
            pass

    @staticmethod
    def _close_quietly(sock):
        try:
            sock.close()
        except OSError:
            pass


def serve(host, port, intake, health, report, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S):
    """Bind, start serving in threads, and return the Server. Raise OSError if the port is taken."""
    return Server((host, port), intake, health, report, max_connections, request_timeout_s).start()
