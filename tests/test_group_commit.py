"""store.add_event, group_commit: events handed in together go to disk in one commit, each call answered
after its own. The statements a group runs are counted on SQLite (its trace callback); what is stored,
on both backends."""

import datetime
import threading
import time

import pytest
from support import wait_for
from support.databases import rows, run

from stark_challenge import group_commit
from stark_challenge.events import Event
from stark_challenge.store import StoreError

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def event(n):
    return Event(f"ev-{n}", "invoice", "created", f"inv-{n}", {"id": f"ev-{n}"})


def stored_ids(store):
    """The event ids another connection sees: what is committed, not what is in a transaction."""
    return sorted(r[0] for r in rows(store.path, "select id from event"))


def trace(store, callback):
    """Have the SQLite store's connection call ``callback`` with each statement it runs (None: stop)."""
    store._conn.connection.set_trace_callback(callback)


def deliver_while_busy(store, events):
    """Hand ``events`` to add_event from one thread each while the store is busy in a transaction.

    Return (results by event id, the SQL statements run, the busy transaction's own first).
    """
    results, statements = {}, []

    def deliver(e):
        try:
            results[e.id] = store.add_event(e, "webhook", NOW)
        except StoreError as error:
            results[e.id] = error

    threads = [threading.Thread(target=deliver, args=(e,)) for e in events]
    if store.backend == "sqlite":
        trace(store, statements.append)
    with store.atomic():  # the worker's transaction, say: every delivery waits for it
        for t in threads:
            t.start()
        wait_for(lambda: store._group.pending() == len(events), message="every delivery waiting")
    for t in threads:
        t.join(10)
    if store.backend == "sqlite":
        trace(store, None)
    return results, statements


def test_events_delivered_while_a_transaction_runs_are_committed_together(store):
    results, statements = deliver_while_busy(store, [event(n) for n in range(6)])

    assert results == {f"ev-{n}": True for n in range(6)}
    assert stored_ids(store) == [f"ev-{n}" for n in range(6)]
    kinds = [s.split()[0] for s in statements]
    assert kinds == ["begin", "commit"] + ["begin"] + ["insert"] * 6 + ["commit"]


def test_of_two_copies_in_one_group_exactly_one_is_new(any_store):
    store = any_store
    results, _ = deliver_while_busy(store, [event(1), event(2)])
    again, _ = deliver_while_busy(store, [event(1), event(3)])

    assert results == {"ev-1": True, "ev-2": True}
    assert again == {"ev-1": False, "ev-3": True}
    assert stored_ids(store) == ["ev-1", "ev-2", "ev-3"]


def test_when_a_group_commit_fails_every_event_of_it_is_refused_and_none_is_stored(any_store):
    store = any_store
    # A trigger stands in for a disk that refuses the write of one of them.
    if store.backend == "sqlite":
        run(store.path, "create trigger refuse before insert on event when new.id = 'ev-2'"
                        " begin select raise(abort, 'disk refused'); end")
    else:
        run(store.path, "create function refuse() returns trigger language plpgsql as $$ begin"
                        " if new.id = 'ev-2' then raise exception 'disk refused'; end if; return new; end $$",
            "create trigger refuse before insert on event for each row execute function refuse()")

    results, _ = deliver_while_busy(store, [event(n) for n in range(4)])

    assert sorted(results) == [f"ev-{n}" for n in range(4)]
    assert all(isinstance(r, StoreError) and "disk refused" in str(r) for r in results.values())
    assert stored_ids(store) == []
    assert store.add_event(event(1), "webhook", NOW) is True  # delivered again later: stored


def test_inside_a_callers_transaction_the_event_joins_it(any_store):
    store = any_store
    with pytest.raises(RuntimeError):
        with store.atomic():
            assert store.add_event(event(1), "pull", NOW) is True
            raise RuntimeError("the caller's block fails")

    assert stored_ids(store) == []
    with store.atomic():
        assert store.add_event(event(1), "pull", NOW) is True
    assert stored_ids(store) == ["ev-1"]


def test_an_event_waits_for_those_its_caller_says_are_coming_and_shares_their_commit(store, monkeypatch):
    monkeypatch.setattr(group_commit, "GROUP_WAIT_S", 30.0)  # only a broken wait would ever reach it
    statements, results = [], {}
    trace(store, statements.append)
    first = threading.Thread(target=lambda: results.update(first=store.add_event(event(1), "webhook", NOW, coming=1)))
    first.start()
    wait_for(lambda: store._group.pending() == 1, message="the first event handed in")

    results["second"] = store.add_event(event(2), "webhook", NOW)
    first.join(10)

    trace(store, None)
    assert results == {"first": True, "second": True}
    assert [s.split()[0] for s in statements] == ["begin", "insert", "insert", "commit"]


def test_an_event_with_nothing_coming_is_committed_without_waiting(store, monkeypatch):
    monkeypatch.setattr(group_commit, "GROUP_WAIT_S", 30.0)
    began = time.monotonic()
    assert store.add_event(event(1), "webhook", NOW) is True
    assert time.monotonic() - began < 10  # not the 30 s a wait would take
    assert stored_ids(store) == ["ev-1"]


def test_events_said_to_be_coming_that_never_come_delay_the_commit_only_briefly(store, monkeypatch):
    monkeypatch.setattr(group_commit, "GROUP_WAIT_S", 0.05)
    assert store.add_event(event(1), "webhook", NOW, coming=3) is True  # the three were forged, say
    assert stored_ids(store) == ["ev-1"]
