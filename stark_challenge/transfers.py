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

A crash between 1 and 2 leaves ``sending``: ``recover`` settles those by lookup at
start-up. A transfer log that arrives while no Stark Bank id is recorded cannot be
compared with ours (another workspace may use our external id): ``settle_by_lookup``
finds our own transfer by tag first. The states and the moves allowed between
them are ``transfer_states``'s table. Called from the worker's thread only.
"""

import datetime
import logging
import random

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
        now = self._clock()
        requeued = self._store.requeue_transfers(("stalled",), now)
        for ext in requeued:
            logger.info("transfer %s: stalled before the restart, trying again", ext)
        sending = self._store.transfers(states=("sending",))
        for transfer in sending:
            logger.info("transfer %s: the service stopped during its create call; settling it", transfer.external_id)
            self._settle(transfer, BankUnavailable("interrupted by a restart"))
        return len(requeued) + len(sending)

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

    def send_due(self, limit=100):
        """Send up to ``limit`` transfers that are due; return how many calls were made."""
        sent = 0
        for transfer in self._store.due_transfers(self._clock(), limit):
            if not self._store.claim_transfer(transfer.external_id, self._clock()):
                continue
            self._send(transfer._replace(tries=transfer.tries + 1))
            sent += 1
        return sent

    def _send(self, transfer):
        tags = transfer_tags(self._tag, transfer.invoice_id, transfer.external_id)
        try:
            created = self._bank.create_transfer(transfer.amount, transfer.external_id, tags)
        except (BankUnavailable, BankRejected) as e:
            result = "rejected" if isinstance(e, BankRejected) else "unavailable"
            self._counters.add("stark_challenge_transfer_api_calls_total", (("result", result),))
            self._settle(transfer, e)
            return
        self._counters.add("stark_challenge_transfer_api_calls_total", (("result", "created"),))
        self._store.transfer_created(transfer.external_id, created["id"], created["status"], self._clock())
        credit = self._store.credit(transfer.invoice_id)
        logger.info(
            "transfer sent: invoice %s, amount %d, fee %d, transfer %d cents, external id %s, Stark Bank id %s",
            transfer.invoice_id, credit["amount"], credit["fee"], transfer.amount, transfer.external_id, created["id"],
        )

    def _settle(self, transfer, error):
        """Find out whether an unanswered or refused create call made the transfer; record the answer."""
        now = self._clock()
        try:
            found = self._bank.find_transfer(transfer.external_id)
        except BankUnavailable as e:
            found = None
            error = error if isinstance(error, BankUnavailable) else e
        if found is not None:
            self._store.transfer_created(transfer.external_id, found["id"], found["status"], now)
            logger.info("transfer %s: found at Stark Bank as %s (%s)", transfer.external_id, found["id"], found["status"])
            return
        errors = list(error.errors) or [("", str(error))]
        if isinstance(error, BankRejected):
            self._store.reject_transfer(transfer.external_id, errors, now)
            logger.error(
                "TRANSFER REJECTED: %s (invoice %s, %d cents): %s",
                transfer.external_id, transfer.invoice_id, transfer.amount,
                "; ".join(f"{c}: {m}" for c, m in errors),
            )
            return
        if transfer.tries >= MAX_TRIES:
            self._store.stall_transfer(transfer.external_id, errors, now)
            logger.error(
                "TRANSFER STALLED: %s (invoice %s) unanswered after %d tries, will retry at next start: %s",
                transfer.external_id, transfer.invoice_id, transfer.tries, error,
            )
            return
        delay = backoff(transfer.tries, self._base_backoff_s, MAX_BACKOFF_S, self._rng)
        self._store.retry_transfer(transfer.external_id, errors, now + datetime.timedelta(seconds=delay), now)
        logger.warning("transfer %s: try %d failed, retrying in %.1f s: %s", transfer.external_id, transfer.tries, delay, error)
