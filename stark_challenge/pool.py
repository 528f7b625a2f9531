"""Pool: the HTTP handler threads: a bounded pool, grown as work needs it, that runs what may wait.

``server``'s selector thread hands it items (``offer``); a handler thread runs each
with the callable given at construction and takes the next. At most ``max_threads``
threads, started one at a time when an item finds none free, and at most
``max_threads`` items waiting for them: ``offer`` says no beyond that, and the caller
answers 503. It knows nothing of HTTP.

The pool shrinks too: an item goes to the thread that became free last, so under
steady traffic the same few threads do the work, and a thread left idle for
``idle_s`` ends. A burst's extra threads (each with its stack, its C library caches
and its share of the allocator) thus go once the burst is over, instead of staying
for the process's life: an idle service holds only the threads it needs now.

Thread-safe: ``offer`` is called by one thread (the selector's); the idle threads,
the waiting items and the counts are guarded by one lock, held briefly.
"""

import collections
import itertools
import queue
import threading

__all__ = ["Pool", "name_native_thread", "IDLE_S"]

IDLE_S = 30.0  # a handler thread idle this long ends


def name_native_thread(name):
    """Give the calling thread ``name`` in the kernel too (``top -H``, ``/proc/<pid>/task/*/comm``).

    Python's thread names stay inside Python; Linux takes a new one written to the
    thread's ``comm`` (15 bytes at most). Cosmetic: elsewhere, or without /proc, nothing happens.
    """
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        return


_STOP = object()  # handed to an idle thread by ``stop``: end


class Pool:
    """Up to ``max_threads`` threads named ``<name>-<n>`` that call ``run(item)`` on each item offered.

    ``run`` must not raise (it catches and logs what it does not expect); an item is
    in flight from ``offer`` until its ``run`` returns. A thread idle for ``idle_s``
    seconds ends (the next item starts a new one).
    """

    def __init__(self, max_threads, run, name="http", idle_s=IDLE_S):
        self._max = max_threads
        self._run = run
        self._name = name
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._idle = []  # the inboxes (SimpleQueue) of the threads waiting for an item, the last freed last
        self._waiting = collections.deque()  # items offered while every thread was busy
        self._in_flight = 0  # items offered and not yet run: at most 2 * max_threads
        self._stopping = False
        self._numbers = itertools.count()  # for the threads' names
        self.threads = []  # the threads alive (started and not ended)

    def offer(self, item):
        """Hand ``item`` to a free thread, starting one if none is; return False if the pool is full.

        Full: every thread busy and as many items waiting.
        """
        with self._lock:
            if self._stopping or self._in_flight >= 2 * self._max:
                return False
            self._in_flight += 1
            if self._idle:
                self._idle.pop().put(item)  # the thread freed last: its stack and caches are warm
                return True
            if len(self.threads) >= self._max:
                self._waiting.append(item)
                return True
            thread = threading.Thread(target=self._loop, args=(item,), name=f"{self._name}-{next(self._numbers)}",
                                      daemon=True)
            self.threads.append(thread)
        thread.start()
        return True

    def stop(self, timeout, clock):
        """Let the items already offered run, then end every thread; wait until ``clock()`` reaches ``timeout``.

        ``timeout`` is a time of ``clock``. Return True if every thread ended in time.
        """
        with self._lock:
            self._stopping = True
            while self._idle:
                self._idle.pop().put(_STOP)
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, timeout - clock()))
        return not any(t.is_alive() for t in threads)

    def _loop(self, item):
        name_native_thread(threading.current_thread().name)
        inbox = queue.SimpleQueue()
        while item is not _STOP:
            try:
                self._run(item)
            except BaseException:  # run broke its contract: this thread ends, the pool stays whole
                with self._lock:
                    self._in_flight -= 1
                    self.threads.remove(threading.current_thread())
                raise
            item = self._next(inbox)
        with self._lock:
            self.threads.remove(threading.current_thread())

    def _next(self, inbox):
        """Return this thread's next item once its last one has run, or _STOP when it is to end."""
        with self._lock:
            self._in_flight -= 1
            if self._waiting:
                return self._waiting.popleft()
            if self._stopping:
                return _STOP
            self._idle.append(inbox)
        try:
            return inbox.get(timeout=self._idle_s)
        except queue.Empty:
            pass
        with self._lock:
            if inbox in self._idle:  # no item came: end
                self._idle.remove(inbox)
                return _STOP
        return inbox.get()  # an item was handed over just as the wait ran out
