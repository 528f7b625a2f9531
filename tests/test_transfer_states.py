"""The state table is obeyed: every (state, move) pair tried on the store's one write of a transfer's state."""

import datetime
import itertools

import pytest

from stark_challenge import transfer_states
from stark_challenge.store import Store

NOW = datetime.datetime(2026, 11, 28, 12, tzinfo=datetime.timezone.utc)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def table_store(request, tmp_path_factory):
    """One store per backend for the module: every pair runs on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        store = Store(str(tmp_path_factory.mktemp("states") / "state.sqlite3"))
    else:
        store = Store(request.getfixturevalue("postgres").new_url())
    store.add_credit("1", "ev", 10000, 50, "x-1", NOW)
    yield store
    store.close()


def _in_state(store, state):
    """Put the row x-1 in ``state`` (a test's set-up: written around the checks)."""
    with store.atomic():
        store._conn.execute("update transfer set state = ?, lease_owner = 'me', lease_until = ? where external_id = 'x-1'",
                            (state, NOW.isoformat()))


@pytest.mark.parametrize("current,target,confirmed", list(itertools.product(
    transfer_states.NAMES, transfer_states.NAMES, (False, True))))
def test_every_move_is_written_only_if_the_table_allows_it(table_store, current, target, confirmed):
    _in_state(table_store, current)
    with table_store.atomic():  # Store._move: the one function every verb writes a transfer's state through
        written = table_store._move("x-1", target, NOW, confirmed_failed=confirmed, lease_owner="me")
    expected = target == current or transfer_states.allowed(current, target, confirmed)
    assert written == expected
    assert table_store.transfer("x-1").state == (target if expected else current)


def test_the_table_keeps_the_rules_money_depends_on():
    allowed = transfer_states.allowed
    # A failure counts only when confirmed, and is final.
    assert not allowed("success", "failed") and allowed("success", "failed", confirmed_failed=True)
    assert not any(allowed("failed", s, True) for s in transfer_states.NAMES)
    # What Stark Bank said exists, or refused, is never sent again.
    for state in ("exists", "rejected", "created", "processing", "success", "failed"):
        assert not allowed(state, "pending") and not allowed(state, "sending")
    assert not allowed("pending", "unknown") and not allowed("unknown", "pending")
    # Statuses only move up.
    assert not allowed("processing", "created") and not allowed("success", "processing")
    # A new external id follows only a confirmed final state that moved no money.
    assert transfer_states.FINAL_UNPAID == ("rejected", "failed")
    assert not set(transfer_states.FINAL_UNPAID) & set(transfer_states.MOVING + transfer_states.OPEN)


def test_a_claim_is_finished_only_by_its_lease_holder(table_store):
    _in_state(table_store, "pending")
    assert table_store.claim_transfers(["x-1"], NOW, "a", NOW + datetime.timedelta(minutes=1)) == ["x-1"]
    assert not table_store.retry_transfer("x-1", [], NOW, NOW, owner="b")
    assert not table_store.take_over("x-1", NOW, "b", NOW + datetime.timedelta(minutes=1))  # lease still runs
    later = NOW + datetime.timedelta(minutes=2)
    assert table_store.take_over("x-1", later, "b", later + datetime.timedelta(minutes=1))
    assert not table_store.transfer_created("x-1", "7001", "created", later, owner="a")  # the old holder
    assert table_store.transfer_created("x-1", "7001", "created", later, owner="b")
    assert table_store.transfer("x-1").state == "created" and table_store.transfer("x-1").lease_owner is None
