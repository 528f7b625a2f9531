"""retention: old events deleted in small batches from a real SQLite store; money rows never."""

from stark_challenge import retention
from stark_challenge.events import Event
from stark_challenge.retention import Retention
from stark_challenge.store import PRUNE_BATCH
from stark_challenge.vocabulary import Outcome

DAY = 86400


def add_events(store, count, now, prefix="ev", processed=True):
    for i in range(count):
        event_id = f"{prefix}{i}"
        store.add_event(Event(event_id, "invoice", "updated", f"inv-{prefix}{i}", {"id": event_id}), "webhook", now)
        if processed:
            store.finish_event(event_id, Outcome("invoice_status", "invoice updated"), now)


def event_ids(store):
    return {row[0] for row in store._all("select id from event")}


def test_prune_deletes_processed_events_received_before_the_cut_in_batches(store, clock):
    old = clock()
    add_events(store, 7, old, "old")
    add_events(store, 2, old, "waiting", processed=False)  # never processed: kept whatever its age
    new = clock.advance(10)
    add_events(store, 3, new, "new")

    assert store.prune_events(new, limit=5) == 5
    assert store.prune_events(new, limit=5) == 2
    assert store.prune_events(new, limit=5) == 0
    assert event_ids(store) == {"waiting0", "waiting1", "new0", "new1", "new2"}


def test_prune_never_deletes_money_rows(store, clock):
    store.add_event(Event("ev-credit", "invoice", "credited", "inv1", {"id": "ev-credit"}), "webhook", clock())
    store.add_credit("inv1", "ev-credit", 10000, 50, "tag-inv-inv1", clock())
    store.finish_event("ev-credit", Outcome("credit_queued", "credit queued"), clock())
    before = {table: store._one(f"select count(*) from {table}")[0] for table in ("credit", "transfer")}

    assert store.prune_events(clock.advance(1), limit=10) == 1
    assert event_ids(store) == set()
    assert {table: store._one(f"select count(*) from {table}")[0] for table in ("credit", "transfer")} == before
    assert before == {"credit": 1, "transfer": 1}
    assert store.credit("inv1") is not None and store.transfer("tag-inv-inv1") is not None


def test_the_status_summary_shows_the_size_and_the_oldest_event(store, clock):
    empty = store.summary()["storage"]
    add_events(store, 50, clock())
    storage = store.summary()["storage"]
    assert storage["oldest_event_at"] == clock().isoformat(timespec="microseconds")
    assert storage["bytes"] > empty["bytes"] and storage["free_bytes"] >= 0
    store.prune_events(clock.advance(1), limit=100)
    pruned = store.summary()["storage"]
    # the pages freed stay in the file for reuse: in use plus free is the file's size
    assert pruned["oldest_event_at"] is None and pruned["free_bytes"] > 0
    assert pruned["bytes"] + pruned["free_bytes"] == storage["bytes"] + storage["free_bytes"]


def test_retention_deletes_only_events_older_than_it_keeps(store, clock):
    add_events(store, 4, clock(), "old")
    clock.advance(2 * DAY)
    add_events(store, 3, clock(), "recent")
    keeper = Retention(store, keep_s=DAY, clock=clock)

    assert keeper.run_if_due() == 4
    assert event_ids(store) == {"recent0", "recent1", "recent2"}
    assert keeper.deleted == 4


def test_retention_runs_at_most_every_interval_unless_a_backlog_is_left(store, clock, monkeypatch):
    monkeypatch.setattr(retention, "MAX_BATCHES", 2)
    add_events(store, 2 * PRUNE_BATCH + 10, clock())
    keeper = Retention(store, keep_s=10, clock=clock)
    clock.advance(11)

    assert keeper.run_if_due() == 2 * PRUNE_BATCH  # two full batches: the rest is left for the next pass
    assert keeper.run_if_due() == 10  # due again at once, and the backlog is gone
    add_events(store, 5, clock(), "later")
    clock.advance(retention.EVERY_S / 2)  # old enough to go, but no run is due yet
    assert keeper.run_if_due() == 0
    clock.advance(retention.EVERY_S / 2)
    assert keeper.run_if_due() == 5


def test_no_retention_keeps_every_event(store, clock):
    add_events(store, 3, clock())
    clock.advance(365 * DAY)
    assert Retention(store, keep_s=0, clock=clock).run_if_due() == 0
    assert len(event_ids(store)) == 3


def test_the_page_cache_and_the_log_limit_are_set_on_the_connection(store):
    from stark_challenge.store import CACHE_KIB, WAL_LIMIT_BYTES

    assert store._one("pragma cache_size")[0] == -CACHE_KIB
    assert store._one("pragma journal_size_limit")[0] == WAL_LIMIT_BYTES
