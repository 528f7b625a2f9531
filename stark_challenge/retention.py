"""Retention: received events are deleted once older than ``EVENT_RETENTION``, a small batch at a time.

Every event the service receives is stored (the body too, for whoever investigates), so
without a bound the database grows with the traffic for ever. ``Retention.run_if_due``,
called by the worker on each pass, deletes the processed events received more than
``keep_s`` ago (``Store.prune_events``): at most every ``EVERY_S`` seconds, in batches
of ``store.PRUNE_BATCH`` rows, one short transaction each, and at most ``MAX_BATCHES``
batches per call; while batches come full it is due again at once, so a backlog is
worked off over the worker's next passes without holding it up in any one of them.
SQLite reuses the pages freed, so under steady traffic the file stops growing once the
oldest events are ``keep_s`` old.

What it never deletes: an event not yet processed, and any row of the money's record
(rounds, invoices, credits, transfers). A redelivery of a deleted event (Stark Bank
stops retrying after a few hours, far inside any sensible retention) would be stored
and processed again, and moves nothing twice: a credit is keyed by its invoice.

Threads: called from the worker thread only; holds no lock of its own.
"""

import datetime
import logging

from .store import PRUNE_BATCH

__all__ = ["Retention", "EVERY_S", "MAX_BATCHES"]

logger = logging.getLogger(__name__)

EVERY_S = 60.0  # how often old events are looked for (one indexed query), when the last run left none behind
MAX_BATCHES = 20  # batches per run: at most MAX_BATCHES * PRUNE_BATCH events per worker pass


class Retention:
    """Deletes events older than ``keep_s`` (0: never) from ``store``; see the module docstring."""

    def __init__(self, store, keep_s, clock):
        self._store = store
        self._keep = datetime.timedelta(seconds=keep_s) if keep_s else None
        self._clock = clock  # () -> aware UTC datetime
        self._next_at = None  # None: due at the first call
        self.deleted = 0  # events deleted since start, for the log and tests

    def run_if_due(self):
        """Delete a few batches of old events if a run is due; return how many were deleted."""
        if self._keep is None:
            return 0
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            return 0
        before = now - self._keep
        deleted, full = 0, True
        for _ in range(MAX_BATCHES):
            count = self._store.prune_events(before, PRUNE_BATCH)
            deleted += count
            full = count == PRUNE_BATCH
            if not full:
                break
        # More may be left when the last batch came full: due again at the next pass.
        self._next_at = now if full else now + datetime.timedelta(seconds=EVERY_S)
        if deleted:
            self.deleted += deleted
            logger.info("retention: deleted %d events received before %s%s", deleted,
                        before.isoformat(timespec="seconds"), " (more to come)" if full else "")
        return deleted
