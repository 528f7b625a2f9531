"""events: what each stored event does to the store; bad data never raises."""

import pytest

from stark_challenge import events
from stark_challenge.store import StoredEvent

@pytest.fixture
def store(any_store):
    """Every test of this module runs on both backends."""
    return any_store


TAG = "stark-challenge"


def invoice_event(event_id, log_type, **invoice):
    invoice.setdefault("id", "inv-1")
    body = {"id": event_id, "subscription": "invoice", "log": {"type": log_type, "invoice": invoice}}
    return StoredEvent(event_id, "invoice", log_type, body, "webhook")


def store_and_process(store, event, now, facts=events.NO_FACTS):
    store.add_event(events.Event(event.id, event.subscription, event.log_type, "", event.body), "webhook", now)
    return events.process(store, event, TAG, now, facts)


@pytest.fixture
def issued(store, clock):
    """Record invoice ``inv-1`` as issued by round 0, as the invoicer does."""
    store.claim_round(0, clock(), 1, clock())
    store.record_invoices(0, 0, [{"id": "inv-1", "amount": 10000, "name": "A", "tax_id": "x", "status": "created"}],
                          clock())
    return "inv-1"


def transfer_event(event_id, log_type, transfer_id, ext, errors=()):
    body = {"id": event_id, "subscription": "transfer",
            "log": {"type": log_type, "errors": list(errors),
                    "transfer": {"id": transfer_id, "externalId": ext}}}
    return StoredEvent(event_id, "transfer", log_type, body, "webhook")


def test_external_ids_carry_our_prefix_not_a_bare_invoice_id():
    assert events.external_id(TAG, "123", 1) == "stark-challenge-inv-123"
    assert events.external_id(TAG, "123", 2) == "stark-challenge-inv-123-2"


def test_a_credit_of_our_invoice_queues_amount_minus_fee(store, clock, issued):
    outcome = store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    assert outcome.text == "credit queued"
    (t,) = store.transfers()
    assert (t.external_id, t.amount, t.state) == ("stark-challenge-inv-inv-1", 9975, "pending")
    assert store.event_processed("e1")


def test_the_same_credit_in_another_event_is_not_queued_twice(store, clock, issued):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    outcome = store_and_process(store, invoice_event("e2", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    assert outcome.text == "credit already recorded"
    assert len(store.transfers()) == 1


def test_a_credit_of_an_invoice_no_round_issued_moves_nothing_and_writes_no_credit(store, clock):
    # Tagged with our (public) tag, but Stark Bank, asked with our credentials, has no such invoice.
    event = invoice_event("e1", "credited", id="1234", amount=77700, fee=0, tags=[TAG])
    outcome = store_and_process(store, event, clock(), events.Facts(invoices={"1234": None}))
    assert outcome.text.startswith("not issued here")
    assert store.transfers() == [] and store.credit("1234") is None and store.event_processed("e1")
    assert store.summary()["events"]["not_ours"] == 1


def test_a_credit_of_an_unknown_invoice_waits_for_stark_banks_answer(store, clock):
    event = invoice_event("e1", "credited", id="1234", amount=500, fee=5, tags=[TAG])
    assert events.question(store, event) == events.Question("invoice", "1234")
    assert store_and_process(store, event, clock()) is None
    assert not store.event_processed("e1") and store.transfers() == []


def test_an_invoice_stark_bank_confirms_is_forwarded_with_its_amounts_not_the_events(store, clock):
    event = invoice_event("e1", "credited", id="1234", amount=10 ** 15, fee=0, tags=[TAG])
    confirmed = {"1234": {"amount": 20000, "fee": 50, "status": "paid", "tags": [TAG, "batch-x"]}}
    assert store_and_process(store, event, clock(), events.Facts(invoices=confirmed)).text == "credit queued"
    (t,) = store.transfers()
    assert (t.external_id, t.amount) == ("stark-challenge-inv-1234", 19950)


@pytest.mark.parametrize("found", [
    {"amount": 20000, "fee": 50, "status": "paid", "tags": ["other-app"]},
    {"amount": 20000, "fee": 50, "status": "paid", "tags": "stark-challenge"},  # a string must not match
    {"amount": 20000, "fee": 0, "status": "created", "tags": [TAG]},
])
def test_an_invoice_stark_bank_returns_untagged_or_unpaid_is_not_forwarded(store, clock, found):
    event = invoice_event("e1", "credited", id="1234", amount=20000, fee=50, tags=[TAG])
    outcome = store_and_process(store, event, clock(), events.Facts(invoices={"1234": found}))
    assert outcome.text.startswith("not issued here")
    assert store.transfers() == [] and store.credit("1234") is None


@pytest.mark.parametrize("amount, fee", [(50, 50), (40, 50), (0, 0), (-100, 0), (100, -1)])
def test_a_credit_whose_fee_is_not_below_a_positive_amount_is_invalid(store, clock, issued, amount, fee):
    outcome = store_and_process(store, invoice_event("e1", "credited", amount=amount, fee=fee, tags=[TAG]), clock())
    assert outcome.text.startswith("invalid")
    assert store.transfers() == [] and store.credit(issued) is None


@pytest.mark.parametrize("invoice", [
    {"amount": "100", "fee": 1, "tags": [TAG]},
    {"amount": 100.5, "fee": 1, "tags": [TAG]},
    {"fee": 1, "tags": [TAG]},
    {"amount": True, "fee": 0, "tags": [TAG]},
    {"amount": 100, "tags": [TAG]},  # no fee: never taken as 0
])
def test_credits_without_integer_cents_are_not_forwarded(store, clock, issued, invoice):
    outcome = store_and_process(store, invoice_event("e1", "credited", **invoice), clock())
    assert outcome.text.startswith("invalid")
    assert store.transfers() == [] and store.event_processed("e1")


def test_an_invalid_credit_does_not_block_the_genuine_one(store, clock, issued):
    store_and_process(store, invoice_event("e1", "credited", amount=100, tags=[TAG]), clock())
    outcome = store_and_process(store, invoice_event("e2", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    assert outcome.text == "credit queued" and [t.amount for t in store.transfers()] == [9975]


def test_broken_bodies_are_marked_processed_with_the_reason(store, clock):
    event = StoredEvent("e1", "invoice", "credited", {"log": {}}, "webhook")
    outcome = store_and_process(store, event, clock())
    assert outcome.text.startswith("invalid: KeyError")
    assert store.event_processed("e1")


def test_unknown_subscriptions_are_marked_processed(store, clock):
    event = StoredEvent("e1", "boleto", "paid", {"log": {"type": "paid"}}, "webhook")
    assert store_and_process(store, event, clock()).text == "ignored: subscription 'boleto'"


def test_a_processed_event_is_not_applied_again(store, clock, issued):
    event = invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG])
    store_and_process(store, event, clock())
    assert events.process(store, event, TAG, clock()).text == "already processed"


def test_transfer_failure_queues_a_second_attempt_under_a_derived_id(store, clock, issued):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    ext = "stark-challenge-inv-inv-1"
    store.transfer_created(ext, "5001", "created", clock())
    failed = transfer_event("e2", "failed", "5001", ext, errors=["Receiver account is closed"])  # strings, as Stark Bank sends
    assert events.question(store, failed) == events.Question("transfer", "5001")
    outcome = store_and_process(store, failed, clock(), events.Facts(transfers={"5001": "failed"}))
    assert outcome.text == "transfer failed"
    states = {t.external_id: (t.state, t.errors) for t in store.transfers()}
    assert states == {ext: ("failed", (("", "Receiver account is closed"),)), ext + "-2": ("pending", ())}


def test_a_failed_log_stark_bank_does_not_confirm_queues_nothing(store, clock, issued):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    ext = "stark-challenge-inv-inv-1"
    store.transfer_created(ext, "5001", "success", clock())
    outcome = store_and_process(store, transfer_event("e2", "failed", "5001", ext), clock(),
                                events.Facts(transfers={"5001": "success"}))
    assert outcome.text.startswith("transfer failed not confirmed")
    assert [(t.external_id, t.state) for t in store.transfers()] == [(ext, "success")]


@pytest.mark.parametrize("log_type", ["failed", "success"])
def test_a_log_with_our_external_id_but_another_transfer_id_changes_nothing(store, clock, issued, log_type):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    ext = "stark-challenge-inv-inv-1"
    store.transfer_created(ext, "5001", "created", clock())
    event = transfer_event("e2", log_type, "5999", ext)
    assert events.question(store, event) is None  # nothing to ask: the ids differ
    assert store_and_process(store, event, clock()).text == "transfer not ours"
    assert [(t.external_id, t.state, t.transfer_id) for t in store.transfers()] == [(ext, "created", "5001")]


def test_a_log_for_a_transfer_without_a_recorded_id_waits_for_our_lookup(store, clock, issued):
    store_and_process(store, invoice_event("e1", "credited", amount=10000, fee=25, tags=[TAG]), clock())
    ext = "stark-challenge-inv-inv-1"
    event = transfer_event("e2", "success", "5999", ext)
    assert events.question(store, event) == events.Question("lookup", ext)
    assert store_and_process(store, event, clock()) is None
    # Our lookup by tag found no transfer: the log is another workspace's.
    assert store_and_process(store, event, clock(), events.Facts(not_created=frozenset({ext}))) == \
        ("transfer_not_ours", "transfer not ours")
    assert [(t.state, t.transfer_id) for t in store.transfers()] == [("pending", None)]


def test_transfer_events_of_other_apps_are_ignored(store, clock):
    body = {"id": "e2", "subscription": "transfer", "log": {"type": "success", "transfer": {"id": "t9"}}}
    assert store_and_process(store, StoredEvent("e2", "transfer", "success", body, "webhook"), clock()) == \
        ("transfer_not_ours", "transfer not ours")


def test_shape_check_returns_the_event():
    document = {"event": {"id": "e", "subscription": "transfer", "log": {"type": "success", "transfer": {"id": "t"}}}}
    assert events.check_shape(document) == events.Event("e", "transfer", "success", "t", document["event"])
    other = {"event": {"id": "e", "subscription": "x", "log": {"type": "y"}}}
    assert events.check_shape(other).entity_id == ""
