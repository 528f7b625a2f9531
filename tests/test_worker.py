"""worker: one pass pulls missed events, processes stored ones and sends transfers, against the emulator."""

import random

import pytest

from stark_challenge.bank import Bank
from stark_challenge.invoicer import Invoicer
from stark_challenge.transfers import Sender
from stark_challenge.worker import Worker

from conftest import sdk_config, wait_for


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
        store.add_event(event["id"], event["subscription"], event["log"]["type"], "", event, "webhook", clock())
    worker.run_once()
    clock.advance(601)
    worker.run_once()  # the periodic pull is due again
    assert len(emulator.transfers()) == 6


def test_a_failed_pull_is_logged_and_tried_at_the_next_interval(emulator, parts, clock, caplog):
    _, worker = parts
    emulator.fail_next("GET", "/v2/event", count=1, status=500)
    assert worker.pull_events() == 0
    assert "pull of undelivered events failed" in caplog.text
    assert worker.run_once() <= 600
    clock.advance(600)
    calls = len([r for r in emulator.requests if r["path"] == "/v2/event"])
    worker.run_once()
    assert len([r for r in emulator.requests if r["path"] == "/v2/event"]) == calls + 1


def test_the_thread_wakes_on_a_new_event_and_stops_cleanly(emulator, parts, store, clock):
    _, worker = parts
    worker.start()
    store.add_credit("inv-9", "ev-9", 5000, 10, "stark-challenge-inv-inv-9", clock())
    worker.wake()
    wait_for(lambda: len(emulator.transfers()) == 1, message="the transfer")
    worker.stop(timeout=5)
    assert not worker.state()["alive"]
