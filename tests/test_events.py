"""events: what each stored event does to the store; bad data never raises."""

import pytest

from stark_challenge import events
from stark_challenge.store import StoredEvent

TAG = "stark-challenge"


def invoice_event(event_id, log_type, **invoice):
    invoice.setdefault("id", "inv-1")
    body = {"id": event_id, "subscription": "invoice", "log": {"type": log_type, "invoice": invoice}}
    return StoredEvent(event_id, "invoice", log_type, body, "webhook")


def store_and_process(store, event, now):
    store.add_event(event.id, event.subscription, event.log_type, "", event.body, "webhook", now)
    return events.process(store, event, TAG, now)


def test_external_ids_carry_our_prefix_not_a_bare_invoice_id():
    assert events.external_id(TAG, "123", 1) == "stark-challenge-inv-123"
    assert events.external_id(TAG, "123", 2) == "stark-challenge-inv-123-2"


def test_a_credit_of_our_invoice_queues_amount_minus_fee(store, clock):
    outcome = store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    assert outcome == "credit queued"
    (t,) = store.transfers()
    assert (t.external_id, t.amount, t.state) == ("stark-challenge-inv-inv-1", 9975, "pending")
    assert store.event_processed("e1")


def test_the_same_credit_in_another_event_is_not_queued_twice(store, clock):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    outcome = store_and_process(store, invoice_event("e2", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    assert outcome == "credit already recorded"
    assert len(store.transfers()) == 1


def test_a_credit_for_another_apps_invoice_is_recorded_not_paid(store, clock):
    outcome = store_and_process(store, invoice_event("e1", "credited", amount=500, fee=5, tags=["other-app"]), clock())
    assert outcome.startswith("credit skipped: invoice lacks the tag")
    assert store.transfers() == [] and store.credit("inv-1")["state"] == "skipped"


@pytest.mark.parametrize("amount, fee", [(50, 50), (40, 50), (0, 0)])
def test_a_credit_that_does_not_cover_its_fee_is_skipped(store, clock, amount, fee):
    outcome = store_and_process(store, invoice_event("e1", "credited", amount=amount, fee=fee, tags=[TAG]), clock())
    assert "does not cover fee" in outcome
    assert store.transfers() == []


@pytest.mark.parametrize("invoice", [
    {"amount": "100", "fee": 1, "tags": [TAG]},
    {"amount": 100.5, "fee": 1, "tags": [TAG]},
    {"fee": 1, "tags": [TAG]},
    {"amount": True, "fee": 0, "tags": [TAG]},
])
def test_credits_without_integer_cents_are_not_forwarded(store, clock, invoice):
    outcome = store_and_process(store, invoice_event("e1", "credited", **invoice), clock())
    assert outcome.startswith("invalid")
    assert store.transfers() == [] and store.event_processed("e1")


def test_broken_bodies_are_marked_processed_with_the_reason(store, clock):
    event = StoredEvent("e1", "invoice", "credited", {"log": {}}, "webhook")
    outcome = store_and_process(store, event, clock())
    assert outcome.startswith("invalid: KeyError")
    assert store.event_processed("e1")


def test_unknown_subscriptions_are_marked_processed(store, clock):
    event = StoredEvent("e1", "boleto", "paid", {"log": {"type": "paid"}}, "webhook")
    assert store_and_process(store, event, clock()) == "ignored: subscription 'boleto'"


def test_a_processed_event_is_not_applied_again(store, clock):
    event = invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG])
    store_and_process(store, event, clock())
    assert events.process(store, event, TAG, clock()) == "already processed"


def test_transfer_failure_queues_a_second_attempt_under_a_derived_id(store, clock):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    ext = "stark-challenge-inv-inv-1"
    body = {"id": "e2", "subscription": "transfer",
            "log": {"type": "failed", "errors": ["Receiver account is closed"],  # strings, as Stark Bank sends
                    "transfer": {"id": "t1", "externalId": ext}}}
    outcome = store_and_process(store, StoredEvent("e2", "transfer", "failed", body, "webhook"), clock())
    assert outcome == "transfer failed"
    states = {t.external_id: (t.state, t.errors) for t in store.transfers()}
    assert states == {ext: ("failed", (("", "Receiver account is closed"),)), ext + "-2": ("pending", ())}


def test_transfer_events_of_other_apps_are_ignored(store, clock):
    body = {"id": "e2", "subscription": "transfer", "log": {"type": "success", "transfer": {"id": "t9"}}}
    assert store_and_process(store, StoredEvent("e2", "transfer", "success", body, "webhook"), clock()) == \
        "transfer not ours"


def test_shape_check_returns_the_event():
    document = {"event": {"id": "e", "subscription": "transfer", "log": {"type": "success", "transfer": {"id": "t"}}}}
    assert events.check_shape(document) is document["event"]
    assert events.entity_of(document["event"]) == "t"
    assert events.entity_of({"subscription": "x", "log": {}}) == ""
