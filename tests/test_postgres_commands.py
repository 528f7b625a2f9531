"""The operator's commands on a PostgreSQL database (DATABASE_URL), and the URL's password kept out of
every line they print, also when the server cannot be reached."""

import datetime
import json

from support import free_port, run_cli
from support.postgres import PASSWORD

from stark_challenge.store import Store

NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.timezone.utc)


def test_status_transfers_and_events_read_a_shared_database(postgres, tmp_path):
    url = postgres.new_url()
    store = Store(url)
    try:
        store.add_credit("inv1", "ev1", 10000, 50, "stark-challenge-inv-inv1", NOW)
    finally:
        store.close()

    status = run_cli("status", "--json", cwd=tmp_path, env={"DATABASE_URL": url})
    transfers = run_cli("transfers", "--json", cwd=tmp_path, env={"DATABASE_URL": url})
    events = run_cli("events", cwd=tmp_path, env={"DATABASE_URL": url})

    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["credits"]["net"] == 9950
    assert transfers.returncode == 0, transfers.stderr
    assert [(t["external_id"], t["state"], t["amount"]) for t in json.loads(transfers.stdout)] == [
        ("stark-challenge-inv-inv1", "pending", 9950)]
    assert (events.returncode, events.stdout) == (0, "no events\n")


def test_an_unreachable_database_is_one_line_without_the_password(postgres, emulator_project, tmp_path):
    url = postgres.url().replace(f":{postgres.port}/", f":{free_port()}/")  # nothing listens there
    started = run_cli("run", cwd=tmp_path, env={**emulator_project.env, "DATABASE_URL": url, "PORT": free_port()})
    status = run_cli("status", cwd=tmp_path, env={"DATABASE_URL": url})
    checked = run_cli("check", "--offline", cwd=tmp_path, env={**emulator_project.env, "DATABASE_URL": url})

    assert started.returncode == 1
    assert status.returncode == 1
    assert len(status.stderr.splitlines()) == 1
    for done in (started, status):  # the service's last line (before it, its log), the command's only one
        line = done.stderr.splitlines()[-1]
        assert line.startswith("stark_challenge: postgresql://stark:[redacted]@127.0.0.1:")
        assert "cannot connect to the database" in line
    assert checked.returncode == 0
    assert "  database: postgresql://stark:***@127.0.0.1:" in checked.stdout
    for done in (started, status, checked):
        assert PASSWORD not in done.stdout + done.stderr
