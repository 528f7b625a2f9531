"""`events`: the list and one event as the operator sees them, and `events replay` against the
emulator: an event the service never received goes through the normal path and moves the
money once; replaying it again, or any processed event, moves nothing."""

import json

from support import query, run_cli, service_settled, wait_for

from test_operations import AUTH

FEE = 37


def cli(service, *args, **env):
    """Run a command with the service's configuration (database, credentials, port, auth)."""
    return run_cli(*args, cwd=service.cwd, env={**{k: v for k, v in service.env.items()
                                                  if k not in ("HOME", "PYTHONPATH")}, **env})


def _credited(emulator, invoice_id):
    (event,) = [e for e in emulator.events()
                if e["log"]["type"] == "credited" and e["log"].get("invoice", {}).get("id") == invoice_id]
    return event


def _transfer_posts(emulator):
    return [c for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]


def test_events_lists_shows_and_replays_without_moving_money_twice(emulator, service_factory):
    emulator.set(pay_ratio=0.0, invoice_fee=FEE)
    # No webhook, and no pull but the one at start-up: the invoice's later events are missed.
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, EVENT_POLL_INTERVAL="1h", **AUTH)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 1, message="round 0")
    wait_for(lambda: service.request("GET", "/health")[1] == {"status": "ok"}, message="first pass")
    (invoice,) = emulator.invoices()
    emulator.pay(invoice["id"])
    credited = wait_for(lambda: [e for e in emulator.events() if e["log"]["type"] == "credited"], message="credit")
    credited = _credited(emulator, invoice["id"])
    assert query(service, "select count(*) from event where id = ?", (credited["id"],)) == [(0,)]

    # Replayed through the running service: stored as a pull, processed, forwarded once.
    done = cli(service, "events", "replay", credited["id"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"event {credited['id']} (invoice credited {invoice['id']}): stored")
    wait_for(lambda: [t["status"] for t in emulator.transfers()] == ["success"], message="one transfer")
    wait_for(lambda: service_settled(service, emulator), message="settled")
    assert emulator.transfers()[0]["amount"] == invoice["amount"] - FEE
    posts = len(_transfer_posts(emulator))

    # Again, while the service runs: a duplicate, nothing moves.
    again = cli(service, "events", "replay", credited["id"])
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"event {credited['id']}: already stored (credit queued); nothing done\n"

    listed = cli(service, "events")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines and all(len(line) <= 120 for line in lines), lines
    (line,) = [line for line in lines if credited["id"] in line]
    assert f" pull    invoice credited    {invoice['id']} " in line and line.endswith("credit queued")
    rows = json.loads(cli(service, "events", "--json", "--limit", "100").stdout)
    assert sorted(r["id"] for r in rows) == sorted(r[0] for r in query(service, "select id from event"))

    shown = cli(service, "events", "show", credited["id"])
    assert shown.returncode == 0, shown.stderr
    assert "outcome   credit queued" in shown.stdout.splitlines()
    assert json.loads(shown.stdout.split("body\n", 1)[1])["id"] == credited["id"]
    assert json.loads(cli(service, "events", "show", credited["id"], "--json").stdout)["outcome"] == "credit queued"
    unknown = cli(service, "events", "show", "999")
    assert unknown.returncode == 2 and unknown.stderr.startswith("stark_challenge: event 999: not in the database")

    # Stopped: the command opens the store itself; still a duplicate, still nothing moves.
    assert service.stop() == 0
    stopped = cli(service, "events", "replay", credited["id"])
    assert stopped.returncode == 0 and "already stored (credit queued); nothing done" in stopped.stdout
    nowhere = cli(service, "events", "replay", "999")
    assert nowhere.returncode == 2
    assert nowhere.stderr == "stark_challenge: event 999: Stark Bank has no such event for this workspace\n"
    assert len(_transfer_posts(emulator)) == posts
    assert [t["status"] for t in emulator.transfers()] == ["success"]
    assert query(service, "select count(*) from transfer") == [(1,)]


def test_a_replay_through_the_service_needs_its_credentials(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, **AUTH)
    service.start()
    wrong = cli(service, "events", "replay", "123", OPERATOR_PASSWORD="wrong")
    assert wrong.returncode == 1 and "the service answered 401" in wrong.stderr
    none = cli(service, "events", "replay", "123", OPERATOR_USERNAME="", OPERATOR_PASSWORD="")
    assert none.returncode == 2 and "set OPERATOR_USERNAME and OPERATOR_PASSWORD" in none.stderr
    webhooks = service.request("POST", "/events/replay", b'{"event_id": "123"}',
                               {"Authorization": "Basic b3BzOnMzY3JldC1wYXNz"})  # ops:s3cret-pass, the webhook's
    assert webhooks[0] == 401
    bad = service.operate("POST", "/events/replay", b'{"event_id": "../x"}')
    assert bad[0] == 400


def test_events_on_a_database_without_events(store, tmp_path):
    done = run_cli("events", cwd=tmp_path, env={"DATABASE_PATH": tmp_path / "state.sqlite3"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "no events\n", "")
    missing = run_cli("events", "show", "1", cwd=tmp_path, env={"DATABASE_PATH": tmp_path / "none.sqlite3"})
    assert missing.returncode == 1 and "no such database" in missing.stderr


def test_a_service_without_operator_credentials_takes_no_replay(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, OPERATOR_USERNAME="", OPERATOR_PASSWORD="")
    service.start()
    assert service.request("POST", "/events/replay", b'{"event_id": "1"}')[0] == 404
    done = cli(service, "events", "replay", "1")
    assert done.returncode == 2 and "set OPERATOR_USERNAME and OPERATOR_PASSWORD" in done.stderr


def test_replay_errors_are_one_line(emulator_project, store, tmp_path):
    database = {"DATABASE_PATH": tmp_path / "state.sqlite3"}
    store.close()  # stopped: the command opens the store itself
    no_file = run_cli("events", "replay", "1", cwd=tmp_path, env={"DATABASE_PATH": tmp_path / "none.sqlite3"})
    assert no_file.returncode == 1 and no_file.stderr.endswith("no such database (set DATABASE_PATH)\n")
    no_project = run_cli("events", "replay", "1", cwd=tmp_path, env=database)
    assert no_project.returncode == 2 and no_project.stderr.startswith("stark_challenge: STARK_PROJECT_ID: not set")
    unknown = run_cli("events", "replay", "1", cwd=tmp_path, env={**emulator_project.env, **database})
    assert unknown.returncode == 2 and unknown.stderr.endswith("Stark Bank has no such event for this workspace\n")
    unreachable = run_cli("events", "replay", "1", cwd=tmp_path,
                          env={**emulator_project.env, **database, "HTTPS_PROXY": "http://127.0.0.1:9",
                               "https_proxy": "http://127.0.0.1:9", "BANK_TIMEOUT": "2s"})
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("stark_challenge: Stark Bank did not answer, nothing stored: ")
    bad = run_cli("events", cwd=tmp_path, env={**database, "INVOICE_MIN": "eight"})
    assert (bad.returncode, bad.stderr) == (2, "stark_challenge: INVOICE_MIN: must be a whole number\n")


def test_a_listing_line_fits_120_columns_whatever_the_outcome():
    from stark_challenge.event_commands import _line

    row = {"received_at": "2026-12-06T02:00:00.123456+00:00", "id": "6" * 16, "source": "webhook",
           "subscription": "invoice", "log_type": "credited", "entity_id": "5" * 16,
           "outcome": "not issued here: Stark Bank reports it 'created', not paid, and a great deal more"}
    line = _line(row)
    assert len(line) <= 120 and line.endswith("...") and line.startswith("2026-12-06 02:00:00  6666")
