"""Pool: the HTTP handler threads: a bounded pool, grown as work needs it, that runs what may wait.

``server``'s selector thread hands it items (``offer``); a handler thread runs each
with the callable given at construction and takes the next. At most ``max_threads``
threads, started one at a time when an item finds none free (an idle service holds
only the threads it has needed), and at most ``max_threads`` items waiting for them:
``offer`` says no beyond that, and the caller answers 503. It knows nothing of HTTP.
Thread-safe: ``offer`` is called by one thread (the selector's), the counts are
guarded by one lock.
"""

import queue
import threading

__all__ = ["Pool", "name_native_thread"]


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


class Pool:
    """Up to ``max_threads`` threads named ``<name>-<n>`` that call ``run(item)`` on each item offered.

    ``run`` must not raise (it catches and logs what it does not expect); an item is
    in flight from ``offer`` until its ``run`` returns.
    """

    def __init__(self, max_threads, run, name="http"):
        self._max = max_threads
        self._run = run
        self._name = name
        self._work = queue.SimpleQueue()  # items for the threads, bounded by _in_flight
        self._lock = threading.Lock()
        self._in_flight = 0  # items offered and not yet run: at most 2 * max_threads
        # Threads free for the next item, less the items queued for them (guarded by _lock):
        # the pool grows, up to max_threads, when it goes below zero.
        self._idle = 0
        self.threads = []  # the threads started, in order

    def offer(self, item):
        """Queue ``item`` for a thread, starting one if none is free; return False if the pool is full.

        Full: every thread busy and as many items waiting.
        """
        with self._lock:
            if self._in_flight >= 2 * self._max:
                return False
            self._in_flight += 1
            self._idle -= 1  # below zero: no thread is free for this item
            grow = self._idle < 0 and len(self.threads) < self._max
        self._work.put(item)
        if grow:
            thread = threading.Thread(target=self._loop, name=f"{self._name}-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            thread.start()
        return True

    def stop(self, timeout, clock):
        """Let the items already queued run, then end every thread; wait until ``clock()`` reaches ``timeout``.

        ``timeout`` is a time of ``clock``. Return True if every thread ended in time.
        """
        for _ in self.threads:
            self._work.put(None)  # after the items already queued
        for thread in self.threads:
            thread.join(max(0.0, timeout - clock()))
        return not any(t.is_alive() for t in self.threads)

    def _loop(self):
        name_native_thread(threading.current_thread().name)
        while True:
            with self._lock:
                self._idle += 1
            item = self._work.get()
            if item is None:
                return
            try:
                self._run(item)
            finally:
                with self._lock:
                    self._in_flight -= 1
