"""The store upgrades an older database in place, step by step; a new one starts at the current version.

Versions 0 (before schema versions) and 1 only ever existed as SQLite files, so their
upgrades are tested on real SQLite files only; a new database is tested on both backends.
"""

import datetime
import json
import sqlite3

from stark_challenge.store import SCHEMA_VERSION, Store

from support import ROOT

T = "2026-11-28T12:00:00.000000+00:00"


def _version_0_database(path):
    """Write a version-0 database with rows of every kind the upgrade touches."""
    with open(f"{ROOT}/tests/fixtures/schema_v0.sql") as f:
        ddl = f.read()
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    events = [
        ("e1", "invoice", "credited", "1", "credit queued"),
        ("e2", "invoice", "credited", "9", "not issued here: Stark Bank has no such invoice in our workspace"),
        ("e3", "invoice", "credited", "8", "not issued here: the invoice lacks the tag 'x'"),
        ("e4", "invoice", "credited", "7", "invalid: fee 900 is not in 0..amount 100"),
        ("e5", "transfer", "success", "70", "transfer success"),
        ("e6", "transfer", "failed", "71", "transfer not ours"),
        ("e7", "invoice", "paid", "5", "invoice paid (not ours)"),
    ]
    conn.executemany("insert into event values (?, ?, ?, ?, '{}', 'webhook', ?, ?, ?)",
                     [(i, sub, log, ent, T, T, outcome) for i, sub, log, ent, outcome in events])
    conn.executemany("insert into credit values (?, ?, 10000, 50, 9950, ?, ?, ?)",
                     [(str(n), f"e{n}", state, None, T) for n, state in ((1, "queued"), (2, "queued"), (3, "queued"),
                                                                        (4, "queued"), (6, "skipped"))])
    dup = json.dumps([["invalidExternalId", "Element 0: externalId 'x' was already used"]])
    other = json.dumps([["invalidBranchCode", "bad"]])
    conn.executemany("insert into transfer values (?, ?, 1, 9950, ?, ?, 3, ?, ?, ?, ?)", [
        ("t-1", "1", "stalled", None, T, json.dumps([["", "timeout"]]), T, T),
        ("t-2", "2", "rejected", None, T, dup, T, T),
        ("t-3", "3", "rejected", None, T, other, T, T),
        ("t-4", "4", "created", "7000", T, None, T, T),
    ])
    conn.commit()
    conn.close()


def test_a_version_0_database_is_upgraded_in_place_and_its_money_rows_keep_their_meaning(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    _version_0_database(path)
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        states = {t.external_id: t.state for t in store.transfers()}
        # stalled: unanswered, sent again under its external id; a duplicate refusal: the transfer exists.
        assert states == {"t-1": "pending", "t-2": "exists", "t-3": "rejected", "t-4": "created"}
        assert store.transfer("t-4").transfer_id == "7000" and store.transfer("t-1").lease_owner is None
        assert store.credit("6") is None and store.credit("1") == {"amount": 10000, "fee": 50, "net": 9950,
                                                                    "event_id": "e1"}
        summary = store.summary()
        assert summary["events"]["not_ours"] == 3 and summary["events"]["invalid"] == 1
        assert store.credit_outcomes() == {"credit_queued": 1, "not_ours_unknown_invoice": 1,
                                           "not_ours_missing_tag": 1, "invalid_fee": 1}
        # The new verbs work on the upgraded tables.
        now = datetime.datetime(2026, 11, 28, 13, tzinfo=datetime.timezone.utc)
        assert store.claim_transfers(["t-1"], now, "me", now) == ["t-1"]
        assert store.sync_alarms("transfer_open", {"t-1": "open"}, now) == [("t-1", "open")]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("pragma table_info(credit)")]
    codes = dict(conn.execute("select id, outcome_code from event"))
    conn.close()
    assert "state" not in columns and "reason" not in columns
    assert codes == {"e1": "credit_queued", "e2": "not_ours_unknown_invoice", "e3": "not_ours_missing_tag",
                     "e4": "invalid_fee", "e5": "transfer_status", "e6": "transfer_not_ours",
                     "e7": "invoice_not_ours"}
    again = Store(path)  # opening an up-to-date database changes nothing
    try:
        assert again.schema_version() == SCHEMA_VERSION and again.transfer("t-2").state == "exists"
    finally:
        again.close()


def test_a_version_1_database_gets_the_rounds_leases(tmp_path):
    path = str(tmp_path / "v1.sqlite3")
    Store(path).close()
    conn = sqlite3.connect(path)  # what version 1 wrote: rounds without a lease
    conn.execute("alter table round drop column lease_owner")
    conn.execute("alter table round drop column lease_until")
    conn.execute("update schema_version set version = 1")
    conn.commit()
    conn.close()
    store = Store(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        now = datetime.datetime(2026, 11, 28, 13, tzinfo=datetime.timezone.utc)
        store.claim_round(1, now, 2, now)
        assert store.round(1).lease_owner == store.owner and store.round(1).lease_until > now
    finally:
        store.close()


def test_a_new_database_starts_at_the_current_version(any_store):
    assert any_store.schema_version() == SCHEMA_VERSION
    assert any_store._has_table("schema_version") and not any_store._has_table("no_such_table")
    reader = Store(any_store.path, read_only=True)  # a reader accepts it as it is
    try:
        assert reader.schema_version() == SCHEMA_VERSION
    finally:
        reader.close()


def test_a_database_of_a_newer_version_is_refused_on_both_backends(any_store):
    import pytest

    from stark_challenge.store import StoreError

    with any_store.atomic():
        any_store._execute("update schema_version set version = 99")
    with pytest.raises(StoreError, match="newer version"):
        Store(any_store.path, exclusive=False)
    with pytest.raises(StoreError, match="another version"):
        Store(any_store.path, read_only=True)


def test_a_postgresql_database_with_the_tables_but_no_schema_version_is_refused_and_left_as_it_is(postgres):
    import pytest

    from stark_challenge.store import StoreError
    from support.databases import rows, run

    url = postgres.new_url()
    Store(url).close()
    run(url, "drop table schema_version")
    with pytest.raises(StoreError, match=r"cannot open the database \(holds this service's tables but no schema "
                                         r"version .*; give the service a new database\)$"):
        Store(url)
    assert rows(url, "select count(*) from information_schema.tables where table_schema = current_schema()"
                " and table_name in ('schema_version', 'transfer')") == [(1,)]  # nothing created, nothing dropped


def test_a_reader_of_a_database_not_upgraded_yet_is_told_to_start_the_service_once(tmp_path):
    import pytest

    from stark_challenge.store import StoreError

    path = str(tmp_path / "old.sqlite3")
    _version_0_database(path)
    with pytest.raises(StoreError, match="start the service once to upgrade it"):
        Store(path, read_only=True)


def test_a_database_of_a_newer_version_is_refused(tmp_path):
    import sqlite3 as sql

    import pytest

    from stark_challenge.store import StoreError

    path = str(tmp_path / "new.sqlite3")
    Store(path).close()
    conn = sql.connect(path)
    conn.execute("update schema_version set version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer version"):
        Store(path)
