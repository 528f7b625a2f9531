"""Resend: an operator's retry of a credit whose transfer is stuck, without ever paying twice.

``retry`` follows the one rule for a new external id (``transfers``): by the latest
attempt of the credit's transfer,

- no definite answer yet (``pending``, ``sending``, ``exists``): nothing new is made.
  A ``pending`` attempt is made due now, to be sent again under the SAME external id;
  an ``exists`` one (Stark Bank said its external id exists) is looked up at once; a
  ``sending`` one (a create call may be out) is settled by lookup when its claim's
  lease runs out. The answer says so;
- ``created`` or ``processing``: Stark Bank is asked about it at once (the next
  worker pass); nothing is sent;
- ``success``: refused, the money moved;
- ``rejected`` or ``failed`` (``transfer_states.FINAL_UNPAID``: Stark Bank confirmed it
  final and it moved no money): Stark Bank is asked, with our own credentials, for
  every transfer of the invoice by its tag (``vocabulary.invoice_tag``, on every
  attempt). If one is created, processing or paid, money moved or may be moving:
  nothing is queued, and our row for it follows Stark Bank. Otherwise the store queues
  attempt N+1 (``pending``, external id ``vocabulary.external_id``) only if attempt N
  is still the latest and still final, in one transaction with a unique
  (invoice, attempt) key: of two concurrent retries, one queues and the other is refused.

The normal sending path (``transfers.Sender``) then sends what is due. The automatic
second attempt after a confirmed failure uses the same key and the same derived
external id, so it and an operator's retry cannot both queue one. Runs in the service
(``POST /transfers/retry``) or, when the service is stopped, in the ``transfers retry``
command, which then holds the store's lock.
"""

import logging
from typing import NamedTuple

from . import transfer_states, vocabulary

__all__ = ["Outcome", "retry"]

logger = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """What a retry did: ``code`` is 'queued' (a new attempt), 'resent' (the same external id is sent or
    looked up again now), 'recorded' (Stark Bank already moves it: nothing sent), 'refused' (not in a state
    to retry) or 'unknown' (no transfer for that invoice); ``message`` is one line."""

    code: str
    message: str


def retry(store, bank, instance_tag, invoice_id, now):
    """Act on ``invoice_id``'s latest transfer attempt as the module docstring says; return an Outcome.

    Raise BankUnavailable if Stark Bank does not answer (nothing is queued then).
    Idempotent in effect: a second call finds the attempt it queued, or the same state.
    """
    attempts = store.attempts(invoice_id)
    if not attempts:
        return Outcome("unknown", f"invoice {invoice_id}: no transfer in the ledger for it")
    latest = attempts[-1]
    if latest.state == "pending":
        store.retry_transfer(latest.external_id, list(latest.errors), now, now)
        return _resent(invoice_id, latest, "is due now: sent again under the same external id, never a new one "
                                           "while Stark Bank has not confirmed it final")
    if latest.state == "sending":
        until = latest.lease_until.isoformat(timespec="seconds") if latest.lease_until else "now"
        return _resent(invoice_id, latest, f"a create call may be out; its claim runs until {until}, then it is "
                                           "settled by lookup at Stark Bank, never sent blind")
    if latest.state in ("exists", "created", "processing"):
        store.note_check(latest.external_id, list(latest.errors), now, now)
        what = ("Stark Bank said its external id exists: looked up now, never sent again"
                if latest.state == "exists" else "Stark Bank is asked about it now; nothing new is sent")
        return _resent(invoice_id, latest, what)
    if latest.state not in transfer_states.RETRYABLE:
        return _refused(invoice_id, latest)
    moving = [t for t in bank.find_transfers(vocabulary.invoice_tag(invoice_id))
              if t["status"] in transfer_states.MOVING]
    if moving:
        return _record(store, invoice_id, attempts, moving, now)
    external_id = vocabulary.external_id(instance_tag, invoice_id, latest.attempt + 1)
    if not store.queue_attempt(invoice_id, latest.attempt, external_id, now):
        return _refused(invoice_id, store.attempts(invoice_id)[-1])
    logger.warning("transfer retry: invoice %s, attempt %d queued as %s, %d cents (attempt %d was %s)",
                   invoice_id, latest.attempt + 1, external_id, latest.amount, latest.attempt, latest.state)
    return Outcome("queued", f"invoice {invoice_id}: attempt {latest.attempt + 1} queued as {external_id}, "
                             f"{latest.amount} cents (attempt {latest.attempt} was {latest.state})")


def _resent(invoice_id, latest, what):
    logger.warning("transfer retry: invoice %s, attempt %d (%s) is %s: %s", invoice_id, latest.attempt,
                   latest.external_id, latest.state, what)
    return Outcome("resent", f"invoice {invoice_id}: attempt {latest.attempt} ({latest.external_id}) is "
                             f"{latest.state}; {what}")


def _refused(invoice_id, latest):
    return Outcome("refused", f"invoice {invoice_id}: latest attempt {latest.attempt} ({latest.external_id}) is "
                              f"{latest.state}; only {', '.join(transfer_states.RETRYABLE)} attempts get a new one")


def _record(store, invoice_id, attempts, moving, now):
    """Let our rows follow the transfers Stark Bank reports for the invoice; return the 'recorded' Outcome."""
    ours = {t.external_id: t for t in attempts}
    for found in moving:
        row = ours.get(found["external_id"])
        # A row with another Stark Bank id is left as it is; the store's table refuses what a state may not become.
        if row is not None and row.transfer_id in (None, found["id"]):
            store.transfer_created(row.external_id, found["id"], found["status"], now)
    first = moving[0]
    logger.warning("transfer retry: invoice %s not retried, Stark Bank has transfer %s (%s, %s)",
                   invoice_id, first["id"], first["external_id"], first["status"])
    return Outcome("recorded", f"invoice {invoice_id}: Stark Bank already has transfer {first['id']} "
                               f"({first['external_id']}, {first['status']}); recorded, nothing sent")
