"""Failure paths, each through the real thing: configuration bounds, Stark Bank's key rotating
or unreadable, the worker when marking delivered or its database fails, /health answering 503,
a second instance on a locked database, and the command line's failures."""

import json
import logging
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from ellipticcurve import Ecdsa, PrivateKey

from stark_challenge import config as config_module
from stark_challenge.bank import Bank
from stark_challenge.errors import BankUnavailable, ConfigError, SignatureError
from stark_challenge.events import Event
from stark_challenge.invoicer import Invoicer
from stark_challenge.notify import Notifier
from stark_challenge.scheduler import Schedule
from stark_challenge.store import Store, StoreError
from stark_challenge.transfers import Sender
from stark_challenge.verify import KEY_REFRESH_S, KeyCache, Signatures
from stark_challenge.worker import Worker
from support import Service, child_env, free_port, make_config, messages_matching, run_cli, sdk_config, wait_for

# -- configuration bounds ------------------------------------------------------------


@pytest.mark.parametrize("variable, value, message", [
    ("STARK_PROJECT_ID", "12 34", "STARK_PROJECT_ID: must be the project's id"),
    ("WEBHOOK_USERNAME", "ops:root", "WEBHOOK_USERNAME: must not contain ':'"),
    ("TRANSFER_BRANCH", "00-01", "TRANSFER_BRANCH: must be at most 4 digits"),
    ("TRANSFER_ACCOUNT", "12ab", "TRANSFER_ACCOUNT: must be digits"),
    ("TRANSFER_NAME", "   ", "TRANSFER_NAME: must not be empty"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT: must be text, json or journal"),
    ("INVOICE_MIN", "10001", "INVOICE_MIN: must be between 1 and 10000"),
    ("MAX_CONNECTIONS", "0", "MAX_CONNECTIONS: must be between 1 and 1024"),
    ("REQUEST_TIMEOUT", "0", "REQUEST_TIMEOUT: must be more than 0"),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else None)
def test_a_value_out_of_bounds_is_refused_by_name(variable, value, message):
    if variable == "WEBHOOK_USERNAME":
        values = {variable: value, "WEBHOOK_PASSWORD": "secret"}
    else:
        values = {variable: value}
    with pytest.raises(ConfigError) as raised:
        make_config(**values)
    assert str(raised.value).startswith(message)


def test_a_dotenv_that_cannot_be_read_and_a_key_file_that_is_not_pem_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        config_module.load({}, dotenv_path=str(tmp_path), require_credentials=False)  # a directory
    key = tmp_path / "key.txt"
    key.write_text("not a key\n")
    with pytest.raises(ConfigError, match="STARK_PRIVATE_KEY: the key file is not a PEM private key"):
        make_config(STARK_PRIVATE_KEY=str(key))


# -- Stark Bank's public key ---------------------------------------------------------------


class Monotonic:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def signed(private_key, body):
    return Ecdsa.sign(body, private_key).toBase64()


def test_a_rotated_key_is_fetched_again_at_most_once_a_minute_and_then_accepted():
    old, new = PrivateKey(), PrivateKey()
    published = [old.publicKey().toPem()]
    clock = Monotonic()
    signatures = Signatures(lambda: published[-1], clock=clock)
    body = '{"event": {"id": "1"}}'
    signatures.check(body, signed(old, body))
    assert signatures.keys.fetches == 1

    published.append(new.publicKey().toPem())  # Stark Bank rotates its key
    clock.now += 1
    with pytest.raises(SignatureError):  # the refresh is too recent: no new fetch yet
        signatures.check(body, signed(new, body))
    assert signatures.keys.fetches == 1
    clock.now += KEY_REFRESH_S
    signatures.check(body, signed(new, body))  # fetched again, and the new key accepts it
    assert signatures.keys.fetches == 2
    clock.now += KEY_REFRESH_S
    with pytest.raises(SignatureError):  # the old key is gone
        signatures.check(body, signed(old, body))


def test_a_refresh_after_another_thread_refreshed_returns_that_key_without_fetching():
    keys = KeyCache(lambda: PrivateKey().publicKey().toPem(), clock=Monotonic())
    current = keys.get()
    assert keys.refresh(stale=object()) is current
    assert keys.fetches == 1


def test_an_unreadable_public_key_is_unavailable_not_a_crash():
    keys = KeyCache(lambda: "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----", clock=Monotonic())
    with pytest.raises(BankUnavailable, match="public key is unreadable"):
        keys.get()


def test_more_invoices_than_one_call_takes_are_refused_before_any_call(emulator, sdk):
    bank = Bank(sdk_config(sdk))
    with pytest.raises(ValueError, match="at most 100"):
        bank.create_invoices([{}] * 101)
    assert emulator.requests == []


# -- the worker ----------------------------------------------------------------------------


def test_an_event_not_marked_delivered_is_pulled_again_and_moves_no_money_twice(emulator, sdk, store, clock):
    config = sdk_config(sdk, INVOICE_MIN=2, INVOICE_MAX=2)
    bank = Bank(config)
    bank.configure()
    emulator.set(hold_deliveries=True, pay_ratio=1.0)
    Invoicer(bank, store, config, "s1", clock=clock, rng=random.Random(3)).issue_round(0, clock())
    wait_for(lambda: sum(e["log"]["type"] == "credited" for e in emulator.events()) == 2, message="credits")
    worker = Worker(store, bank, "stark-challenge", poll_interval_s=600, clock=clock,
                    sender=Sender(store, bank, "stark-challenge", clock, rng=random.Random(4)))
    emulator.fail_next("PATCH", "/v2/event", status=500)

    pulled = {e["id"] for e in emulator.events()}

    def undelivered():
        return [e["id"] for e in emulator.events() if e["id"] in pulled and not e["isDelivered"]]

    worker.run_once()
    assert len(emulator.transfers()) == 2
    assert len(undelivered()) == 1  # the PATCH that failed
    assert store.event_processed(undelivered()[0])
    clock.advance(600)
    worker.run_once()  # pulled again: already processed, now marked delivered
    assert undelivered() == []
    assert len(emulator.transfers()) == 2


def test_a_worker_whose_database_fails_logs_it_reports_it_and_keeps_running(emulator, sdk, tmp_path, clock, caplog):
    store = Store(str(tmp_path / "state.sqlite3"))
    store.close()  # every query now fails
    bank = Bank(sdk_config(sdk))
    bank.configure()
    worker = Worker(store, bank, "stark-challenge", poll_interval_s=0, clock=clock)  # its own real Sender
    with caplog.at_level(logging.ERROR, logger="stark_challenge.worker"):
        worker.start()
        try:
            wait_for(lambda: worker.state()["last_error"], message="the failed pass reported")
            assert worker.state()["alive"]
            assert "the database is closed" in worker.state()["last_error"]  # the store failed, nothing else
        finally:
            worker.stop(timeout=5)
    assert "recovery failed; continuing with the normal loop" in caplog.text
    assert "worker pass failed; trying again" in caplog.text
    assert "the database is closed" in caplog.text


# -- the service: /health, a second instance -----------------------------------------------


def test_health_answers_503_when_the_database_stops_answering(emulator, in_process_app):
    app = in_process_app
    url = f"http://127.0.0.1:{app.server.port}/health"
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
    wait_for(lambda: emulator.invoices(), message="round 0")
    app.store.close()
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(url, timeout=5)
    assert raised.value.code == 503
    assert json.loads(raised.value.read()) == {"status": "degraded"}  # the reason is behind auth, in /status
    assert not app.healthy()


def test_a_second_instance_on_the_same_database_is_refused(service_factory, tmp_path):
    first = service_factory()
    first.start()
    second = run_cli(cwd=tmp_path, env={**first.env, "PORT": str(free_port())})
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"stark_challenge: {first.env['DATABASE_PATH']}: another stark_challenge process is using this database")
    assert first.request("GET", "/health")[0] == 200


# -- the command line ----------------------------------------------------------------------


def test_check_reports_the_flags_short_durations_and_what_a_start_would_do_with_the_database(
        emulator_project, tmp_path):
    env = {**emulator_project.env, "INVOICE_INTERVAL": "90", "INVOICE_DURATION": "0"}
    not_sqlite = tmp_path / "not.sqlite3"
    not_sqlite.write_text("this is not a database\n" * 100)
    done = run_cli("--host", "127.0.0.1", "--port", "9123", "check", "--offline", cwd=tmp_path,
                   env={**env, "DATABASE_PATH": str(not_sqlite)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "  rounds: 8-12 invoices every 90s forever, tagged 'stark-challenge'"
    assert lines[3] == "  listening on 127.0.0.1:9123, basic auth OFF, operator endpoints off (404)"
    assert lines[4].startswith(f"  database: {not_sqlite} (unreadable: ")

    empty = tmp_path / "empty.sqlite3"
    Store(str(empty)).close()
    done = run_cli("check", "--offline", cwd=tmp_path, env={**env, "DATABASE_PATH": str(empty)})
    assert done.stdout.splitlines()[4] == f"  database: {empty} (no schedule yet: the first round is issued at start)"


def test_check_says_stark_bank_is_unavailable_on_a_5xx(emulator, emulator_project, tmp_path):
    emulator.fail_next("GET", "/v2/invoice", status=503)
    done = run_cli("check", cwd=tmp_path, env=emulator_project.env)
    assert done.returncode == 1
    assert done.stderr == "stark_challenge: check credentials: Stark Bank answered 503\n"


def test_keygen_reports_a_directory_it_cannot_write(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = run_cli("keygen", "a-file/keys", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("stark_challenge: cannot write the keys to a-file/keys: ")


def _sigint_as_in_a_terminal():
    # A shell without job control starts a background job with SIGINT ignored, and a child
    # inherits that (Python then installs no KeyboardInterrupt handler): give the command
    # the default disposition it has when an operator presses Ctrl-C in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_a_command_exits_130_without_a_traceback(emulator, emulator_project, tmp_path):
    emulator.answer_late("GET", "/v2/invoice", 20.0)
    proc = subprocess.Popen([sys.executable, "-m", "stark_challenge", "check"], cwd=tmp_path,
                            env=child_env(tmp_path, **emulator_project.env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    try:
        wait_for(lambda: emulator.requests_in_flight, message="the credentials call held")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "Traceback" not in err and out == ""


def test_try_it_mode_keeps_a_database_path_given_to_it(tmp_path):
    database = tmp_path / "kept.sqlite3"
    port = free_port()
    service = Service(child_env(tmp_path, DATABASE_PATH=database, LOG_FORMAT="json", PORT=port),
                      str(tmp_path / "try.log"), args=["--emulator", "--port", str(port)])
    try:
        service.start(timeout=30)
        wait_for(lambda: messages_matching(service, "^round 0 issued"), message="round 0")
        assert service.stop() == 0, service.logs()
    finally:
        service.close()
    assert database.exists() and f"database {database}" in service.logs()


def test_a_notify_socket_that_is_neither_a_path_nor_abstract_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="stark_challenge.notify"):
        notifier = Notifier({"NOTIFY_SOCKET": "relative/notify.sock"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET is neither a path nor @name" in caplog.text


def test_a_key_the_sdk_cannot_use_stops_the_service_with_one_line(emulator_project, tmp_path):
    broken = "-----BEGIN EC PRIVATE KEY-----\nbm90IGEga2V5\n-----END EC PRIVATE KEY-----"
    done = run_cli(cwd=tmp_path, env={**emulator_project.env, "STARK_PRIVATE_KEY": broken, "PORT": str(free_port()),
                                      "DATABASE_PATH": str(tmp_path / "db.sqlite3")})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "stark_challenge: STARK_PRIVATE_KEY: not a valid secp256k1 private key in PEM format\n"
    assert not (tmp_path / "db.sqlite3").exists()  # stopped before opening anything


def test_the_schedule_reports_not_started_before_it_opens(store):
    assert Schedule(store, job=None, interval_s=60, duration_s=0).state() == {"state": "not started"}


# -- the store -----------------------------------------------------------------------------


def test_a_database_that_cannot_be_opened_is_a_store_error_naming_the_file(tmp_path):
    with pytest.raises(StoreError, match="cannot open the database"):
        Store(str(tmp_path / "no-such-directory" / "state.sqlite3"))
    not_sqlite = tmp_path / "not.sqlite3"
    not_sqlite.write_text("this is not a database\n" * 100)
    with pytest.raises(StoreError, match=f"{not_sqlite}: cannot open the database"):
        Store(str(not_sqlite))


def test_a_closed_store_refuses_reads_and_writes(store, clock):
    store.close()
    with pytest.raises(StoreError, match="the database is closed"):
        store.add_event(Event("ev-1", "invoice", "created", "inv-1", {}), "webhook", clock())
    with pytest.raises(StoreError, match="the database is closed"):
        store.schedule()
    with pytest.raises(StoreError, match="the database is closed"):  # a transaction too
        with store.atomic():
            pass
    assert not store.ping()


def test_the_store_refuses_naive_times_and_ignores_news_of_unknown_transfers(store, clock):
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add_event(Event("ev-1", "invoice", "created", "inv-1", {}), "webhook", clock().replace(tzinfo=None))
    assert store.schedule() is None  # before the first start
    store.transfer_created("stark-challenge-inv-unknown", "t1", "created", clock())
    assert store.apply_transfer_status("stark-challenge-inv-unknown", "t1", "success", (), clock()) is None
    assert store.transfers() == []
