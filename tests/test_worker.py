"""worker: one pass pulls missed events, processes stored ones and sends transfers, against the emulator."""

import datetime
import random

import pytest

from stark_challenge.bank import Bank
from stark_challenge.events import Event
from stark_challenge.invoicer import Invoicer
from stark_challenge.store import Store
from stark_challenge.transfers import Sender
from stark_challenge.worker import IDLE_WAKE_S, Worker

from support import sdk_config, wait_for


@pytest.fixture
def store(any_store):
    """Every test of this module runs on both backends."""
    return any_store


@pytest.fixture
def parts(sdk, store, clock):
    config = sdk_config(sdk, INVOICE_MIN=6, INVOICE_MAX=6)
    bank = Bank(config)
    bank.configure()
    invoicer = Invoicer(bank, store, config, "s1", clock=clock, rng=random.Random(3))
    worker = Worker(store, bank, "stark-challenge", poll_interval_s=600, clock=clock,
                    sender=Sender(store, bank, "stark-challenge", clock, rng=random.Random(4)))
    return invoicer, worker


def test_missed_events_are_pulled_processed_forwarded_and_marked_delivered(emulator, parts, store, clock):
    invoicer, worker = parts
    emulator.set(hold_deliveries=True, pay_ratio=1.0)  # no webhook reaches us
    invoicer.issue_round(0, clock())
    wait_for(lambda: sum(1 for e in emulator.events() if e["log"]["type"] == "credited") == 6, message="credits")

    worker.run_once()

    assert len(emulator.transfers()) == 6
    paid = {i["id"]: i["amount"] - i["fee"] for i in emulator.invoices()}
    assert {t["tags"][1].removeprefix("invoice-"): t["amount"] for t in emulator.transfers()} == paid
    pulled = [e for e in emulator.events() if e["log"]["type"] == "credited"]
    assert all(e["isDelivered"] for e in pulled)
    assert store.pending_events() == []


def test_pulling_twice_or_after_a_push_forwards_nothing_twice(emulator, parts, store, clock):
    invoicer, worker = parts
    emulator.set(hold_deliveries=True, pay_ratio=1.0)
    invoicer.issue_round(0, clock())
    wait_for(lambda: sum(1 for e in emulator.events() if e["log"]["type"] == "credited") == 6, message="credits")
    worker.pull_events()
    # The same events, still marked undelivered at Stark Bank by a lost PATCH, come again.
    for event in emulator.events():
        store.add_event(Event(event["id"], event["subscription"], event["log"]["type"], "", event), "webhook", clock())
    worker.run_once()
    clock.advance(601)
    worker.run_once()  # the periodic pull is due again
    assert len(emulator.transfers()) == 6


def test_a_failed_pull_is_logged_and_tried_again_after_a_short_backoff(emulator, parts, clock, caplog):
    _, worker = parts
    pulls = lambda: [r["status"] for r in emulator.requests if r["path"] == "/v2/event"]  # noqa: E731
    emulator.fail_next("GET", "/v2/event", count=1, status=500)
    assert worker.pull_events() == 0
    assert "pull of undelivered events failed" in caplog.text

    wait = worker.run_once()  # not due yet: no call, and the pass asks to be woken for it
    assert pulls() == [500]
    assert 0 < wait < IDLE_WAKE_S  # the backoff, well before the 600 s poll interval
    clock.advance(wait)
    assert worker.run_once() == IDLE_WAKE_S  # pulled; the next pull is 600 s away
    assert pulls() == [500, 200]


def test_the_thread_wakes_on_a_new_event_and_stops_cleanly(emulator, parts, store, clock):
    _, worker = parts
    worker.start()
    store.add_credit("inv-9", "ev-9", 5000, 10, "stark-challenge-inv-inv-9", clock())
    worker.wake()
    wait_for(lambda: len(emulator.transfers()) == 1, message="the transfer")
    worker.stop(timeout=5)
    assert not worker.state()["alive"]


def test_an_event_that_fails_in_a_batch_stays_pending_and_the_others_are_processed(store, clock, monkeypatch, caplog):
    # Events are processed a batch per transaction; one failure rolls the batch
    # back and each event is done again in a transaction of its own.
    from stark_challenge import events

    store.claim_round(0, clock(), 3, clock())
    store.record_invoices(0, 0, [{"id": f"inv-{n}", "amount": 500, "name": "A", "tax_id": "x", "status": "created"}
                                 for n in (1, 2, 3)], clock())
    for n in (1, 2, 3):
        body = {"id": f"ev-{n}", "subscription": "invoice",
                "log": {"type": "credited", "invoice": {"id": f"inv-{n}", "amount": 500, "fee": 0, "tags": []}}}
        store.add_event(Event(f"ev-{n}", "invoice", "credited", f"inv-{n}", body), "webhook", clock())

    real_process = events.process

    def process(store, event, tag, now, facts):
        with store.atomic():  # its effects are written, then it fails inside its transaction
            outcome = real_process(store, event, tag, now, facts)
            if event.id == "ev-2":
                raise RuntimeError("the store refused")
            return outcome

    monkeypatch.setattr(events, "process", process)
    worker = Worker(store, None, "stark-challenge", poll_interval_s=0, clock=clock, sender=object())

    assert worker.process_events() == 2
    assert [e.id for e in store.pending_events()] == ["ev-2"]
    assert store.credit("inv-1") is not None and store.credit("inv-3") is not None
    assert store.credit("inv-2") is None  # rolled back with its event, not half-applied
    assert "event ev-2: processing failed; will retry" in caplog.text


def test_credits_arriving_soon_after_a_pass_began_are_forwarded_together_in_the_next(emulator, sdk, store, clock):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    worker = Worker(store, bank, "stark-challenge", poll_interval_s=600, clock=clock,
                    sender=Sender(store, bank, "stark-challenge", clock, rng=random.Random(4)), gather_s=1.0)
    creates = lambda: [r for r in emulator.requests if r["method"] == "POST" and r["path"] == "/v2/transfer"]  # noqa: E731
    worker.start()
    try:
        wait_for(lambda: worker.last_pass_at is not None, message="the first pass")  # nothing to do in it
        for n in range(1, 7):  # well within a second of that pass: each wakes the thread
            store.add_credit(f"inv-{n}", f"ev-{n}", 5000, 10, f"stark-challenge-inv-inv-{n}", clock())
            worker.wake()
        wait_for(lambda: len(emulator.transfers()) == 6, message="the six transfers")
    finally:
        worker.stop(timeout=5)
    assert len(creates()) == 1  # one pass, one create call, for the six


def test_one_pass_processes_every_stored_event_a_full_batch_at_a_time(emulator, parts, store, clock):
    _, worker = parts
    for n in range(250):  # two full batches of 100, then 50
        body = {"id": f"ev-{n}", "subscription": "invoice", "log": {"type": "paid", "invoice": {"id": f"inv-{n}"}}}
        store.add_event(Event(f"ev-{n}", "invoice", "paid", f"inv-{n}", body), "webhook", clock())

    worker.run_once()

    assert store.pending_events() == []


def test_a_lookup_that_finds_our_transfer_and_its_failure_settles_both_in_one_pass(emulator, sdk, store, clock):
    from stark_challenge import events as events_module
    from stark_challenge.bank import Bank
    from stark_challenge.vocabulary import transfer_tags
    from support import sdk_config

    bank = Bank(sdk_config(sdk))
    bank.configure()
    ext = "stark-challenge-inv-77"
    store.add_credit("77", "ev1", 10000, 50, ext, clock())
    store.claim_transfer(ext, clock())
    store.retry_transfer(ext, [("", "no answer")], clock() + datetime.timedelta(hours=1), clock())  # answer lost
    emulator.set(transfer_delay_s=600)
    (made,) = bank.create_transfers([(9950, ext, transfer_tags("stark-challenge", "77", ext))])
    emulator.fail_transfer(made["id"])
    failed = next(e for e in emulator.events() if e["log"]["type"] == "failed")
    events_module.accept(store, events_module.check_shape({"event": failed}), "pull", clock())
    worker = Worker(store, bank, "stark-challenge", 0, clock=clock)
    assert worker.process_events() == 1  # one pass: the lookup finds it, the get confirms its failure
    assert [(t.attempt, t.state, t.transfer_id) for t in store.attempts("77")] == [
        (1, "failed", made["id"]), (2, "pending", None)]


def test_a_failure_stark_banks_listing_does_not_show_yet_is_not_confirmed(emulator, sdk, store, clock):
    from stark_challenge.vocabulary import transfer_tags

    bank = Bank(sdk_config(sdk))
    bank.configure()
    sender = Sender(store, bank, "stark-challenge", clock)
    ext = "stark-challenge-inv-78"
    store.add_credit("78", "ev1", 10000, 50, ext, clock())
    store.claim_transfer(ext, clock())
    emulator.set(transfer_delay_s=600)
    made = bank.create_transfer(9950, ext, transfer_tags("stark-challenge", "78", ext))
    store.transfer_created(ext, made["id"], made["status"], clock())
    emulator.fail_transfer(made["id"])
    failed = bank.get("transfer", made["id"])
    emulator.set(read_lag_s=600)  # the listing by tag does not show it yet
    assert sender.confirm_failure(failed) is None
    emulator.set(read_lag_s=0)
    assert sender.confirm_failure(failed) == "failed"
    assert sender.confirm_failure({"id": "1", "external_id": "someone-else", "tags": []}) == "failed"  # not ours


def test_a_backlog_of_credits_is_forwarded_batch_by_batch_not_after_every_event(emulator, sdk, tmp_path, clock,
                                                                                 request):
    store = Store(str(tmp_path / "backlog.sqlite3"))  # the worker's order of work: one backend is enough
    request.addfinalizer(store.close)
    config = sdk_config(sdk, INVOICE_MIN=6, INVOICE_MAX=6)
    bank = Bank(config)
    bank.configure()
    emulator.set(hold_deliveries=True, pay_ratio=1.0)
    Invoicer(bank, store, config, "s1", clock=clock, rng=random.Random(3)).issue_round(0, clock())
    credited = wait_for(lambda: (lambda found: len(found) == 6 and found)(
        [e for e in emulator.events() if e["log"]["type"] == "credited"]), message="credits")
    emulator.mark_delivered([e["id"] for e in emulator.events()])  # they arrive as webhooks, below
    pending_at_send = []  # events still pending each time the worker sends the transfers due

    class Recording(Sender):
        def send_due(self, *args, **kwargs):
            pending_at_send.append(len(store.pending_events()))
            return super().send_due(*args, **kwargs)

    class TwoAtATime(Worker):  # batches of two events stand for batches of a hundred
        def process_events(self, limit=2):
            return super().process_events(limit)

    worker = TwoAtATime(store, bank, "stark-challenge", poll_interval_s=600, clock=clock,
                        sender=Recording(store, bank, "stark-challenge", clock, rng=random.Random(4)))
    worker.pull_events()  # the start-up pull: nothing undelivered
    for event in credited:
        store.add_event(Event(event["id"], "invoice", "credited", event["log"]["invoice"]["id"], event), "webhook",
                        clock())
    worker.run_once()

    assert pending_at_send[:3] == [4, 2, 0]  # the first credits went out while the others waited
    assert len(emulator.transfers()) == 6 and store.pending_events() == []
