"""store on PostgreSQL: instances sharing one database race for the same round, credit, event and transfer
claims, many times, and each is won exactly once; a claim is ended only by its holder and taken over
after its lease. Each instance is a Store of its own (its own connection and owner), in a thread."""

import datetime
import threading

import pytest
from support import sdk_config, wait_for

from stark_challenge import events
from stark_challenge.bank import Bank
from stark_challenge.events import Event
from stark_challenge.invoicer import Invoicer
from stark_challenge.store import LEASE_S, Store

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
LEASE = datetime.timedelta(seconds=LEASE_S)
RACES = 40  # each race below is run this many times
INSTANCES = 2
TAG = "stark-challenge"


@pytest.fixture
def instances(postgres):
    """INSTANCES stores on one new PostgreSQL schema."""
    url = postgres.new_url()
    stores = [Store(url) for _ in range(INSTANCES)]
    yield stores
    for store in stores:
        store.close()


def race(stores, action):
    """Run ``action(store)`` in one thread per store, released together; return the results in store order."""
    results = [None] * len(stores)
    barrier = threading.Barrier(len(stores))

    def run(k):
        barrier.wait()
        results[k] = action(stores[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_each_round_is_claimed_by_exactly_one_instance(instances):
    for n in range(RACES):
        claims = race(instances, lambda s: s.claim_round(n, NOW, 9, NOW))
        assert sum(c is not None for c in claims) == 1, (n, claims)
    # The winner holds it: the loser's later tries are refused until the lease ends.
    holder = next(s for s in instances if s.owner == instances[0].round(0).lease_owner)
    other = next(s for s in instances if s is not holder)
    assert other.claim_round(0, NOW, 9, NOW + datetime.timedelta(seconds=LEASE_S - 1)) is None
    assert holder.claim_round(0, NOW, 9, NOW).attempts == 1  # the holder may retry at once
    taken = other.claim_round(0, NOW, 9, NOW + datetime.timedelta(seconds=2 * LEASE_S))
    assert taken is not None and instances[0].round(0).lease_owner == other.owner
    assert holder.renew_round(0, NOW) is False  # taken over: the old holder stops


def test_each_credit_is_queued_by_exactly_one_instance(instances):
    for n in range(RACES):
        queued = race(instances, lambda s: s.add_credit(f"inv{n}", f"ev{n}", 10000, 50, f"x-{n}", NOW))
        assert sorted(queued) == [False, True], (n, queued)
    assert len(instances[0].transfers()) == RACES


def test_each_event_is_stored_once_and_processed_once_whichever_instance_receives_it(instances):
    for n in range(RACES):
        invoice = {"id": f"i{n}", "amount": 10000, "fee": 50, "tags": [TAG], "status": "paid"}
        body = {"id": f"e{n}", "subscription": "invoice", "log": {"type": "credited", "invoice": invoice}}
        event = Event(f"e{n}", "invoice", "credited", f"i{n}", body)
        stored = race(instances, lambda s: s.add_event(event, "webhook", NOW))
        assert sorted(stored) == [False, True]
        facts = events.Facts(invoices={f"i{n}": invoice})
        pending = instances[0].pending_events()
        race(instances, lambda s: [events.process(s, e, TAG, NOW, facts) for e in pending])
    assert instances[0].pending_events() == []
    assert len(instances[1].transfers()) == RACES  # one credit, one transfer each


def test_a_worker_reading_pending_events_skips_those_another_instance_is_processing(instances):
    for n in range(3):
        instances[0].add_event(Event(f"e{n}", "invoice", "paid", f"i{n}", {"id": f"e{n}"}), "webhook", NOW)
    with instances[0].atomic():
        assert instances[0].hold_event("e1")  # instance 0 is processing e1
        assert [e.id for e in instances[1].pending_events(skip_held=True)] == ["e0", "e2"]
        assert [e.id for e in instances[1].pending_events()] == ["e0", "e1", "e2"]
    assert [e.id for e in instances[1].pending_events(skip_held=True)] == ["e0", "e1", "e2"]  # released


def test_due_transfers_are_claimed_by_one_instance_each_and_none_is_left(instances):
    for n in range(RACES):
        instances[0].add_credit(f"inv{n}", f"ev{n}", 10000, 50, f"x-{n:02}", NOW)

    def claim_until_none(store):
        claimed = []
        while batch := store.claim_due_transfers(NOW, 3, store.owner, NOW + LEASE):
            claimed += [t.external_id for t in batch]
        return claimed

    claimed = race(instances, claim_until_none)
    every = [ext for batch in claimed for ext in batch]
    assert sorted(every) == [f"x-{n:02}" for n in range(RACES)]  # each once, none missed
    assert {t.state for t in instances[0].transfers()} == {"sending"}


def test_a_claim_is_ended_only_by_its_holder_and_taken_over_after_its_lease(instances):
    first, second = instances
    first.add_credit("inv1", "ev1", 10000, 50, "x-1", NOW)
    [claimed] = first.claim_due_transfers(NOW, 10, first.owner, NOW + LEASE)
    assert second.claim_due_transfers(NOW, 10, second.owner, NOW + LEASE) == []
    early = NOW + LEASE - datetime.timedelta(seconds=1)
    assert second.take_over("x-1", early, second.owner, early + LEASE) is False  # its lease still runs
    assert second.retry_transfer("x-1", [("", "not mine")], NOW, NOW, owner=second.owner) is False

    # The first instance is presumed dead once its lease is over: the second takes the claim.
    later = NOW + LEASE
    assert second.take_over("x-1", later, second.owner, later + LEASE) is True
    taken = second.transfer("x-1")
    assert (taken.state, taken.tries, taken.lease_owner) == ("sending", claimed.tries, second.owner)  # a lookup next
    assert first.settle_transfer("x-1", "rejected", [("late", "its answer came after the take-over")], later,
                                 owner=first.owner) is False
    assert first.transfer_created("x-1", "7001", "created", later, owner=first.owner) is False
    assert second.retry_transfer("x-1", [("", "not found at Stark Bank")], later, later, owner=second.owner) is True
    assert first.transfer("x-1").state == "pending"


def test_an_expired_claim_is_taken_over_by_exactly_one_instance(instances):
    later = NOW + LEASE
    for n in range(RACES // 4):
        instances[0].add_credit(f"inv{n}", f"ev{n}", 10000, 50, f"x-{n}", NOW)
        assert instances[0].claim_transfers([f"x-{n}"], NOW, "gone", NOW + LEASE) == [f"x-{n}"]
        taken = race(instances, lambda s: s.take_over(f"x-{n}", later, s.owner, later + LEASE))
        assert sorted(taken) == [False, True], (n, taken)
        assert instances[0].transfer(f"x-{n}").lease_owner in {s.owner for s in instances}


def test_a_transfer_queued_by_one_instance_wakes_the_others_at_once(instances):
    woken = threading.Event()
    listener = instances[1].listen(woken.set)
    try:
        wait_for(lambda: listener.listening, message="the second instance listening")
        woken.clear()  # it is also woken once as it starts listening, for what it may have missed
        instances[0].add_event(Event("ev1", "invoice", "created", "inv1", {"id": "ev1"}), "webhook", NOW)
        assert not woken.wait(0.5)  # an event is its receiver's to process: nobody else is woken
        instances[0].add_credit("inv0", "ev0", 10000, 50, "x-0", NOW)
        assert woken.wait(10)
        woken.clear()
        assert instances[0].add_credit("inv0", "ev0", 10000, 50, "x-0", NOW) is False  # a repeat queues nothing
        assert not woken.wait(0.5)
    finally:
        listener.stop()


def test_an_invoicer_leaves_a_round_another_instance_holds_until_its_claim_ends(instances, sdk, clock, emulator):
    config = sdk_config(sdk)
    bank = Bank(config)
    bank.configure()
    assert instances[0].claim_round(0, clock(), 3, clock()) is not None  # its create call is out, say
    invoicer = Invoicer(bank, instances[1], config, "s1", clock=clock)

    claimed_at = clock()

    # First the wait for a create call that may be out (BANK_TIMEOUT), as after a crash; then the claim's end.
    first = invoicer.issue_round(0, claimed_at)
    clock.advance(config.bank_timeout_s)
    second = invoicer.issue_round(0, claimed_at)

    assert first == ("retry", claimed_at + datetime.timedelta(seconds=config.bank_timeout_s))
    assert second == ("retry", claimed_at + datetime.timedelta(seconds=LEASE_S))
    assert [r for r in emulator.requests if r["path"] == "/v2/invoice"] == []
