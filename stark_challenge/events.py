"""Events: what a stored Stark Bank event means for our state, and its shape check.

``check_shape`` decides whether a webhook body is an event we can store (the
webhook answers 400 otherwise). ``process`` applies one stored event to the store:

- ``invoice`` / ``credited``: the money arrived. The amount to forward is
  ``net = amount - fee``, both integer cents from the credited invoice itself
  (``amount`` is what the payer paid, ``fee`` what Stark Bank kept). The credit is
  recorded under the invoice id (so the same credit in two events is one credit)
  and its transfer queued in the same transaction, unless the invoice lacks our
  ``INSTANCE_TAG`` (another app's invoice) or ``net <= 0``: then it is recorded as
  skipped, with the reason.
- other ``invoice`` logs (created, paid, overdue, canceled, expired, ...): the
  invoice's stored status follows. ``paid`` may come after ``credited``.
- ``transfer`` logs: our transfer's status follows; ``failed`` queues one more
  attempt under a derived external id.
- anything else is kept as received and marked processed.

Nothing here calls Stark Bank. Bad data never raises: a field of the wrong type
(amounts must be integer cents, tags a list, ids strings) makes the outcome say
what was wrong, and the event is marked processed so it cannot block the queue.
"""

import logging

from .people import mask_tax_id

__all__ = ["check_shape", "process", "external_id", "entity_of"]

logger = logging.getLogger(__name__)


def external_id(instance_tag, invoice_id, attempt):
    """Return the external id of a transfer for an invoice: ``<tag>-inv-<id>``, ``-2`` for the second attempt.

    Our own prefix, never the bare ``invoice-<id>`` (reported to clash with Stark Bank's
    own use; see shared/README). Deterministic, so Stark Bank itself refuses a repeat.
    """
    base = f"{instance_tag}-inv-{invoice_id}"
    return base if attempt == 1 else f"{base}-{attempt}"


def check_shape(document):
    """Return the event dict inside a webhook body, or raise ValueError saying what is wrong.

    The body must be ``{"event": {"id": str, "subscription": str, "log": {"type": str, ...}}}``;
    for ``invoice`` and ``transfer`` events the log must carry the entity with its id.
    """
    if not isinstance(document, dict) or not isinstance(document.get("event"), dict):
        raise ValueError("expected an object with an 'event' object")
    event = document["event"]
    for field in ("id", "subscription"):
        if not isinstance(event.get(field), str) or not event[field]:
            raise ValueError(f"event.{field} must be a non-empty string")
    log = event.get("log")
    if not isinstance(log, dict) or not isinstance(log.get("type"), str):
        raise ValueError("event.log.type must be a string")
    if event["subscription"] in ("invoice", "transfer"):
        entity = log.get(event["subscription"])
        if not isinstance(entity, dict) or not isinstance(entity.get("id"), str):
            raise ValueError(f"event.log.{event['subscription']}.id must be a string")
    return event


def entity_of(event):
    """Return the id of the invoice or transfer an event is about, or '' for other subscriptions."""
    entity = event.get("log", {}).get(event.get("subscription"))
    return entity.get("id", "") if isinstance(entity, dict) else ""


# Larger amounts are not money but bad data, and would not fit SQLite's 64-bit integers.
MAX_CENTS = 10 ** 15


def _cents(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_CENTS
    return value if ok else None


def process(store, event, instance_tag, now):
    """Apply one stored event (a StoredEvent) to the store; return a short outcome string.

    The event is marked processed in the same transaction as its effects, so a crash
    leaves either both or neither. Idempotent: a processed event is not applied again.
    """
    with store.atomic():
        if store.event_processed(event.id):
            return "already processed"
        try:
            if event.subscription == "invoice":
                outcome = _invoice(store, event, instance_tag, now)
            elif event.subscription == "transfer":
                outcome = _transfer(store, event, instance_tag, now)
            else:
                outcome = f"ignored: subscription {event.subscription!r}"
        except (KeyError, TypeError, AttributeError) as e:
            outcome = f"invalid: {type(e).__name__} {e}"
            logger.error("event %s: cannot be processed (%s); stored as received", event.id, outcome)
        store.finish_event(event.id, outcome[:200], now)
        return outcome


def _invoice(store, event, instance_tag, now):
    invoice = event.body["log"]["invoice"]
    invoice_id = invoice["id"]
    log_type = event.log_type
    if log_type != "credited":
        known = store.update_invoice(invoice_id, log_type, now)
        return f"invoice {log_type}" if known else f"invoice {log_type} (not ours)"

    amount, fee = _cents(invoice.get("amount")), _cents(invoice.get("fee", 0))
    if amount is None or fee is None:
        logger.error("event %s: credited invoice %s has no integer amount/fee; not forwarded", event.id, invoice_id)
        return "invalid: credited invoice without integer amount and fee"
    store.update_invoice(invoice_id, "credited", now, fee=fee)
    tags = invoice.get("tags")
    ours = isinstance(tags, list) and instance_tag in tags  # a list: a string would match by substring
    net = amount - fee
    if not ours:
        reason = f"invoice lacks the tag {instance_tag!r}"
    elif net <= 0:
        reason = f"amount {amount} does not cover fee {fee}"
    else:
        reason = None
    new = store.add_credit(
        invoice_id, event.id, amount, fee, external_id(instance_tag, invoice_id, 1), now, skip_reason=reason
    )
    if not new:
        return "credit already recorded"
    if reason:
        logger.warning("invoice %s credited %d cents, fee %d: not forwarded, %s", invoice_id, amount, fee, reason)
        return "credit skipped: " + reason
    logger.info(
        "invoice %s credited: amount %d, fee %d, forwarding %d cents (payer %s)",
        invoice_id, amount, fee, net, mask_tax_id(invoice.get("taxId")),
    )
    return "credit queued"


def _transfer(store, event, instance_tag, now):
    transfer = event.body["log"]["transfer"]
    ext = transfer.get("externalId")
    ext = ext if isinstance(ext, str) else ""
    errors = [
        (e.get("code", ""), e.get("message", "")) if isinstance(e, dict) else ("", str(e))
        for e in (event.body["log"].get("errors") or [])
    ]
    current = store.transfer(ext) if ext else None
    if current is None:
        return "transfer not ours"
    retry_id = external_id(instance_tag, current.invoice_id, 2)
    updated = store.apply_transfer_status(ext, transfer["id"], event.log_type, errors, now, retry_external_id=retry_id)
    if event.log_type == "failed":
        again = " and queued once more as " + retry_id if current.attempt == 1 else "; no attempt left"
        logger.error(
            "TRANSFER FAILED: %s (invoice %s, %d cents) failed at Stark Bank: %s%s",
            ext, current.invoice_id, current.amount, errors or "no reason given", again,
        )
    elif event.log_type == "success":
        logger.info("transfer %s succeeded: invoice %s, %d cents", ext, current.invoice_id, current.amount)
    return f"transfer {updated.state}"
