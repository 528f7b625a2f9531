"""Resend: an operator's retry of a credit whose transfer is stuck, without ever paying twice.

``retry`` queues one more attempt of a credit's transfer when its latest attempt is
``rejected``, ``failed`` or ``stalled`` (``transfer_states.RETRYABLE``), in this order:

1. the ledger: the invoice must have a transfer, and its latest attempt must be in
   one of those states (anything else is refused with its state);
2. Stark Bank, asked with our own credentials by the invoice's tag
   (``invoice-<id>``, on every attempt: ``transfers.transfer_tags``): if any transfer
   of the invoice is ``created``, ``processing`` or ``success``, money moved or may be
   moving. Nothing is queued; the ledger's row for that attempt follows Stark Bank;
3. the store queues attempt N+1 (``pending``, external id ``<tag>-inv-<id>-<N+1>``,
   ``events.external_id``) only if attempt N is still the latest and still stuck,
   in one transaction with a unique (invoice, attempt) key: of two concurrent
   retries, one queues and the other is refused.

The normal sending path (``transfers.Sender``) then sends the new attempt, whatever
it is. The automatic second attempt after a confirmed failure uses the same key and
the same derived external id, so it and an operator's retry cannot both queue one.
Runs in the service (``POST /transfers/retry``) or, when the service is stopped, in
the ``transfers retry`` command, which then holds the store's lock.
"""

import logging
from typing import NamedTuple

from . import events, transfer_states

__all__ = ["Outcome", "retry"]

logger = logging.getLogger(__name__)

class Outcome(NamedTuple):
    """What a retry did: ``code`` is 'queued', 'recorded' (Stark Bank already moves it: nothing sent),
    'refused' (not in a state to retry) or 'unknown' (no transfer for that invoice); ``message`` is one line."""

    code: str
    message: str


def retry(store, bank, instance_tag, invoice_id, now):
    """Queue one more transfer attempt for ``invoice_id`` if that is safe; return an Outcome.

    Raise BankUnavailable if Stark Bank does not answer (nothing is queued then).
    Idempotent in effect: a second call finds the attempt it queued and is refused.
    """
    attempts = store.attempts(invoice_id)
    if not attempts:
        return Outcome("unknown", f"invoice {invoice_id}: no transfer in the ledger for it")
    latest = attempts[-1]
    if latest.state not in transfer_states.RETRYABLE:
        return _refused(invoice_id, latest)
    moving = [t for t in bank.find_transfers(f"invoice-{invoice_id}") if t["status"] in transfer_states.MOVING]
    if moving:
        return _record(store, invoice_id, attempts, moving, now)
    external_id = events.external_id(instance_tag, invoice_id, latest.attempt + 1)
    if not store.queue_attempt(invoice_id, latest.attempt, external_id, now):
        return _refused(invoice_id, store.attempts(invoice_id)[-1])
    logger.warning("transfer retry: invoice %s, attempt %d queued as %s, %d cents (attempt %d was %s)",
                   invoice_id, latest.attempt + 1, external_id, latest.amount, latest.attempt, latest.state)
    return Outcome("queued", f"invoice {invoice_id}: attempt {latest.attempt + 1} queued as {external_id}, "
                             f"{latest.amount} cents (attempt {latest.attempt} was {latest.state})")


def _refused(invoice_id, latest):
    return Outcome("refused", f"invoice {invoice_id}: latest attempt {latest.attempt} ({latest.external_id}) is "
                              f"{latest.state}; only {', '.join(transfer_states.RETRYABLE)} attempts are retried")


def _record(store, invoice_id, attempts, moving, now):
    """Let our rows follow the transfers Stark Bank reports for the invoice; return the 'recorded' Outcome."""
    ours = {t.external_id: t for t in attempts}
    for found in moving:
        row = ours.get(found["external_id"])
        # A row with another Stark Bank id, or a confirmed failure (final), is left as it is.
        if row is not None and row.state != "failed" and row.transfer_id in (None, found["id"]):
            store.transfer_created(row.external_id, found["id"], found["status"], now)
    first = moving[0]
    logger.warning("transfer retry: invoice %s not retried, Stark Bank has transfer %s (%s, %s)",
                   invoice_id, first["id"], first["external_id"], first["status"])
    return Outcome("recorded", f"invoice {invoice_id}: Stark Bank already has transfer {first['id']} "
                               f"({first['external_id']}, {first['status']}); recorded, nothing sent")
