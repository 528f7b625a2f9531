"""Server: the HTTP transport: one selector thread reads requests, a bounded pool answers them.

It only moves bytes: what a request may be and what it gets is decided by
``gate.Gate`` (the head's framing with ``gate.read_head``, a webhook it can decide at
once with ``Gate.screen``, everything else with ``Gate.answer``), and
``handler.Handler`` dispatches the request and writes the answer.

How a request travels. One thread (``http``) owns the listening socket and every
connection that is waiting for a request, all non-blocking, multiplexed with
``selectors``. It accepts at once, reads what arrives, and has the head checked the
moment it is complete, reading its request line and fields in the same pass (the
only parse of a head): a refused request is answered from that thread and its
connection closed. A complete request goes first to ``Gate.screen``, which decides
on this thread what is cheap and waits for nothing: with the native verifier, a
webhook's checks and its signature (tens of microseconds). A webhook refused there is
answered from this thread too, in one ``send``, and its connection kept for the next
request; a forged flood then never reaches the pool, whose hand-over and threads
taking turns on the GIL would cost more than the check (0.47 against 0.22 ms of CPU a
forged webhook in ``make bench``). Every other complete request, its read head and
its body (marked when screening found it signed, so it is not checked twice), is handed
to the pool of at most ``max_connections`` handler threads (started and joined here: no
``socketserver`` mixin; a thread is started when a request finds none free, so an
idle service holds only the threads it has needed), which answer it in one write and give a keep-alive
connection back to the selector thread. Sockets stay non-blocking throughout: the
answer's write waits for room (``handler.send_all``) only if the client stops
reading, and then at most ``request_timeout_s``. When every handler is busy and
``max_connections`` more requests are queued, the next complete request gets 503
(Stark Bank delivers again later; the worker's event pull catches up).

Why not a thread per connection: a slow client would hold a thread, so
``max_connections`` slow clients would shut every genuine one out (a slowloris);
here a waiting client costs a buffer and a file descriptor, not a thread. Measured
(``make bench``, hostile phase, ``MAX_CONNECTIONS=8``): with 96 slow, silent and
huge-head clients plus 6.3 MB heads and malformed requests, every genuine webhook was
answered, p99 23 ms, peak RSS 41 MB. The transport's own CPU per request (reading,
the head, hand-over and back, the answer; a request with a trivial answer, 8
keep-alive clients in another process) is about 0.06-0.12 ms, small next to a
signature check (about 1.2 ms): per request one ``recv``, one ``send``, the
selector's unregister and register, and at most one wake-up byte however many
connections come back at once.

Bounds, every one a constant or a constructor argument: a request must arrive
whole within ``request_timeout_s`` of its first byte, and an idle connection is
closed after as long (deadlines, not read timeouts); at most ``max_open``
connections are held (``OPEN_PER_SLOT`` per handler thread), a new one evicting the
held one closest to its deadline; a head of at most ``gate.MAX_HEAD_BYTES`` and a
body of at most ``gate.MAX_BODY_BYTES``, so a held connection costs at most about
80 KiB. A body is always read whole before the request is handled, so no refused
request leaves bytes for the next one to parse.

Refusals are logged through the Gate's ``refusals`` Throttle; an unexpected error
is a 500 whose traceback is logged at most once a minute: no client can fill the log.

``serve()`` binds, starts the threads and returns the server; ``server.stop()``
stops accepting, closes waiting connections, lets in-flight requests finish, and
closes the socket.
"""

import collections
import errno
import logging
import queue
import resource
import selectors
import socket
import threading
import time
from http import HTTPStatus

from .gate import MAX_HEAD_BYTES, Screening, head_end, read_head
from .handler import Handler, HttpDate, keeps_alive, log_access, render
from .logs import Throttle

__all__ = ["Server", "serve"]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # default deadline for a whole request, and for an idle connection
OPEN_PER_SLOT = 16  # connections held while they send, per handler thread
SWEEP_S = 0.1  # how often deadlines are checked: the precision of a cut
LINGER_S = 1.0  # after a refusal, how long the client's unread bytes are drained before closing
LINGER_BYTES = 256 * 1024  # and how many at most: a refused flood is not read to its end
RECV_BYTES = 64 * 1024  # the most read from a connection at once
SPARE_FILES = 64  # descriptors kept free of held connections: database, Stark Bank calls, handlers


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

    __slots__ = ("sock", "address", "buffer", "deadline", "head", "framing", "body_at", "closing")

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address  # (host, port) of the client
        self.buffer = bytearray()  # bytes received and not yet handed on
        self.deadline = deadline  # monotonic time by which the current request must be whole
        self.head = None  # gate.Head of the current request once its head is complete
        self.framing = None  # and its Framing
        self.body_at = 0  # offset of the current request's body in buffer
        self.closing = False  # refused: draining what the client still sends, then closed


class Server:
    """The front door: a selector thread that reads requests, a pool of threads that answers them.

    ``max_connections`` requests are handled at once and as many more may wait in the
    queue; ``max_open`` connections may be held while they send. Thread-safe:
    the selector thread alone touches the selector and the connections it holds; a
    connection in a handler's hands is not in the selector, and comes back through
    ``_returned`` (a deque) and a wake-up socket (one byte for any number of
    connections handed back before the selector thread takes them).
    """

    def __init__(self, address, gate, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S, max_open=None,
                 clock=time.monotonic):
        self.gate = gate  # gate.Gate: decides every request
        self.request_timeout_s = request_timeout_s  # deadline of a whole request, and of an idle connection
        self.refusals = gate.refusals  # one Throttle for every refusal line
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
        self._wake_pending = False  # a wake-up byte is sent and _returned not yet taken: no other is needed
        self._work = queue.SimpleQueue()  # complete requests for the handlers, bounded by _in_flight
        self._in_flight = 0  # requests handed on and not yet answered: at most 2 * max_connections
        self._in_flight_lock = threading.Lock()
        # Handler threads free for the next request, less the requests queued for them (guarded
        # by _in_flight_lock): the pool grows, up to max_connections, when it goes below zero.
        self._idle = 0
        self._stopping = threading.Event()
        self._stop_deadline = None  # clock time by which stop() gives up on requests in flight
        self._accepting = False  # the listener is registered with the selector
        self._threads = []
        self.http_date = HttpDate()  # () -> the Date header's value, formatted once a second

    # -- life ------------------------------------------------------------------

    @property
    def port(self):
        """Return the port the server is bound to (useful with port 0)."""
        return self.server_address[1]

    def start(self):
        """Start the selector thread; return self. Handler threads start as requests need them."""
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._accepting = True
        self._selector.register(self._wake_sock, selectors.EVENT_READ, "wake")
        reader = threading.Thread(target=self._run, name="http", daemon=True)
        self._threads.append(reader)
        reader.start()
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
        """Check each head once it is complete; once its body is here too, answer or hand on the request."""
        while True:
            if conn.framing is None:
                ends = head_end(conn.buffer)
                if ends is None or ends[0] > MAX_HEAD_BYTES:
                    if len(conn.buffer) > MAX_HEAD_BYTES:
                        self._refuse(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                     f"request head over {MAX_HEAD_BYTES} bytes")
                    return
                head = read_head(bytes(conn.buffer[:ends[0]]))
                framing = head.framing
                if framing.error is not None:
                    self._refuse(conn, framing.error, framing.reason)
                    return
                conn.head, conn.framing, conn.body_at = head, framing, ends[1]
                if framing.expect_continue and len(conn.buffer) < ends[1] + framing.body_bytes:
                    self._send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            end = conn.body_at + conn.framing.body_bytes
            if len(conn.buffer) < end:
                return
            head, body = conn.head, bytes(conn.buffer[conn.body_at:end])
            del conn.buffer[:end]
            conn.head = conn.framing = None
            screening = self._screen(conn, head, body)
            if screening.reply is None:
                self._hand_on(conn, head, body, screening.signed)
                return
            if not self._answer_at_once(conn, head, screening.reply) or not conn.buffer:
                return

    def _screen(self, conn, head, body):
        """Return the Gate's Screening of a complete request; on an unexpected error, an empty one.

        A bug in a check must not stop this thread, which reads every request: the
        error's traceback is logged (at most once a minute) and the request goes to a
        handler, which decides it whole (a 500 if the check fails there too).
        """
        try:
            return self.gate.screen(head.method, head.target, head.headers,
                                    body if "Content-Length" in head.headers else None, conn.address[0])
        except Exception:
            self._log_unexpected("screening a request from %s failed", conn.address[0])
            return Screening()

    def _answer_at_once(self, conn, head, reply):
        """Send the Gate's ``reply`` from this thread; return True if the connection stays for another request.

        The answer is small and goes in one ``send``; a client that has not read its
        earlier answers, so that this one does not fit, is cut off (a handler would
        wait up to ``request_timeout_s`` for it; this thread waits for no one).
        """
        close = not keeps_alive(head) or self._stopping.is_set()
        data = render(reply.status, reply.body, reply.headers, close, date=self.http_date())
        log_access(conn.address[0], head, reply.status)
        try:
            sent = conn.sock.send(data)
        except OSError:  # no room at all, or the client is gone
            sent = 0
        if close or sent < len(data):
            self._drop(conn)
            return False
        conn.deadline = self._clock() + self.request_timeout_s  # idle, or a pipelined request began
        return True

    def _hand_on(self, conn, head, body, signed):
        """Give a complete request to the handler threads (503 at once if as many wait as they can handle)."""
        self._release(conn)
        with self._in_flight_lock:
            full = self._in_flight >= 2 * self._max  # every handler busy, and as many waiting
            if not full:
                self._in_flight += 1
                self._idle -= 1  # below zero: no thread is free for this request
                grow = self._idle < 0 and len(self._threads) - 1 < self._max
        if not full:
            self._work.put((conn, head, body, signed))
            if grow:
                self._start_handler()
        else:
            self.refusals.log(logger, logging.WARNING, "all %d handlers busy and %d requests queued; 503 to %s",
                              self._max, self._max, conn.address[0], kind="busy")
            self._send_quietly(conn.sock, render(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy, try again"},
                                                 (("Retry-After", "1"),), close=True, date=self.http_date()))
            self._peers.pop(conn.sock, None)
            self._close_quietly(conn.sock)

    def _refuse(self, conn, status, reason):
        """Answer a request refused from its head, and close its connection after a short drain."""
        self.refusals.log(logger, logging.WARNING, "request refused (%d): %s from %s",
                          status, reason, conn.address[0], kind=reason)
        self._send_quietly(conn.sock, render(status, {"error": reason}, close=True, date=self.http_date()))
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

    def _hand_back(self, conn):
        """Give a keep-alive connection back to the selector thread (from a handler thread)."""
        self._returned.append(conn)
        # Appended before the flag is read: a handler that finds a wake-up pending knows
        # the selector thread has not yet cleared it, so it takes this connection too.
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _take_back(self):
        try:
            self._wake_sock.recv(4096)  # more than that pending, the selector calls again
        except (BlockingIOError, InterruptedError):
            pass
        # Cleared after the read and before the deque is emptied: a hand-back that still
        # saw the flag set is in the deque already; a later one sends a byte no read has taken.
        self._wake_pending = False
        while self._returned:
            conn = self._returned.popleft()
            conn.deadline = self._clock() + self.request_timeout_s  # idle, or a pipelined request began
            self._hold(conn)
            if conn.buffer:
                self._advance(conn)

    # -- the handler threads -----------------------------------------------------

    def _start_handler(self):
        """Start one more handler thread (the selector thread calls it; at most ``max_connections``)."""
        thread = threading.Thread(target=self._handle_loop, name=f"http-{len(self._threads) - 1}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _handle_loop(self):
        _name_native_thread(threading.current_thread().name)
        while True:
            with self._in_flight_lock:
                self._idle += 1
            item = self._work.get()
            if item is None:
                return
            conn, head, body, signed = item
            keep = False
            try:
                # The socket stays non-blocking: send_all bounds the answer's write by request_timeout_s.
                keep = not Handler(conn.sock, head, body, self, signed).close_connection
            except Exception:
                self._log_unexpected("request from %s failed", conn.address[0])
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1
            if keep and not self._stopping.is_set():
                self._hand_back(conn)
            else:
                self._peers.pop(conn.sock, None)
                self._close_quietly(conn.sock)

    # -- helpers ---------------------------------------------------------------

    def _log_unexpected(self, message, client):
        """Log the exception being handled: its traceback at most once a minute, else a throttled line."""
        if not self.tracebacks.log(logger, logging.ERROR, message, client, exc_info=True, kind="traceback"):
            self.refusals.log(logger, logging.ERROR, message, client)

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


def serve(host, port, gate, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S):
    """Bind, start serving in threads, and return the Server. Raise OSError if the port is taken."""
    return Server((host, port), gate, max_connections, request_timeout_s).start()
