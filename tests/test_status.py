"""Status report: `python -m stark_challenge status` and GET /status, against a database filled
by a real run with the emulator, compared with the emulator's own records."""

import base64
import datetime
import json
import os
import re
import sqlite3

import pytest

from stark_challenge.vocabulary import Outcome

from stark_challenge import report
from stark_challenge.store import Store, StoreError

from support import run_cli, signed_event, wait_for

PASSWORD = "status-Pa55word"


def _reais(cents):
    return f"R$ {cents // 100:,}.{cents % 100:02d}"


def _basic(username, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def cli(*args, cwd, **env):
    """Run ``python -m stark_challenge ARGS`` in ``cwd`` with an isolated environment plus ``env``."""
    return run_cli(*args, cwd=cwd, env=env)


def status_json(database, cwd):
    done = cli("status", "--json", cwd=cwd, DATABASE_PATH=database)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _expected(emulator):
    """Return the numbers the report must show, computed from the emulator's records."""
    invoices = emulator.invoices()
    paid = [i for i in invoices if i["status"] == "paid"]
    success = [t for t in emulator.transfers() if t["status"] == "success"]
    return {
        "invoice_count": len(invoices),
        "invoice_total": sum(i["amount"] for i in invoices),
        "credited": sum(i["amount"] for i in paid),
        "fees": sum(i["fee"] for i in paid),
        "transferred": sum(t["amount"] for t in success),
        "credits": len(paid),
    }


def _actual(data):
    return {
        "invoice_count": sum(v["count"] for v in data["invoices"].values()),
        "invoice_total": sum(v["amount"] for v in data["invoices"].values()),
        "credited": data["credits"]["amount"],
        "fees": data["credits"]["fee"],
        "transferred": data["transferred"],
        "credits": data["credits"]["count"],
    }


@pytest.fixture
def filled(emulator, service_factory, tmp_path):
    """A service that ran one round, every invoice paid and forwarded; still running."""
    return _fill(emulator, service_factory, tmp_path, rounds=1)


@pytest.fixture(scope="module")
def shared_filled(module_emulator, module_service_factory, tmp_path_factory):
    """filled, made once for the tests of this module that only read it (on module_emulator)."""
    return _fill(module_emulator, module_service_factory, tmp_path_factory.mktemp("status"))


def _fill(emulator, service_factory, tmp_path, rounds=2):
    """Run ``rounds`` rounds (1 s apart), wait until every invoice is paid and forwarded; return the service."""
    emulator.set(pay_ratio=1.0, invoice_fee=41)
    service = service_factory(WEBHOOK_USERNAME="ops", WEBHOOK_PASSWORD=PASSWORD, INVOICE_INTERVAL="1s",
                              INVOICE_DURATION=f"{rounds}s", INVOICE_MIN=5, INVOICE_MAX=7)
    service.start()
    wait_for(lambda: len({i["tags"][1] for i in emulator.invoices()}) == rounds, message=f"{rounds} rounds")
    wait_for(lambda: len(emulator.transfers()) == len(emulator.invoices())
             and all(t["status"] == "success" for t in emulator.transfers()), message="every transfer succeeded")
    # The service has heard of every success and processed every event.
    expected = _expected(emulator)
    database = service.env["DATABASE_PATH"]
    def settled():
        data = status_json(database, tmp_path)
        events = data["events"]
        return (_actual(data) == expected and events["pending"] == 0
                and events["received"] == len(emulator.events()) and not emulator.deliveries_pending())

    wait_for(settled, message="the report to settle")
    return service


def test_status_json_matches_the_emulators_records(module_emulator, shared_filled, tmp_path):
    data = status_json(shared_filled.env["DATABASE_PATH"], tmp_path)
    expected = _expected(module_emulator)

    assert _actual(data) == expected
    assert expected["credited"] - expected["fees"] == data["credits"]["net"] == data["transferred"]
    assert data["credits"]["fee"] == 41 * expected["credits"]
    assert set(data["invoices"]) == {"credited"}  # every invoice ended credited
    assert data["rounds"] == {"issued": 2, "issuing": 0, "failed": 0, "due": 2, "total": 2}
    assert data["transfers_pending"] == {"count": 0, "amount": 0}
    assert data["transfers_failed"] == {"count": 0, "amount": 0}
    assert data["transfers"] == {"success": {"count": expected["credits"], "amount": expected["transferred"]}}
    assert data["events"]["pending"] == 0
    assert data["events"]["received"] == len(module_emulator.events())
    assert data["events"]["last_webhook_at"] is not None


def test_status_table_shows_the_figures_in_reais(module_emulator, shared_filled, tmp_path):
    done = cli("status", cwd=tmp_path, DATABASE_PATH=shared_filled.env["DATABASE_PATH"])
    assert done.returncode == 0 and done.stderr == ""
    expected = _expected(module_emulator)
    credited, fees = _reais(expected["credited"]), _reais(expected["fees"])
    total, transferred = _reais(expected["invoice_total"]), _reais(expected["transferred"])
    n = expected["invoice_count"]
    lines = done.stdout.splitlines()
    last_webhook, database = lines[-3], lines[-1]
    assert last_webhook.startswith("last webhook  20")
    # the file's size in use and free, and the oldest event kept (see EVENT_RETENTION)
    assert re.fullmatch(r"database      \d+\.\d MiB in use, \d+\.\d MiB free for reuse; oldest event 20\S+", database)
    assert lines[:-3] + lines[-2:-1] == [
        "rounds        2 issued, 2 due so far, 2 in the window",
        f"invoices      {n} issued, {total}",
        f"  credited    {n}, {total}",  # invoices by status, with their totals
        f"credited      {expected['credits']} invoices, {credited}",
        f"fees          {fees}",
        f"to forward    {transferred}",
        f"transferred   {transferred} confirmed by Stark Bank",
        "pending       0 transfers, R$ 0.00",
        "failed        0 transfers, R$ 0.00",
        f"events        {len(module_emulator.events())} received, 0 waiting to be processed",
    ]


def test_get_status_needs_the_operators_basic_auth_and_equals_the_cli(module_emulator, shared_filled, tmp_path):
    status, body = shared_filled.request("GET", "/status")
    assert (status, body) == (401, {"error": "authentication required"})
    assert shared_filled.request("GET", "/status", headers=_basic("operator", "wrong"))[0] == 401
    # The webhook's credentials, which travel in the URL registered at Stark Bank, open no operator door.
    assert shared_filled.request("GET", "/status", headers=_basic("ops", PASSWORD))[0] == 401
    assert shared_filled.request("POST", "/transfers/retry", b'{"invoice_id": "1"}', _basic("ops", PASSWORD))[0] == 401

    status, served = shared_filled.operate("GET", "/status")
    printed = status_json(shared_filled.env["DATABASE_PATH"], tmp_path)
    assert status == 200
    served.pop("generated_at"), printed.pop("generated_at")
    details = served.pop("service")  # the live details only the running service knows
    assert served == printed
    assert details["store"] == "ok" and details["worker"]["alive"]


def test_status_reads_while_the_service_writes_without_blocking_it(emulator, filled, tmp_path):
    database = filled.env["DATABASE_PATH"]
    reader = Store(database, read_only=True)
    try:
        # A read transaction held open, as a slow `status` would.
        with reader.atomic():
            before = reader.summary()["events"]["received"]
            invoice = dict(emulator.invoices()[0], status="paid")
            body, headers = signed_event(emulator, "9100000000000001", invoice, log_type="paid")
            # Stored while the read transaction is still open: a reader that blocked writers
            # would make this write wait out its busy timeout and fail.
            status, reply = filled.request("POST", "/webhook", body, {**headers, **_basic("ops", PASSWORD)})
            assert (status, reply["status"]) == (200, "stored")
            # The reader keeps its snapshot; a new read sees the write.
            assert reader.summary()["events"]["received"] == before
        assert reader.summary()["events"]["received"] == before + 1
        with pytest.raises(StoreError, match="readonly"):
            reader.finish_event("9100000000000001", Outcome("ignored", "deleted"),
                                datetime.datetime.now(datetime.timezone.utc))
    finally:
        reader.close()
    assert status_json(database, tmp_path)["events"]["received"] == before + 1


def test_status_of_a_stopped_service_leaves_no_files_behind(filled, tmp_path):
    database = filled.env["DATABASE_PATH"]
    running = status_json(database, tmp_path)
    assert filled.stop() == 0
    directory = os.path.dirname(database)
    files = sorted(os.listdir(directory))
    assert not os.path.exists(database + "-wal")  # a clean stop checkpoints the WAL away

    stopped = status_json(database, tmp_path)
    assert sorted(os.listdir(directory)) == files
    running.pop("generated_at"), stopped.pop("generated_at")
    assert stopped == running


def test_status_of_a_fresh_database_prints_zeros(tmp_path):
    Store(str(tmp_path / "fresh.sqlite3")).close()
    done = cli("status", cwd=tmp_path, DATABASE_PATH=str(tmp_path / "fresh.sqlite3"))
    assert done.returncode == 0
    *lines, database = done.stdout.splitlines()
    assert re.fullmatch(r"database      0\.\d MiB in use, 0\.0 MiB free for reuse; oldest event none", database)
    assert lines == [
        "rounds        0 issued, 0 due so far, forever in the window",
        "invoices      0 issued, R$ 0.00",
        "credited      0 invoices, R$ 0.00",
        "fees          R$ 0.00",
        "to forward    R$ 0.00",
        "transferred   R$ 0.00 confirmed by Stark Bank",
        "pending       0 transfers, R$ 0.00",
        "failed        0 transfers, R$ 0.00",
        "last webhook  never",
        "events        0 received, 0 waiting to be processed",
    ]


def test_status_without_a_database_fails_with_one_line(tmp_path):
    done = cli("status", cwd=tmp_path, DATABASE_PATH=str(tmp_path / "missing.sqlite3"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"stark_challenge: {tmp_path / 'missing.sqlite3'}: no such database (set DATABASE_PATH)\n"
    assert not os.path.exists(tmp_path / "missing.sqlite3")


def test_a_read_only_store_refuses_a_file_that_is_not_our_database(tmp_path):
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).close()
    with pytest.raises(StoreError, match="cannot read the database"):
        Store(str(other), read_only=True)


def test_one_line_status_summarises_the_report():
    summary = {
        "schedule": None, "rounds": {"issued": 3, "issuing": 0, "failed": 0}, "invoices": {},
        "credits": {"count": 4, "amount": 50000, "fee": 200, "net": 49800},
        "transfers": {"success": {"count": 3, "amount": 39800}, "pending": {"count": 1, "amount": 10000}},
        "transferred": 39800, "events": {"received": 20, "pending": 2, "last_webhook_at": None},
    }
    data = report.build(summary, datetime.datetime(2026, 11, 28, tzinfo=datetime.timezone.utc))
    assert report.one_line(data) == ("rounds 3 issued; 4 credited; R$ 398.00 transferred; "
                                     "1 transfers pending, 0 failed; 2 events pending")
