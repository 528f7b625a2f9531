"""One background thread that runs callables at given delays: the emulator's clock work.

Invoice payments and transfer steps are scheduled here instead of on one
`threading.Timer` each, so that `stop` can end them all at once and the set of pending
work is visible. Callables run one at a time on the timer thread and must be quick;
anything slow (network) must start its own thread. A callable that raises is logged and
the others still run. Times are `time.monotonic` seconds.
"""

import heapq
import itertools
import logging
import threading
import time

__all__ = ["Timers"]

logger = logging.getLogger(__name__)


class Timers:
    """A queue of (due time, callable) served by one daemon thread; thread-safe."""

    def __init__(self, name="emulator-timers"):
        self._name = name
        self._queue = []  # heap of (due, sequence, quiet, func, args)
        self._sequence = itertools.count()  # breaks ties so funcs are never compared
        self._wakeup = threading.Condition()
        self._stopped = False
        self._running = 0  # 1 while a popped call is executing
        self._quiet = 0  # calls in the queue that pending() does not count
        self._thread = None

    def start(self):
        """Start the timer thread; return self."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def call_later(self, delay_s, func, *args, quiet=False):
        """Run func(*args) on the timer thread after delay_s seconds; ignored once stopped.

        A quiet call is a far-off date (a transfer scheduled days ahead, an invoice's
        due date), not work in progress: `pending` does not count it.
        """
        with self._wakeup:
            if self._stopped:
                return
            heapq.heappush(self._queue, (time.monotonic() + delay_s, next(self._sequence), quiet, func, args))
            self._quiet += quiet
            self._wakeup.notify()

    def pending(self):
        """Return how many calls (quiet ones aside) are waiting or running."""
        with self._wakeup:
            return len(self._queue) - self._quiet + self._running

    def stop(self, timeout_s=5.0):
        """Drop pending calls, end the thread and join it; idempotent."""
        with self._wakeup:
            self._stopped = True
            self._queue.clear()
            self._quiet = 0
            self._wakeup.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self):
        while True:
            with self._wakeup:
                while not self._stopped:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    self._wakeup.wait(self._queue[0][0] - now if self._queue else None)
                if self._stopped:
                    return
                _, _, quiet, func, args = heapq.heappop(self._queue)
                self._quiet -= quiet
                self._running = 1
            try:
                func(*args)
            except Exception:
                logger.exception("emulator timer call %r failed", func)
            finally:
                with self._wakeup:
                    self._running = 0
