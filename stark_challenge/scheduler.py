"""Schedule: run a job for each round of a fixed-rate window, from a ``threading.Timer`` loop.

Usage::

    schedule = Schedule(store, job=invoicer.issue_round, interval_s=3 * 3600, duration_s=86400)
    schedule.start()      # round 0 now, then one every interval, in a Timer thread
    ...
    schedule.stop()

Rounds: round ``n`` is due at ``started_at + n * interval`` (fixed rate, anchored to
round 0, so there is no drift), and the rounds are those with ``n * interval <
duration`` (3 h over 24 h: 8 rounds); ``duration`` 0 means forever. ``started_at``,
the interval and the duration are written to the store by the first start and read
back by every restart, so a restart never opens a new window. If the configuration
changed since, the stored values win and a warning says so.

Missed rounds: a round that came due while the service was down is run at the next
start, late, once. It is intended behaviour that no round is skipped: each round is
a separate batch of invoices the operator expects. What a round's job has settled
(issued, or given up after its bounded retries) is never run again.

The job is ``job(n, due_at) -> Outcome`` (see ``invoicer``): ``retry_at`` asks to be
called again then. An exception from the job is logged and the round is tried again
a minute later; the loop keeps running.

Threads: ``run_due`` is what the Timer calls; tests call it directly with a fake
clock. One lock serialises ``run_due`` and ``stop``, so ``stop`` waits for the round
in progress to finish.
"""

import datetime
import logging
import math
import threading
import uuid

from .timing import utcnow

__all__ = ["Schedule", "open_window", "round_count"]

logger = logging.getLogger(__name__)

# After an unexpected error in a round, wait this long before trying it again.
ERROR_RETRY_S = 60.0


def round_count(interval_s, duration_s):
    """Return how many rounds a window has (n with n * interval < duration), or None if endless."""
    if not duration_s:
        return None
    return max(1, math.ceil(duration_s / interval_s))


def open_window(store, interval_s, duration_s, clock=utcnow):
    """Return the stored window (schedule_id, started_at, interval_s, duration_s), recording it on the first start.

    Its clock starts now on the first call for a database, and never again: a restart
    reads the window back. If the configuration changed since, the stored values win
    and a warning says so. Call it once the service is listening, so that a start
    that fails opens no window.
    """
    stored = store.start_schedule(uuid.uuid4().hex[:8], clock(), interval_s, duration_s)
    if (stored["interval_s"], stored["duration_s"]) != (interval_s, duration_s):
        logger.warning(
            "schedule started %s with interval %g s and duration %g s; the configured"
            " values are ignored until the database is reset",
            stored["started_at"].isoformat(), stored["interval_s"], stored["duration_s"],
        )
    return stored


class Schedule:
    """Rounds on a fixed-rate clock, remembered in the store. See the module docstring."""

    def __init__(self, store, job, interval_s, duration_s, clock=utcnow, timer=threading.Timer, window=None):
        self._store = store
        self._job = job  # (n, due_at) -> Outcome with .retry_at
        self._interval_s = interval_s  # as configured; the stored value wins
        self._duration_s = duration_s
        self._clock = clock  # () -> aware UTC datetime
        self._timer_factory = timer
        self._lock = threading.Lock()  # held while rounds run; stop() waits on it
        self._timer = None  # the armed threading.Timer, if any
        self._stopped = False
        self._finished = False  # every round of the window is settled
        self._retry = {}  # n -> datetime: rounds waiting for a retry, from their Outcome
        self.window = window  # the stored schedule dict, once opened (``open_window``)
        self.next_run_at = None  # when the Timer fires next, for /health

    def open(self):
        """Read the window from the store, recording it first if this is the first start.

        Return the window dict (schedule_id, started_at, interval_s, duration_s).
        Idempotent.
        """
        if self.window is None:
            self.window = open_window(self._store, self._interval_s, self._duration_s, self._clock)
        return self.window

    def due_at(self, n):
        """Return when round ``n`` is due (aware UTC)."""
        w = self.open()
        return w["started_at"] + datetime.timedelta(seconds=n * w["interval_s"])

    def total_rounds(self):
        """Return the number of rounds in the window, or None if it is endless."""
        w = self.open()
        return round_count(w["interval_s"], w["duration_s"])

    def run_due(self):
        """Run the job for every round that is due and not settled; return when to run next.

        Return None when every round of the window is settled. Thread-safe;
        exceptions from the job are logged, never raised.
        """
        with self._lock:
            if self._stopped:
                return None
            return self._run_due()

    def _run_due(self):
        self.open()
        now = self._clock()
        total = self.total_rounds()
        elapsed = (now - self.window["started_at"]).total_seconds()
        last_due = int(elapsed // self.window["interval_s"]) if elapsed >= 0 else -1
        if total is not None:
            last_due = min(last_due, total - 1)
        settled = {r.n for r in self._store.rounds() if r.state in ("issued", "failed")}
        wake = []
        for n in range(last_due + 1):
            if n in settled or self._stopped:
                continue
            retry_at = self._retry.get(n)
            if retry_at is not None and retry_at > now:
                wake.append(retry_at)
                continue
            try:
                outcome = self._job(n, self.due_at(n))
                retry_at = outcome.retry_at
            except Exception:
                logger.exception("round %d: unexpected error; trying again in %.0f s", n, ERROR_RETRY_S)
                retry_at = now + datetime.timedelta(seconds=ERROR_RETRY_S)
            if retry_at is not None:
                self._retry[n] = retry_at
                wake.append(retry_at)
            else:
                self._retry.pop(n, None)
        if total is None or last_due + 1 < total:
            wake.append(self.due_at(last_due + 1))
        return min(wake) if wake else None

    def start(self):
        """Run what is due now and then every round as it comes due, in a Timer thread, until ``stop``.

        Returns at once: the first round runs in the Timer thread, not the caller's.
        """
        with self._lock:
            self._arm(0.0)

    def _arm(self, delay):
        self._timer = self._timer_factory(delay, self._tick)
        self._timer.daemon = True
        self._timer.name = "schedule"
        self._timer.start()

    def _tick(self):
        try:
            next_at = self.run_due()
        except Exception:  # the store itself failed: keep the loop alive, try again later
            logger.exception("schedule: unexpected error; trying again in %.0f s", ERROR_RETRY_S)
            next_at = self._clock() + datetime.timedelta(seconds=ERROR_RETRY_S)
        with self._lock:
            self.next_run_at = next_at
            if self._stopped:
                return
            if next_at is None:
                self._finished = True
                logger.info("schedule finished: every round of the window is settled")
                return
            self._arm(max(0.0, (next_at - self._clock()).total_seconds()))

    def stop(self, timeout=None):
        """Cancel the timer and wait for a round in progress to finish. Idempotent."""
        acquired = self._lock.acquire(timeout=-1 if timeout is None else timeout)
        try:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
        finally:
            if acquired:
                self._lock.release()

    def state(self):
        """Return a dict describing the schedule, for /health."""
        if self.window is None:
            return {"state": "not started"}
        total = self.total_rounds()
        issued = sum(1 for r in self._store.rounds() if r.state == "issued")
        if self._stopped:
            state = "stopped"
        elif self._finished:
            state = "finished"
        else:
            state = "running"
        return {
            "state": state,
            "started_at": self.window["started_at"].isoformat(),
            "interval_s": self.window["interval_s"],
            "rounds_total": total,
            "rounds_issued": issued,
            "next_run_at": self.next_run_at.isoformat() if self.next_run_at else None,
        }
