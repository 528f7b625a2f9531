"""Transfers: send the transfers queued in the store through ``bank``, exactly once each.

The protocol for one transfer, keyed by its ``external_id``:

1. ``claim``: ``pending`` -> ``sending`` is committed before the create call.
2. ``create`` answered: record Stark Bank's id and status (``created``); this is not
   success yet: ``transfer`` events (or a later pull) bring ``success`` or ``failed``.
3. No answer (timeout, 5xx, connection error): the call may have reached Stark Bank.
   Look the transfer up by its tag (the external id is one of its tags). Found:
   record it. Not found: back to ``pending`` with exponential backoff and jitter;
   the retry uses the same external id, which Stark Bank refuses to repeat, so even
   a lookup that missed cannot turn into a second transfer.
4. Refused (4xx): look it up the same way (a refused duplicate external id means it
   exists); otherwise record ``rejected`` with Stark Bank's error codes. Not retried.
5. After ``MAX_TRIES`` unanswered tries it is ``stalled``: logged loudly, shown as
   pending in the status, and tried again at the next start-up.

Batches: the transfers due go out together, up to ``bank.MAX_PER_CALL`` in one create
call, each with its own external id and tags; whatever its attempt number, a ``pending``
row is sent the same way. All of the batch is claimed in one transaction (1.), and an
answer is recorded in one. Stark Bank creates all of a call or none, so a refused (4xx)
batch made nothing: its transfers are then sent one per call, which isolates the one(s)
refused (4.) while the others go. An unanswered batch (3.) is settled transfer by
transfer, each looked up by its tag; once a lookup goes unanswered too, the rest are
retried without one (their external ids make that safe). When the service stops during
that one-by-one work, what is left goes back to ``pending``.

A crash between 1 and 2 leaves ``sending``, held under a lease: once it expires,
``take_over`` (at start-up, and on every pass of any instance) settles those by lookup.
A claim is ended (retry, stall, reject) only by the instance that holds it. A transfer log that arrives while no Stark Bank id is recorded cannot be
compared with ours (another workspace may use our external id): ``settle_by_lookup``
finds our own transfer by tag first. The states and the moves allowed between
them are ``transfer_states``'s table. Called from the worker's thread only.
"""

import datetime
import logging
import random

from .bank import MAX_PER_CALL
from .errors import BankRejected, BankUnavailable
from .metrics import Counters
from .timing import backoff

__all__ = ["Sender", "MAX_TRIES"]

logger = logging.getLogger(__name__)

MAX_TRIES = 8  # create calls per transfer before it stalls
BASE_BACKOFF_S = 2.0  # first wait after an unanswered call; doubles per try
MAX_BACKOFF_S = 300.0


def transfer_tags(instance_tag, invoice_id, external_id):
    """Return the tags of a transfer: deployment, invoice, and its own external id (to find it again)."""
    return [instance_tag, f"invoice-{invoice_id}", external_id]


class Sender:
    """Sends due transfers and settles ambiguous ones. See the module docstring."""

    def __init__(self, store, bank, instance_tag, clock, rng=None, base_backoff_s=BASE_BACKOFF_S, counters=None):
        self._store = store
        self._bank = bank
        self._tag = instance_tag
        self._clock = clock  # () -> aware UTC datetime
        self._rng = rng or random.Random()
        self._base_backoff_s = base_backoff_s
        self._counters = counters or Counters()  # create calls by result, for the metrics

    def recover(self):
        """Settle transfers left ``sending`` by a crash, and requeue ``stalled`` ones. Return how many."""
        requeued = self._store.requeue_transfers(("stalled",), self._clock())
        for ext in requeued:
            logger.info("transfer %s: stalled before the restart, trying again", ext)
        return len(requeued) + self.take_over()

    def take_over(self, stopping=lambda: False):
        """Settle the transfers whose sender stopped during the create call; return how many.

        Those are ``sending`` claims whose lease expired: this instance's before a
        restart, or another instance's that died (``Store.take_over_transfers``). Each is
        looked up at Stark Bank by its external id first; only one not found is sent
        again, under the same external id.
        """
        taken = self._store.take_over_transfers(self._clock())
        for transfer in taken:
            logger.info("transfer %s: the service stopped during its create call; settling it", transfer.external_id)
        self._settle_batch(taken, BankUnavailable("interrupted: its sender stopped"), stopping)
        return len(taken)

    def settle_by_lookup(self, transfer):
        """Look a transfer without a recorded Stark Bank id up by its tag; return True if found.

        Found: its id and status are recorded, as after a create answer (a pending
        retry is then not sent). Not found: nothing changes. Raise BankUnavailable if
        Stark Bank does not answer. Used before a transfer log can be compared with
        our id.
        """
        found = self._bank.find_transfer(transfer.external_id)
        if found is None:
            return False
        self._store.transfer_created(transfer.external_id, found["id"], found["status"], self._clock())
        logger.info("transfer %s: found at Stark Bank as %s (%s)", transfer.external_id, found["id"], found["status"])
        return True

    def send_due(self, limit=MAX_PER_CALL, stopping=lambda: False):
        """Send up to ``limit`` due transfers in one create call; return how many were claimed.

        See "Batches" in the module docstring. ``stopping()`` True ends the 400
        fallback and the lookups early: what is left goes back to ``pending``.
        """
        batch = self._store.claim_due_transfers(self._clock(), limit)
        if len(batch) == 1:
            self._send(batch[0])
        elif batch:
            self._send_batch(batch, stopping)
        return len(batch)

    def _send(self, transfer):
        tags = transfer_tags(self._tag, transfer.invoice_id, transfer.external_id)
        try:
            created = self._bank.create_transfer(transfer.amount, transfer.external_id, tags)
        except (BankUnavailable, BankRejected) as e:
            self._count("rejected" if isinstance(e, BankRejected) else "unavailable")
            self._settle(transfer, e)
            return
        self._count("created")
        self._record_created([transfer], [created])

    def _send_batch(self, batch, stopping):
        items = [(t.amount, t.external_id, transfer_tags(self._tag, t.invoice_id, t.external_id)) for t in batch]
        try:
            created = self._bank.create_transfers(items)
        except BankRejected as e:
            self._count("rejected")
            # All or none: nothing was made. One call each isolates the transfer(s) refused.
            logger.warning("a batch of %d transfers was refused (%s); sending them one per call", len(batch), e)
            for n, transfer in enumerate(batch):
                if stopping():
                    self._requeue(batch[n:], e)
                    return
                self._send(transfer)
            return
        except BankUnavailable as e:
            self._count("unavailable")
            self._settle_batch(batch, e, stopping)
            return
        self._count("created")
        self._record_created(batch, created)

    def _settle_batch(self, batch, error, stopping):
        """Settle each transfer of an unanswered batch by lookup; once lookups fail, retry the rest unlooked.

        Those retried are due again at one time drawn for all of them, so they go out as one batch again.
        """
        if not batch:
            return
        delay = backoff(max(t.tries for t in batch), self._base_backoff_s, MAX_BACKOFF_S, self._rng)
        retry_at = self._clock() + datetime.timedelta(seconds=delay)
        lookups = True
        for n, transfer in enumerate(batch):
            if stopping():
                self._requeue(batch[n:], error)
                return
            lookups = self._settle(transfer, error, lookup=lookups, retry_at=retry_at) and lookups

    def _requeue(self, transfers, error):
        """Put claimed transfers back to ``pending``, due now (same external ids: idempotent)."""
        now = self._clock()
        with self._store.atomic():
            for transfer in transfers:
                self._store.retry_transfer(transfer.external_id, [("", str(error))], now, now)
        logger.info("%d transfers put back to pending, unsettled, as the service stops", len(transfers))

    def _count(self, result):
        """Count one create call (of one transfer or a batch) by its result, for the metrics."""
        self._counters.add("stark_challenge_transfer_api_calls_total", (("result", result),))

    def _record_created(self, transfers, created):
        """Record a create answer (``created``: dicts listed in the order of ``transfers``) in one commit.

        Then log one line per transfer, with the credit it forwards (the credits of
        the whole answer read at once).
        """
        self._store.transfers_created(
            [(t.external_id, made["id"], made["status"]) for t, made in zip(transfers, created)], self._clock()
        )
        credits = self._store.credits({t.invoice_id for t in transfers})
        for transfer, made in zip(transfers, created):
            credit = credits[transfer.invoice_id]
            logger.info(
                "transfer sent: invoice %s, amount %d, fee %d, transfer %d cents, external id %s, Stark Bank id %s",
                transfer.invoice_id, credit["amount"], credit["fee"], transfer.amount, transfer.external_id, made["id"],
            )

    def _settle(self, transfer, error, lookup=True, retry_at=None):
        """Find out whether an unanswered or refused create call made the transfer; record the answer.

        Return False if Stark Bank did not answer the lookup. ``lookup=False`` skips
        it (Stark Bank just failed to answer one): the transfer is then retried with
        its external id, which Stark Bank refuses to repeat, so this stays safe.
        ``retry_at``: when that retry is due (default: after a backoff drawn for its tries).
        """
        now = self._clock()
        answered = True
        try:
            found = self._bank.find_transfer(transfer.external_id) if lookup else None
        except BankUnavailable as e:
            found, answered = None, False
            error = error if isinstance(error, BankUnavailable) else e
        if found is not None:
            self._store.transfer_created(transfer.external_id, found["id"], found["status"], now)
            logger.info("transfer %s: found at Stark Bank as %s (%s)", transfer.external_id, found["id"], found["status"])
            return answered
        errors = list(error.errors) or [("", str(error))]
        if isinstance(error, BankRejected):
            self._store.reject_transfer(transfer.external_id, errors, now)
            logger.error(
                "TRANSFER REJECTED: %s (invoice %s, %d cents): %s",
                transfer.external_id, transfer.invoice_id, transfer.amount,
                "; ".join(f"{c}: {m}" for c, m in errors),
            )
            return answered
        if transfer.tries >= MAX_TRIES:
            self._store.stall_transfer(transfer.external_id, errors, now)
            logger.error(
                "TRANSFER STALLED: %s (invoice %s) unanswered after %d tries, will retry at next start: %s",
                transfer.external_id, transfer.invoice_id, transfer.tries, error,
            )
            return answered
        if retry_at is None:
            retry_at = now + datetime.timedelta(seconds=backoff(transfer.tries, self._base_backoff_s, MAX_BACKOFF_S,
                                                                self._rng))
        self._store.retry_transfer(transfer.external_id, errors, retry_at, now)
        logger.warning("transfer %s: try %d failed, retrying in %.1f s: %s", transfer.external_id, transfer.tries,
                       max(0.0, (retry_at - now).total_seconds()), error)
        return answered
