"""Server: the HTTP transport: one selector thread reads requests, a bounded pool answers them.

It only moves bytes, through ``wire`` (a head read once, a request framed, an answer
written); what a request may be and what it gets is decided by ``gate.Gate.admit``.
Nothing of ``http.server`` runs here (docs/design.md, "Inside": what it keeps of it and why).

How a request travels. One thread (``http``) owns the listening socket and every
connection waiting for a request, all non-blocking, multiplexed with ``selectors``.
It accepts at once, reads what arrives, and reads each head once it is complete
(``wire.read_head``): a refused head is answered from this thread and its connection
closed. A request whose body is whole goes to ``Gate.admit`` on this thread, without
waiting: a Reply decided there (a webhook refused, with a cheap verifier) is sent
from here in one ``send``, the connection kept; anything else comes back as a
callable that finishes the decision, handed with its connection to the handler
threads (``pool.Pool``, at most ``max_connections``), which run it, write the answer
(``wire.send_all``: non-blocking, waiting at most ``request_timeout_s`` for a client
that does not read) and give a keep-alive connection back. When every handler is busy
and as many requests wait, the next gets 503 (Stark Bank delivers again later).

Not a thread per connection: then ``max_connections`` slow clients (a slowloris) would
shut every genuine one out; here a waiting client costs a buffer and a descriptor.
Bounds, each a constant or a constructor argument: a request must arrive whole
within ``request_timeout_s`` of its first byte, and an idle connection is closed
after as long (deadlines, not read timeouts); at most ``max_open`` connections are
held (``OPEN_PER_SLOT`` per handler thread), a new one evicting the one closest to
its deadline; a head of ``wire.MAX_HEAD_BYTES`` and a body of ``wire.MAX_BODY_BYTES``
at most. A body is read whole before its request is decided, so no refused request
leaves bytes for the next one to parse.

Refusals are logged through the Gate's ``refusals`` Throttle; a StoreError is a 503, an unexpected
error a 500 whose traceback is logged at most once a minute: no client can fill the log.
"""

import collections
import errno
import functools
import logging
import resource
import selectors
import socket
import threading
import time
from http import HTTPStatus

from .errors import StoreError
from .logs import Throttle
from .pool import Pool, name_native_thread
from .wire import CONTINUE, MAX_HEAD_BYTES, HttpDate, answer, head_end, log_access, read_head, render, request, send_all

__all__ = ["Server"]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # default deadline for a whole request, and for an idle connection
OPEN_PER_SLOT = 16  # connections held while they send, per handler thread
SWEEP_S = 0.1  # how often deadlines are checked: the precision of a cut
LINGER_S = 1.0  # after a refusal, how long the client's unread bytes are drained before closing
LINGER_BYTES = 256 * 1024  # and how many at most: a refused flood is not read to its end
RECV_BYTES = 64 * 1024  # the most read from a connection at once
SPARE_FILES = 64  # descriptors kept free of held connections: database, Stark Bank calls, handlers


def _open_bound(wanted):
    """Return ``wanted``, or fewer if RLIMIT_NOFILE would not leave ``SPARE_FILES`` descriptors free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - SPARE_FILES))


class _Connection:
    """A client connection and what it has sent so far. Owned by one thread at a time."""

    __slots__ = ("sock", "address", "buffer", "deadline", "head", "framing", "body_at", "closing")

    def __init__(self, sock, address, deadline):
        self.sock = sock
        self.address = address  # (host, port) of the client
        self.buffer = bytearray()  # bytes received and not yet handed on
        self.deadline = deadline  # monotonic time by which the current request must be whole
        self.head = None  # wire.Head of the current request once its head is complete
        self.framing = None  # and its Framing
        self.body_at = 0  # offset of the current request's body in buffer
        self.closing = False  # refused: draining what the client still sends, then closed


class Server:
    """The front door: a selector thread that reads requests, a pool of threads that answers them.

    Thread-safe: the selector thread alone touches the selector and the connections it
    holds; a connection in a handler's hands is not in the selector, and comes back
    through ``_returned`` (a deque) and a wake-up socket (one byte for any number of
    connections handed back before the selector thread takes them).
    """

    def __init__(self, address, gate, max_connections=32, request_timeout_s=REQUEST_TIMEOUT_S, max_open=None,
                 clock=time.monotonic):
        self.gate = gate  # gate.Gate: decides every request (``admit``)
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
        self._returned = collections.deque()  # connections handed back by handlers
        self._wake_pending = False  # a wake-up byte is sent and _returned not yet taken: no other is needed
        self._pool = Pool(max_connections, self._serve)  # the handler threads
        self._stopping = threading.Event()
        self._stop_deadline = None  # clock time by which stop() gives up on requests in flight
        self._accepting = False  # the listener is registered with the selector
        self._reader = None  # the selector thread, once started
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
        self._reader = threading.Thread(target=self._run, name="http", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout=5.0):
        """Stop accepting, close idle connections, wait up to ``timeout`` s for requests in flight.

        A request in flight is one whose first bytes have arrived: it may finish arriving
        and is answered, then its connection closed.
        """
        self._stop_deadline = self._clock() + timeout
        self._stopping.set()
        self._wake()
        if self._reader is not None:
            self._reader.join(timeout)  # the selector thread: requests still arriving, then closes
        handled = self._pool.stop(self._stop_deadline, self._clock)
        if not handled or (self._reader is not None and self._reader.is_alive()):
            logger.warning("stopping with requests still in flight")
        self._close_quietly(self._listener)
        while self._returned:  # handed back while the selector thread was stopping
            self._close_quietly(self._returned.popleft().sock)
        for sock in (self._waker, self._wake_sock):
            sock.close()

    def alive(self):
        """Return True while the selector thread runs: without it no request is read."""
        return self._reader is not None and self._reader.is_alive()

    # -- the selector thread -----------------------------------------------------

    def _run(self):
        name_native_thread(threading.current_thread().name)
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

        A request begun before the stop may finish arriving until the stop's deadline, and is answered.
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
        self._close_quietly(conn.sock)

    def _release(self, conn):  # a handler thread owns it now
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
                    self._send_quietly(conn.sock, CONTINUE)
            end = conn.body_at + conn.framing.body_bytes
            if len(conn.buffer) < end:
                return
            head, body = conn.head, bytes(conn.buffer[conn.body_at:end])
            del conn.buffer[:end]
            conn.head = conn.framing = None
            decided = self._admit(request(head, body, conn.address[0]))
            if callable(decided):
                self._hand_on(conn, head, decided)
                return
            if not self._answer_at_once(conn, head, decided) or not conn.buffer:
                return

    def _admit(self, complete):
        """Return ``Gate.admit(complete, may_wait=False)``; on a bug (logged, never raised), leave it to a handler."""
        try:
            return self.gate.admit(complete, may_wait=False)
        except Exception:
            self._log_unexpected("deciding a request from %s on the selector thread failed", complete.client)
            return functools.partial(self.gate.admit, complete)

    def _answer_at_once(self, conn, head, reply):
        """Send ``reply`` in one ``send`` (an answer that does not fit cuts the client off); True if it stays."""
        data, close = answer(head, reply.status, reply.body, reply.headers, reply.close or self._stopping.is_set(),
                             date=self.http_date())
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

    def _hand_on(self, conn, head, decide):
        """Give a request to the handler threads, with ``decide`` (``() -> Reply``); 503 at once if they are full."""
        self._release(conn)
        if not self._pool.offer((conn, head, decide)):
            self.refusals.log(logger, logging.WARNING, "all %d handlers busy and %d requests queued; 503 to %s",
                              self._max, self._max, conn.address[0], kind="busy")
            self._send_quietly(conn.sock, render(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy, try again"},
                                                 (("Retry-After", "1"),), close=True, date=self.http_date()))
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

    def _serve(self, item):
        """Run a request's ``decide`` (in a handler thread), write its Reply whole, keep or close the connection.

        A StoreError (the database away: a server restarting, say) is a 503, so the client
        tries again; an unexpected error a 500 that closes the connection. ``send_all``
        gives the answer up after ``request_timeout_s`` if the client does not read it.
        """
        conn, head, decide = item
        try:
            status, body, headers, close = decide()
        except StoreError as e:  # not a bug: the database is away for now
            self.refusals.log(logger, logging.WARNING, "%s %s: the database is unavailable (%s); answering 503",
                              head.method, head.target.split("?", 1)[0][:64], e, kind="store unavailable")
            status, body, headers, close = (HTTPStatus.SERVICE_UNAVAILABLE,
                                            {"error": "the database is unavailable; try again later"}, (), True)
        except Exception:
            self._log_unexpected("%s %s failed; answering 500", head.method, head.target.split("?", 1)[0][:64])
            status, body, headers, close = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, (), True
        keep = False
        try:
            data, close = answer(head, status, body, headers, close, date=self.http_date())
            log_access(conn.address[0], head, status)
            if send_all(conn.sock, data, self.request_timeout_s):
                keep = not close
            else:
                self.refusals.log(logger, logging.WARNING, "answer to %s not read within %g s; connection closed",
                                  conn.address[0], self.request_timeout_s, kind="unread answer")
        except OSError:  # the client is gone: nothing to tell it, nor the log
            pass
        except Exception:
            self._log_unexpected("request from %s failed", conn.address[0])
        if keep and not self._stopping.is_set():
            self._hand_back(conn)
        else:
            self._close_quietly(conn.sock)

    # -- helpers ---------------------------------------------------------------

    def _log_unexpected(self, message, *args):
        """Log the exception being handled: its traceback at most once a minute, else a throttled line."""
        if not self.tracebacks.log(logger, logging.ERROR, message, *args, exc_info=True, kind="traceback"):
            self.refusals.log(logger, logging.ERROR, message + " (traceback logged at most once a minute)", *args)

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

