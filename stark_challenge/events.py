"""Events: how a Stark Bank event enters the store, and what it means for our state.

``check_shape`` decides whether a document is an event we can store (the webhook
answers 400 otherwise) and returns it as an ``Event``; ``accept`` stores it, the
one way in for both the webhook and the worker's pull. ``process`` applies one
stored event to the store.

A valid signature proves that Stark Bank sent an event, not that it is about our
money: Stark Bank signs every workspace's events with one key, and anyone with a
workspace can point a webhook at us. So no field of an event moves money on its own
word; each fact money rests on comes from our store, or from Stark Bank asked with
our own credentials (whose ``get`` answers only for our workspace):

- ``invoice`` / ``credited``: forwarded only for an invoice id the store recorded
  when a round issued it; for any other id, only if Stark Bank confirmed (the
  ``facts`` handed in by the worker) that the invoice is ours, carries our
  ``INSTANCE_TAG`` and is paid, and then with Stark Bank's amount and fee, not the
  event's. The amount to forward is ``net = amount - fee``, integer cents, with
  ``amount > 0`` and ``0 <= fee < amount``; a credit without a ``fee`` is invalid,
  never fee 0. The credit is recorded under the invoice id (so the same credit in
  two events is one credit) and its transfer queued in the same transaction.
  Anything else moves nothing: ``not issued here`` (logged at WARNING) or
  ``invalid: ...`` (logged as an error), and no credit row is written, so a foreign
  or broken event cannot block the genuine credit of the same id. An invoice that
  carries our tag but that Stark Bank did not find is ``not_ours_not_found`` (the
  worker asked again for a while first: reads may lag writes).
- other ``invoice`` logs (created, paid, overdue, canceled, expired, ...): the
  status of an invoice the store knows follows. ``paid`` may come after ``credited``.
- ``transfer`` logs: change our transfer only when their transfer id is the Stark
  Bank id we recorded for it (external ids are unique per workspace only, so
  another workspace can copy ours). While we have recorded none (the create call
  got no answer), the worker settles the transfer by our own lookup first. A
  ``failed`` log counts only once Stark Bank, asked with ``transfer.get`` for our
  id, reports it failed and no other transfer of the invoice moves money (the
  worker's answer); then one more attempt is queued under a derived external id. A log for a transfer we don't know is ``transfer not ours``.
- anything else is kept as received and marked processed.

Nothing here calls Stark Bank: ``question`` says what the worker must ask before
``process`` can decide, and ``process`` leaves the event pending (returns None)
while an answer it needs is missing. Bad data never raises: a field of the wrong
type makes the outcome say what was wrong, and the event is marked processed so it
cannot block the queue. Every outcome is a ``vocabulary.Outcome``: a code (what the
metrics and the status count) and its prose for people.
"""

import logging
import re
from typing import NamedTuple

from . import logs
from .report import reais
from .taxid import mask_tax_id
from .vocabulary import Outcome, external_id

__all__ = ["Event", "check_shape", "accept", "check_amounts", "process", "question", "Facts", "Question",
           "NO_FACTS", "NOT_OURS", "carries_tag"]

logger = logging.getLogger(__name__)

# How a credit that moves nothing is described to people (the code says which kind).
NOT_OURS = "not issued here"

# Stark Bank's ids are decimal digits; anything else is not ours and never reaches a URL path.
_STARK_ID = re.compile(r"[0-9]{1,32}")


class Event(NamedTuple):
    """An event received from Stark Bank whose shape is checked, ready to be stored."""

    id: str
    subscription: str  # 'invoice', 'transfer', ...
    log_type: str  # 'credited', 'success', ...
    entity_id: str  # the id of the invoice or transfer it is about, '' for other subscriptions
    body: dict  # the event as received (camelCase, as Stark Bank sends it)


def check_shape(document):
    """Return the Event inside a webhook body, or raise ValueError saying what is wrong.

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
    entity = log.get(event["subscription"])
    entity_id = entity.get("id", "") if isinstance(entity, dict) else ""
    return Event(event["id"], event["subscription"], log["type"], entity_id, event)


def accept(store, event, source, now, on_new=None, coming=0):
    """Store an Event received from Stark Bank (``source``: 'webhook' or 'pull'); return True if new.

    The one way an event enters the store: same deduplication (by event id), same
    log line, and ``on_new()`` (the worker's wake-up) after a new one is committed.
    ``coming``: how many other events are about to be accepted, whose commit this one
    may share (``Store.add_event``). Raise StoreError if the store cannot write.
    """
    new = store.add_event(event, source, now, coming)
    if new:
        # Per-event lines are for debugging: the round, credit and transfer lines tell a person the story.
        logger.debug("%s accepted: event %s, %s %s %s", source, event.id, event.subscription, event.log_type,
                     event.entity_id, extra=logs.fields(event_id=event.id))
        if on_new is not None:
            on_new()
    else:
        logger.debug("%s accepted: event %s again (already stored)", source, event.id,
                     extra=logs.fields(event_id=event.id))
    return new


# Larger amounts are not money but bad data, and would not fit SQLite's 64-bit integers.
MAX_CENTS = 10 ** 15


def _cents(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_CENTS
    return value if ok else None


def check_amounts(amount, fee):
    """Return None if ``amount`` and ``fee`` are a credit we can forward, else an Outcome saying what is wrong.

    Both integer cents, ``amount > 0`` and ``0 <= fee < amount``. A missing fee (None)
    is wrong: a credited invoice always carries one, and taking it as 0 would forward
    Stark Bank's fee too.
    """
    if fee is None:
        return Outcome("invalid_missing_fee", "credited invoice without a fee")
    if _cents(amount) is None or _cents(fee) is None:
        return Outcome("invalid_not_integer", "credited invoice without integer amount and fee")
    if amount <= 0:
        return Outcome("invalid_amount", f"amount {amount} is not positive")
    if not 0 <= fee < amount:
        return Outcome("invalid_fee", f"fee {fee} is not in 0..amount {amount}")
    return None


class Question(NamedTuple):
    """What the worker must ask Stark Bank, with our own credentials, before an event can be processed."""

    kind: str  # 'invoice': invoice.get; 'lookup': transfer query by our tag; 'transfer': transfer.get
    key: str  # the invoice id, our external id, or Stark Bank's transfer id


class Facts(NamedTuple):
    """Stark Bank's answers to Questions, handed to ``process`` by the worker."""

    # invoice id -> the invoice as Stark Bank returned it (dict: amount, fee, status, tags), None if not found
    invoices: dict = {}
    # Stark Bank transfer id -> its status at Stark Bank (a failure only once confirmed), None if not known
    transfers: dict = {}
    # our external ids that our own lookup by tag found no transfer for
    not_created: frozenset = frozenset()
    # when to ask Stark Bank about a transfer of ours that stays open (None: at once)
    check_at: object = None


NO_FACTS = Facts()


def question(store, event):
    """Return the Question to answer before ``event`` (a StoredEvent) can be processed, or None.

    Reads the store only. Idempotent.
    """
    try:
        entity = event.body["log"][event.subscription]
        entity_id = entity["id"]
    except (KeyError, TypeError):
        return None
    if not isinstance(entity_id, str):
        return None
    if event.subscription == "invoice" and event.log_type == "credited":
        if store.has_invoice(entity_id) or store.credit(entity_id) is not None:
            return None
        return Question("invoice", entity_id) if _STARK_ID.fullmatch(entity_id) else None
    if event.subscription == "transfer":
        current = _our_transfer(store, entity)
        if current is None:
            return None
        if current.transfer_id is None:
            return Question("lookup", current.external_id)
        if current.transfer_id == entity_id and event.log_type == "failed" and _STARK_ID.fullmatch(entity_id):
            return Question("transfer", entity_id)
    return None


def carries_tag(event, instance_tag):
    """Return True if the invoice or transfer an event (StoredEvent) is about lists ``instance_tag`` among its tags."""
    try:
        tags = event.body["log"][event.subscription].get("tags")
    except (KeyError, TypeError, AttributeError):
        return False
    return isinstance(tags, list) and instance_tag in tags


def _our_transfer(store, transfer):
    ext = transfer.get("externalId") if isinstance(transfer, dict) else None
    return store.transfer(ext) if isinstance(ext, str) and ext else None


def process(store, event, instance_tag, now, facts=NO_FACTS):
    """Apply one stored event (a StoredEvent) to the store; return its Outcome (code and text).

    The event is marked processed in the same transaction as its effects, so a crash
    leaves either both or neither. Idempotent: a processed event is not applied again,
    and one that another instance is processing at the moment is left to it.
    Return None, leaving the event pending, if it needs an answer from Stark Bank
    (see ``question``) that ``facts`` does not hold.
    """
    with store.atomic():
        if not store.hold_event(event.id):  # processed, or being processed by another instance
            return Outcome("ignored", "already processed")
        try:
            if event.subscription == "invoice":
                outcome = _invoice(store, event, instance_tag, now, facts)
            elif event.subscription == "transfer":
                outcome = _transfer(store, event, instance_tag, now, facts)
            else:
                outcome = Outcome("ignored", f"ignored: subscription {event.subscription!r}")
        except (KeyError, TypeError, AttributeError) as e:
            outcome = Outcome("invalid_malformed", f"invalid: {type(e).__name__} {e}")
            logger.error("event %s: cannot be processed (%s); stored as received", event.id, outcome.text)
        if outcome is None:
            return None
        store.finish_event(event.id, outcome, now)
        return outcome


def _invoice(store, event, instance_tag, now, facts):
    invoice = event.body["log"]["invoice"]
    invoice_id = invoice["id"]
    log_type = event.log_type
    if log_type != "credited":
        known = store.update_invoice(invoice_id, log_type, now)
        return (Outcome("invoice_status", f"invoice {log_type}") if known
                else Outcome("invoice_not_ours", f"invoice {log_type} (not ours)"))

    if store.credit(invoice_id) is not None:
        return Outcome("credit_known", "credit already recorded")
    if store.has_invoice(invoice_id):
        # A round of ours issued it, so Stark Bank's event about it is about our money.
        amount, fee, source = invoice.get("amount"), invoice.get("fee"), "event"
    elif isinstance(invoice_id, str) and _STARK_ID.fullmatch(invoice_id) and invoice_id not in facts.invoices:
        return None  # the worker asks Stark Bank first
    else:
        confirmed = facts.invoices.get(invoice_id)
        reason = _not_ours_reason(confirmed, instance_tag)
        if reason:
            if confirmed is None and carries_tag(event, instance_tag):
                reason = Outcome("not_ours_not_found", "Stark Bank never found this invoice, which carries our tag")
            logger.warning("event %s: credit of invoice %s (%r cents, workspace %s) moves nothing: %s, %s",
                           event.id, invoice_id, invoice.get("amount"), event.body.get("workspaceId"), NOT_OURS,
                           reason.text)
            return Outcome(reason.code, f"{NOT_OURS}: {reason.text}")
        amount, fee, source = confirmed.get("amount"), confirmed.get("fee"), "Stark Bank"
    problem = check_amounts(amount, fee)
    if problem:
        logger.error("event %s: invoice %s: %s (from the %s); not forwarded", event.id, invoice_id, problem.text,
                     source)
        return Outcome(problem.code, "invalid: " + problem.text)
    store.update_invoice(invoice_id, "credited", now, fee=fee)
    store.add_credit(invoice_id, event.id, amount, fee, external_id(instance_tag, invoice_id, 1), now)
    logger.debug(
        "invoice %s credited: %s, fee %s, forwarding %s (payer %s; amounts from the %s)",
        invoice_id, reais(amount), reais(fee), reais(amount - fee), mask_tax_id(invoice.get("taxId")), source,
        extra=logs.fields(invoice_id=invoice_id, event_id=event.id, amount_cents=amount, fee_cents=fee),
    )
    return Outcome("credit_queued", "credit queued")


def _not_ours_reason(confirmed, instance_tag):
    """Return why an invoice Stark Bank returned (None: not found) is not one to forward (an Outcome), or None."""
    if confirmed is None:
        return Outcome("not_ours_unknown_invoice", "Stark Bank has no such invoice in our workspace")
    tags = confirmed.get("tags")
    if not (isinstance(tags, list) and instance_tag in tags):  # a list: a string would match by substring
        return Outcome("not_ours_missing_tag", f"the invoice lacks the tag {instance_tag!r}")
    if confirmed.get("status") != "paid":
        return Outcome("not_ours_not_paid", f"Stark Bank reports it {confirmed.get('status')!r}, not paid")
    return None


def _transfer(store, event, instance_tag, now, facts):
    transfer = event.body["log"]["transfer"]
    transfer_id = transfer["id"]
    errors = [
        (e.get("code", ""), e.get("message", "")) if isinstance(e, dict) else ("", str(e))
        for e in (event.body["log"].get("errors") or [])
    ]
    current = _our_transfer(store, transfer)
    if current is not None and current.transfer_id is None:
        if current.external_id not in facts.not_created:
            return None  # the worker settles it by our own lookup first
        current = None  # our lookup found no transfer with this external id: the log is another workspace's
    if current is None or current.transfer_id != transfer_id:
        logger.warning("event %s: transfer %s %s (external id %r, workspace %s) moves nothing: transfer not ours",
                       event.id, transfer_id, event.log_type, transfer.get("externalId"),
                       event.body.get("workspaceId"))
        return Outcome("transfer_not_ours", "transfer not ours")
    ext = current.external_id
    retry_id = external_id(instance_tag, current.invoice_id, 2)
    confirmed_failed = False
    if event.log_type == "failed":
        if transfer_id not in facts.transfers:
            return None  # the worker asks Stark Bank first
        reported = facts.transfers[transfer_id]
        if reported != "failed":
            logger.warning("event %s: transfer %s failed, but Stark Bank reports it %r: not sent again; "
                           "it is checked again later", event.id, ext, reported)
            return Outcome("transfer_failed_unconfirmed",
                           f"transfer failed not confirmed: Stark Bank reports {reported!r}")
        confirmed_failed = True
    updated = store.apply_transfer_status(ext, transfer_id, event.log_type, errors, now,
                                          retry_external_id=retry_id, confirmed_failed=confirmed_failed,
                                          check_at=facts.check_at)
    if confirmed_failed:
        again = " and queued once more as " + retry_id if current.attempt == 1 else "; no attempt left"
        logger.error(
            "TRANSFER FAILED: %s (invoice %s, %s) failed at Stark Bank: %s%s",
            ext, current.invoice_id, reais(current.amount), errors or "no reason given", again,
            extra=logs.fields(invoice_id=current.invoice_id, transfer_id=transfer_id, external_id=ext,
                              amount_cents=current.amount),
        )
    elif event.log_type == "success":
        logger.info("transfer %s succeeded: %s for invoice %s", transfer_id, reais(current.amount),
                    current.invoice_id, extra=logs.fields(invoice_id=current.invoice_id, transfer_id=transfer_id,
                                                          external_id=ext, amount_cents=current.amount))
    return Outcome("transfer_status", f"transfer {updated.state}")
