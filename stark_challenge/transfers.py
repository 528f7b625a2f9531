"""Transfers: send the transfers queued in the store through ``bank``, and settle every open one, exactly once each.

The protocol for one transfer, keyed by its ``external_id``:

1. ``claim``: ``pending`` -> ``sending`` is committed before the create call, under a
   lease (this sender's ``owner`` id, until ``lease_until``); only the lease holder
   finishes the claim.
2. ``create`` answered: record Stark Bank's id and status (``created``); this is not
   success yet: ``transfer`` events (or a later check) bring ``success`` or ``failed``.
3. No definite answer (timeout, 5xx, connection error): the call may have reached
   Stark Bank, now or later. Look the transfer up by its tag (the external id is one
   of its tags). Found: record it. Not found, or the lookup itself unanswered or
   refused: back to ``pending`` with exponential backoff (capped) and jitter, for as
   long as it takes, sent again under the SAME external id: Stark Bank keeps at most one
   transfer per external id that can move money, whatever landed.
4. Refused (400) because the external id exists: the transfer exists. Look it up;
   not found yet: ``exists``, looked up again with backoff until found, never sent again.
5. Refused (400) for another reason: ``rejected`` with Stark Bank's error codes (final,
   no money moved: a new attempt may follow) when this was the external id's only
   create call; after earlier unanswered calls, one of them may still land, so it is
   sent again under the same external id, as in 3.

A new external id is never made here: only after Stark Bank confirmed an attempt
``failed`` (``confirm_failure``) or ``rejected`` it (``transfer_states.FINAL_UNPAID``).

Batches: the transfers due go out together, up to ``bank.MAX_PER_CALL`` in one create
call, each with its own external id and tags. All of the batch is claimed in one
transaction (1.), and an answer is recorded in one. Stark Bank creates all of a call or
none, so a refused (400) batch made nothing: its transfers are then sent one per call,
which isolates the one(s) refused while the others go. An unanswered batch (3.) is
settled transfer by transfer, each looked up by its tag; once a lookup goes
unanswered, the rest are retried without one (their external ids make that safe).
Errors touch one transfer, never a batch: anything that goes wrong while one is
handled is logged with its external id, and the transfer stays ``sending`` under the
lease, to be settled by lookup once the lease runs out (``check_due``).

``check_due`` settles, from what Stark Bank says, every open transfer due a check:
``sending`` whose lease ran out (by lookup: found, recorded; not found, sent again
under the same external id; never sent blind), ``exists`` (lookup), and ``created`` or
``processing`` quiet for ``check_after_s`` (``transfer.get``; a failure is confirmed
by ``confirm_failure`` before it is final). A transfer Stark Bank does not find yet
stays open ("not yet"), asked again later; the worker's alarm raises it to a person
once it has been open too long. Called from the worker's thread only.
"""

import datetime
import logging
import random

from . import logs, transfer_states, vocabulary
from .bank import MAX_PER_CALL
from .config import LEASE_S
from .errors import BankError, BankRejected, BankUnavailable
from .metrics import Counters
from .report import reais
from .store import DUPLICATE_CODES
from .timing import backoff

__all__ = ["Sender", "is_duplicate"]

logger = logging.getLogger(__name__)

BASE_BACKOFF_S = 2.0  # first wait after an unanswered call; doubles per try
MAX_BACKOFF_S = 30.0  # the longest wait between two tries of one transfer
CHECK_AFTER_S = 120.0  # an open transfer quiet this long is asked about at Stark Bank
CHECK_EVERY_S = 300.0  # and again this often while it stays open
CHECKS_PER_PASS = 50  # checks of open transfers per pass: the rest wait for the next


def is_duplicate(error):
    """Return True if a BankRejected says a transfer with the external id exists (``store.DUPLICATE_CODES``)."""
    return isinstance(error, BankRejected) and any(
        str(code).split(":")[-1].strip() in DUPLICATE_CODES for code, _ in error.errors)


def _errors(error):
    return list(getattr(error, "errors", None) or []) or [("", str(error))]


class Sender:
    """Sends due transfers and settles open ones. See the module docstring."""

    def __init__(self, store, bank, instance_tag, clock, rng=None, base_backoff_s=BASE_BACKOFF_S, counters=None,
                 owner=None, lease_s=LEASE_S, check_after_s=CHECK_AFTER_S, check_every_s=CHECK_EVERY_S):
        self._store = store
        self._bank = bank
        self._tag = instance_tag
        self._clock = clock  # () -> aware UTC datetime
        self._rng = rng or random.Random()
        self._base_backoff_s = base_backoff_s
        self._counters = counters or Counters()  # create calls by result, for the metrics
        self.owner = owner or store.owner  # this sender's name on the claims it holds (host:pid:token)
        self._lease = datetime.timedelta(seconds=lease_s)
        self._check_after = datetime.timedelta(seconds=check_after_s)
        self._check_every = datetime.timedelta(seconds=check_every_s)

    def _later(self, tries):
        return self._clock() + datetime.timedelta(
            seconds=backoff(max(1, tries), self._base_backoff_s, MAX_BACKOFF_S, self._rng))

    # -- sending ------------------------------------------------------------------

    def send_due(self, limit=MAX_PER_CALL, stopping=lambda: False):
        """Send up to ``limit`` due transfers in one create call; return how many were claimed.

        See "Batches" in the module docstring. ``stopping()`` True ends the 400
        fallback and the lookups early: what is left goes back to ``pending``.
        """
        now = self._clock()
        batch = self._store.claim_due_transfers(now, limit, self.owner, now + self._lease)
        if len(batch) == 1:
            self._one(batch[0], self._send)
        elif batch:
            try:
                self._send_batch(batch, stopping)
            except Exception:  # left sending under our lease: settled by lookup once it runs out
                logger.exception("a batch of %d transfers: handling failed; each is settled by lookup after its lease",
                                 len(batch))
        return len(batch)

    def _one(self, transfer, step, *args):
        """Run ``step(transfer, *args)``; an error is logged for this transfer only. Return its result, or None."""
        try:
            return step(transfer, *args)
        except Exception:  # one transfer's error never stops the others
            logger.exception("transfer %s: handling failed; it is settled by lookup once its lease runs out",
                             transfer.external_id)
            return None

    def _send(self, transfer):
        tags = vocabulary.transfer_tags(self._tag, transfer.invoice_id, transfer.external_id)
        try:
            created = self._bank.create_transfer(transfer.amount, transfer.external_id, tags)
        except BankError as e:
            self._count("rejected" if isinstance(e, BankRejected) else "unavailable")
            self._settle(transfer, e)
            return
        self._count("created")
        self._record_created([transfer], [created])

    def _send_batch(self, batch, stopping):
        items = [(t.amount, t.external_id, vocabulary.transfer_tags(self._tag, t.invoice_id, t.external_id))
                 for t in batch]
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
                self._one(transfer, self._send)
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
        retry_at = self._later(max(t.tries for t in batch))
        lookups = True
        for n, transfer in enumerate(batch):
            if stopping():
                self._requeue(batch[n:], error)
                return
            answered = self._one(transfer, self._settle, error, lookups, retry_at)
            lookups = lookups and answered is not False

    def _requeue(self, transfers, error):
        """Put claimed transfers back to ``pending``, due now (same external ids: idempotent)."""
        now = self._clock()
        with self._store.atomic():
            for transfer in transfers:
                self._store.retry_transfer(transfer.external_id, _errors(error), now, now, owner=self.owner)
        logger.info("%d transfers put back to pending, unsettled, as the service stops", len(transfers))

    def _count(self, result):
        """Count one create call (of one transfer or a batch) by its result, for the metrics."""
        self._counters.add("stark_challenge_transfer_api_calls_total", (("result", result),))

    def _record_created(self, transfers, created):
        """Record a create answer (``created``: dicts listed in the order of ``transfers``) in one commit.

        Then log one line per transfer recorded, with the credit it forwards (the
        credits of the whole answer read at once).
        """
        now = self._clock()
        recorded = set(self._store.transfers_created(
            [(t.external_id, made["id"], made["status"]) for t, made in zip(transfers, created)], now,
            now + self._check_after, owner=self.owner))
        credits = self._store.credits({t.invoice_id for t in transfers})
        for transfer, made in zip(transfers, created):
            if transfer.external_id not in recorded:
                logger.warning("transfer %s: created as %s, but our claim was taken over meanwhile; the lookup "
                               "that settles it records it", transfer.external_id, made["id"])
                continue
            credit = credits[transfer.invoice_id]
            # One line per credit forwarded, in 120 columns: the ids and cents are its fields.
            logger.info(
                "invoice %s: %s - %s fee = %s, transfer %s", transfer.invoice_id, reais(credit["amount"]),
                reais(credit["fee"]), reais(transfer.amount), made["id"],
                extra=logs.fields(invoice_id=transfer.invoice_id, transfer_id=made["id"],
                                  external_id=transfer.external_id, amount_cents=credit["amount"],
                                  fee_cents=credit["fee"], net_cents=transfer.amount),
            )

    def _settle(self, transfer, error, lookup=True, retry_at=None):
        """Find out whether a create call without a definite answer, or refused, made the transfer; record it.

        Return False if Stark Bank did not answer the lookup. ``lookup=False`` skips
        it (Stark Bank just failed to answer one): the transfer is then sent again under
        its external id, which stays safe. ``retry_at``: when that try is due
        (default: after a backoff drawn for its tries). See the module docstring, 3-5.
        """
        now = self._clock()
        answered = True
        found = None
        if lookup:
            try:
                found = self._bank.find_transfer(transfer.external_id)
            except BankError as e:
                answered = False
                logger.warning("transfer %s: lookup by tag failed: %s", transfer.external_id, e)
        if found is not None:
            self._record_found(transfer, found, owner=self.owner)
            return answered
        errors = _errors(error)
        if is_duplicate(error):
            self._store.settle_transfer(transfer.external_id, "exists", errors, now, owner=self.owner,
                                        next_try_at=self._later(1))
            logger.warning("transfer %s: Stark Bank says its external id exists; looking it up until found, "
                           "never sent again", transfer.external_id)
            return answered
        if isinstance(error, BankRejected) and transfer.tries <= 1:
            self._store.settle_transfer(transfer.external_id, "rejected", errors, now, owner=self.owner)
            logger.error(
                "TRANSFER REJECTED: %s (invoice %s, %s): %s",
                transfer.external_id, transfer.invoice_id, reais(transfer.amount),
                "; ".join(f"{c}: {m}" for c, m in errors),
                extra=logs.fields(invoice_id=transfer.invoice_id, external_id=transfer.external_id,
                                  amount_cents=transfer.amount),
            )
            return answered
        retry_at = retry_at or self._later(transfer.tries)
        self._store.retry_transfer(transfer.external_id, errors, retry_at, now, owner=self.owner)
        logger.warning("transfer %s: try %d got no definite answer, sending it again under the same external id "
                       "in %.1f s: %s", transfer.external_id, transfer.tries,
                       max(0.0, (retry_at - now).total_seconds()), error)
        return answered

    def _record_found(self, transfer, found, owner=None):
        recorded = self._store.transfer_created(transfer.external_id, found["id"], found["status"], self._clock(),
                                                self._clock() + self._check_after, owner=owner)
        if recorded:
            logger.info("transfer %s: found at Stark Bank as %s (%s)", transfer.external_id, found["id"],
                        found["status"])
        return recorded

    # -- settling open transfers ----------------------------------------------------

    def lookup(self, transfer):
        """Look a transfer without a recorded Stark Bank id up by its tag; return True if found and recorded.

        Not found: nothing changes. Raise BankError if Stark Bank does not answer.
        Used before a transfer log can be compared with our id.
        """
        found = self._bank.find_transfer(transfer.external_id)
        return found is not None and self._record_found(transfer, found)

    def recover(self):
        """Settle transfers a stopped process left ``sending``, at once; return how many were asked about.

        On a SQLite file one process runs (the file's lock), so the leases found at
        start-up are those of a process that is gone: taken over at once. On
        PostgreSQL another instance may hold them now: only those whose lease ran out
        are taken over, here or by ``check_due`` on a later pass.
        """
        force = self._store.backend == "sqlite"
        sending = self._store.transfers(states=("sending",))
        return sum(1 for t in sending if self._check(t, force=force) is not None)

    def check_due(self, limit=CHECKS_PER_PASS, states=("sending", "exists", "created", "processing")):
        """Ask Stark Bank about up to ``limit`` open transfers in ``states`` due a check; return how many.

        See the module docstring.
        """
        due = self._store.transfers_to_check(self._clock(), limit, states)
        for transfer in due:
            self._one(transfer, self._check)
        return len(due)

    def _check(self, transfer, force=False):
        now = self._clock()
        if transfer.state == "sending":
            if not self._store.take_over(transfer.external_id, now, self.owner, now + self._lease,
                                         expired_only=not force):
                return None
            logger.info("transfer %s: the service stopped during its create call (its claim is taken over); "
                        "settling it by lookup", transfer.external_id)
            return self._settle_claim(transfer)
        if transfer.transfer_id is None:  # exists: the lookup until found
            try:
                if self.lookup(transfer):
                    return True
                error = [("", "Stark Bank lists no transfer with this external id yet")]
            except BankError as e:
                error = _errors(e)
            self._store.note_check(transfer.external_id, error, self._later(transfer.tries + 1), now)
            return False
        return self._check_created(transfer)

    def _settle_claim(self, transfer):
        """Settle a claim whose lease ran out, by lookup; never send it blind."""
        now = self._clock()
        try:
            found = self._bank.find_transfer(transfer.external_id)
        except BankError as e:
            logger.warning("transfer %s: lookup of an expired claim failed (%s); asking again after the lease",
                           transfer.external_id, e)
            self._store.note_check(transfer.external_id, _errors(e), now, now)
            return False
        if found is not None:
            return self._record_found(transfer, found, owner=self.owner)
        self._store.retry_transfer(transfer.external_id, [("", "lease ran out; not found at Stark Bank")], now, now,
                                   owner=self.owner)
        logger.warning("transfer %s: its claim's lease ran out and Stark Bank lists no transfer with its external id; "
                       "sending it again under the same external id", transfer.external_id)
        return True

    def _check_created(self, transfer):
        """Ask Stark Bank (``transfer.get``) about a transfer it made and record what it says."""
        now = self._clock()
        try:
            found = self._bank.get("transfer", transfer.transfer_id)
            status = found and found["status"]
            if status == "failed":
                status = self.confirm_failure(found)
        except BankError as e:
            self._store.note_check(transfer.external_id, _errors(e), self._later(2), now)
            return False
        if status is None:  # not found (yet), or a failure not confirmed yet
            self._store.note_check(transfer.external_id, [("", "Stark Bank does not confirm its state yet")],
                                   now + self._check_every, now)
            return False
        current = self._store.transfer(transfer.external_id)
        retry_id = vocabulary.external_id(self._tag, transfer.invoice_id, 2)
        updated = self._store.apply_transfer_status(
            transfer.external_id, current.transfer_id, status, [], now, retry_external_id=retry_id,
            confirmed_failed=status == "failed", check_at=now + self._check_every)
        if updated is not None and updated.state != transfer.state:
            logger.info("transfer %s: Stark Bank reports it %s (checked)", transfer.external_id, updated.state)
            if updated.state == "failed":
                logger.error("TRANSFER FAILED: %s (invoice %s, %s) failed at Stark Bank%s", transfer.external_id,
                             transfer.invoice_id, reais(transfer.amount),
                             " and queued once more as " + retry_id if transfer.attempt == 1 else "; no attempt left",
                             extra=logs.fields(invoice_id=transfer.invoice_id, external_id=transfer.external_id,
                                               transfer_id=current.transfer_id, amount_cents=transfer.amount))
        return True

    def confirm_failure(self, failed):
        """Return 'failed' if Stark Bank's failed transfer ``failed`` is final and moved no money for its invoice.

        Else the status our row now follows (another transfer under our external id), or
        None: not confirmed (yet).
        A create sent again after no answer can make a second transfer under the same
        external id, which Stark Bank then fails as a duplicate while the first one goes
        through. So every transfer of the invoice (by its tag, our workspace only) is
        listed: one that is created, processing or paid is the one our row follows (if
        it carries our external id), and nothing is sent again. The listing must show
        the failed transfer itself, or it lags the writes and proves nothing yet.
        """
        names = [failed.get("external_id"), *(failed.get("tags") or [])]
        rows = [self._store.transfer(name) for name in names if isinstance(name, str) and name]
        ours = next((row for row in rows if row is not None and row.transfer_id == failed["id"]), None)
        if ours is None:
            return "failed"
        listed = self._bank.find_transfers(vocabulary.invoice_tag(ours.invoice_id))
        if not any(t["id"] == failed["id"] for t in listed):
            logger.warning("transfer %s: %s failed, but Stark Bank's listing does not show it yet; checked again later",
                           ours.external_id, failed["id"])
            return None
        for other in listed:
            if other["id"] != failed["id"] and other["status"] in transfer_states.MOVING:
                logger.warning("transfer %s: %s failed, but transfer %s (%s) of invoice %s is %s; not sent again",
                               ours.external_id, failed["id"], other["id"], other["external_id"], ours.invoice_id,
                               other["status"])
                if other["external_id"] != ours.external_id:
                    return None  # another attempt moves money: a person looks (the open transfer's alarm)
                self._store.transfer_created(ours.external_id, other["id"], other["status"], self._clock(),
                                             self._clock() + self._check_after)
                return other["status"]
        return "failed"
