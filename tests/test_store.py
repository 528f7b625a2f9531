"""store: the exactly-once invariants of the SQLite state, on a real database file."""

import datetime
import sqlite3
import threading

import pytest

from stark_challenge.events import Event
from stark_challenge.store import Store, StoreError, StoreLocked

UTC = datetime.timezone.utc


def at(minute=0):
    return datetime.datetime(2026, 11, 28, 12, minute, tzinfo=UTC)


def rows(store, sql):
    conn = sqlite3.connect(store.path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_the_database_runs_in_wal_mode(store):
    assert rows(store, "pragma journal_mode") == [("wal",)]


def test_a_second_process_cannot_open_the_same_database(store):
    with pytest.raises(StoreLocked):
        Store(store.path)


def test_the_lock_is_released_on_close(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    Store(path).close()
    Store(path).close()


def test_the_first_schedule_wins_on_restart(store):
    first = store.start_schedule("aaaa", at(0), 10800, 86400)
    again = store.start_schedule("bbbb", at(30), 60, 0)
    assert again == first == {"schedule_id": "aaaa", "started_at": at(0), "interval_s": 10800, "duration_s": 86400}


def test_an_event_is_stored_once_even_when_delivered_concurrently(store):
    results = []
    barrier = threading.Barrier(8)

    def deliver():
        barrier.wait()
        results.append(store.add_event(Event("ev1", "invoice", "credited", "inv1", {"id": "ev1"}), "webhook", at()))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert rows(store, "select id, processed_at from event") == [("ev1", None)]


def test_a_credit_queues_exactly_one_transfer_whatever_the_repeats(store):
    assert store.add_credit("inv1", "ev1", 10000, 50, "tag-inv-inv1", at()) is True
    assert store.add_credit("inv1", "ev2", 10000, 50, "tag-inv-inv1", at(1)) is False
    assert rows(store, "select invoice_id, event_id, amount, fee, net from credit") == [
        ("inv1", "ev1", 10000, 50, 9950)]
    assert rows(store, "select external_id, attempt, amount, state from transfer") == [
        ("tag-inv-inv1", 1, 9950, "pending")]


def test_a_failed_block_leaves_nothing_behind(store):
    with pytest.raises(RuntimeError):
        with store.atomic():
            store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
            raise RuntimeError("crash between the credit and the rest")
    assert rows(store, "select count(*) from credit") == [(0,)]
    assert rows(store, "select count(*) from transfer") == [(0,)]


def test_a_transfer_is_claimed_by_one_caller_only(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    results = []
    barrier = threading.Barrier(6)

    def claim():
        barrier.wait()
        results.append(store.claim_transfer("x-1", at(1)))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert store.transfer("x-1").state == "sending" and store.transfer("x-1").tries == 1


def test_due_transfers_respect_the_backoff(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at(0))
    store.claim_transfer("x-1", at(0))
    store.retry_transfer("x-1", [("", "timeout")], at(5), at(0))
    assert store.due_transfers(at(4)) == []
    assert [t.external_id for t in store.due_transfers(at(5))] == ["x-1"]
    assert store.next_transfer_due_at() == at(5)


def test_a_failed_first_attempt_queues_one_second_attempt(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    store.claim_transfer("x-1", at())
    store.transfer_created("x-1", "t1", "created", at())
    # A failed log Stark Bank did not confirm (transfer.get for our id) changes nothing.
    store.apply_transfer_status("x-1", "t1", "failed", [("", "?")], at(1), retry_external_id="x-2")
    assert rows(store, "select external_id, state from transfer") == [("x-1", "created")]
    store.apply_transfer_status("x-1", "t1", "failed", [("invalidAccount", "closed")], at(1), retry_external_id="x-2",
                                confirmed_failed=True)
    store.apply_transfer_status("x-1", "t1", "failed", [], at(2), retry_external_id="x-2",
                                confirmed_failed=True)  # a second event
    assert rows(store, "select external_id, attempt, state, amount from transfer order by attempt") == [
        ("x-1", 1, "failed", 9950), ("x-2", 2, "pending", 9950)]
    assert store.transfer("x-1").errors == (("invalidAccount", "closed"),)
    # The second attempt failing too queues nothing more.
    store.claim_transfer("x-2", at(3))
    store.transfer_created("x-2", "t2", "created", at(3))
    store.apply_transfer_status("x-2", "t2", "failed", [], at(4), retry_external_id="x-3", confirmed_failed=True)
    assert rows(store, "select count(*) from transfer") == [(2,)]


def test_transfer_status_only_moves_forward(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    store.claim_transfer("x-1", at())
    store.transfer_created("x-1", "t1", "created", at())
    store.apply_transfer_status("x-1", "t1", "success", [], at(1))
    store.transfer_created("x-1", "t1", "created", at(2))  # a lookup's answer arrives late
    store.apply_transfer_status("x-1", "t1", "processing", [], at(3))
    assert store.transfer("x-1").state == "success"


def test_a_transfer_log_changes_only_the_transfer_whose_stark_bank_id_we_recorded(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    store.claim_transfer("x-1", at())
    # No id recorded yet (the create call got no answer): nothing to compare with, nothing changes.
    store.apply_transfer_status("x-1", "t9", "success", [], at(1))
    store.transfer_created("x-1", "t1", "created", at(2))
    store.apply_transfer_status("x-1", "t9", "success", [], at(3))
    store.apply_transfer_status("x-1", "t9", "failed", [], at(3), retry_external_id="x-2", confirmed_failed=True)
    assert rows(store, "select external_id, state, transfer_id from transfer") == [("x-1", "created", "t1")]


def test_a_confirmed_failure_after_success_counts_and_queues_the_second_attempt(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    store.claim_transfer("x-1", at())
    store.transfer_created("x-1", "t1", "success", at())
    store.apply_transfer_status("x-1", "t1", "failed", [], at(1), retry_external_id="x-2")
    assert rows(store, "select external_id, state from transfer") == [("x-1", "success")]
    store.apply_transfer_status("x-1", "t1", "failed", [], at(2), retry_external_id="x-2", confirmed_failed=True)
    assert rows(store, "select external_id, state from transfer order by attempt") == [
        ("x-1", "failed"), ("x-2", "pending")]


def test_paid_after_credited_keeps_the_invoice_credited(store):
    store.claim_round(0, at(), 1, at())
    store.record_invoices(0, 0, [{"id": "i1", "amount": 500, "name": "A B", "tax_id": "x", "status": "created"}], at())
    assert store.update_invoice("i1", "credited", at(1), fee=50) is True
    assert store.update_invoice("i1", "paid", at(2)) is True  # ours, left credited
    assert store.update_invoice("i1", "created", at(3)) is True  # a late 'created': left credited too
    assert rows(store, "select status, fee from invoice") == [("credited", 50)]
    assert store.update_invoice("not-ours", "paid", at()) is False


def test_an_invoice_status_never_goes_back_to_an_earlier_stage(store):
    store.claim_round(0, at(), 2, at())
    store.record_invoices(0, 0, [{"id": i, "amount": 500, "name": "A B", "tax_id": "x", "status": "created"}
                                 for i in ("i1", "i2")], at())
    for invoice_id, arrivals in (("i1", ("expired", "overdue", "created")), ("i2", ("reversed", "credited", "paid"))):
        for n, status in enumerate(arrivals):
            assert store.update_invoice(invoice_id, status, at(n), fee=7 if status == "credited" else None) is True
    assert rows(store, "select id, status, fee from invoice order by id") == [("i1", "expired", None),
                                                                           ("i2", "reversed", 7)]


def test_a_round_is_claimed_until_it_is_settled(store):
    first = store.claim_round(0, at(), 9, at())
    assert (first.attempts, first.planned) == (0, 9)
    retry = store.claim_round(0, at(), 12, at(1))  # a retry keeps the size drawn first
    assert (retry.attempts, retry.planned) == (1, 9)
    store.record_invoices(0, 0, [{"id": f"i{k}", "amount": 100, "name": "n", "tax_id": "t"} for k in range(9)], at(1))
    done = store.finish_round(0, at(2))
    assert (done.state, done.count, done.total) == ("issued", 9, 900)
    assert store.claim_round(0, at(), 9, at(3)) is None


def test_the_read_only_report_sees_committed_numbers_while_the_store_is_open(store):
    store.add_credit("inv1", "ev1", 10000, 50, "x-1", at())
    reader = Store(store.path, read_only=True)
    try:
        summary = reader.summary()
        with pytest.raises(StoreError, match="readonly"):
            reader.add_credit("inv2", "ev2", 10000, 50, "x-2", at())
    finally:
        reader.close()
    assert summary["credits"] == {"count": 1, "amount": 10000, "fee": 50, "net": 9950}
    assert summary["transfers"] == {"pending": {"count": 1, "amount": 9950}}
