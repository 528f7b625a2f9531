"""The try-it (`--emulator`): its webhook is registered before round 0, its throwaway database
is deleted at exit unless --keep-database, which prints the status command that reads it."""

import re
import signal
import sys

from support import Service, child_env, free_port, messages_matching, run_cli, wait_for


def _try_it(tmp_path, *extra):
    """Return a started try-it service whose temporary files go to tmp_path/tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    service = Service(child_env(tmp_path, LOG_FORMAT="json", PORT=port, TMPDIR=scratch), str(tmp_path / "try.log"),
                      args=["--emulator", "--port", str(port), *extra])
    service.start(timeout=30)
    return service, scratch


def _throwaways(scratch):
    return sorted(p.name for p in scratch.iterdir() if p.name.startswith("try-it-"))


def test_the_webhook_is_registered_before_round_0_and_a_stop_says_what_the_run_left_and_deletes_the_database(
        tmp_path):
    service, scratch = _try_it(tmp_path)
    try:
        wait_for(lambda: messages_matching(service, "^round 0 issued"), message="round 0")
        assert len(_throwaways(scratch)) == 1  # the database, while the service runs
        messages = service.log_messages()
        registered = [i for i, m in enumerate(messages) if m.startswith("emulator: webhook")]
        round_0 = [i for i, m in enumerate(messages) if m.startswith("round 0 issued")]
        assert registered and registered[0] < round_0[0], messages
        # Its webhook has basic auth (a random password), so no warning that it lacks one.
        assert not [m for m in messages if "WEBHOOK_USERNAME" in m], messages
        # The emulator's command line reaches the try-it's emulator through the URL it prints.
        [control] = [m.split("=", 1)[1] for m in messages if m.startswith("export STARK_EMULATOR_CONTROL=")]
        done = run_cli("-m", "stark_challenge.emulator", "set-balance", "12345", cwd=tmp_path,
                       env={"STARK_EMULATOR_CONTROL": control}, executable=sys.executable)
        assert (done.returncode, done.stdout) == (0, "balance: 12345 cents\n"), done.stderr
        assert service.stop() == 0, service.logs()
    finally:
        service.close()
    assert _throwaways(scratch) == []
    assert "status" not in service.logs().splitlines()[-1]
    (summary,) = messages_matching(service, "^stopped; ")
    assert re.fullmatch(r"stopped; 1 round issued, \d+ credits? \(R\$ [\d,]+\.\d\d\), R\$ [\d,]+\.\d\d forwarded, "
                        r"\d+ transfers? open", summary), summary


def test_keep_database_keeps_it_and_prints_the_status_command(tmp_path):
    service, scratch = _try_it(tmp_path, "--keep-database")
    try:
        wait_for(lambda: messages_matching(service, "^round 0 issued"), message="round 0")
        assert service.stop() == 0, service.logs()
    finally:
        service.close()
    last = service.logs().splitlines()[-1]
    found = re.fullmatch(r"stark_challenge: the database is kept; read it with: DATABASE_PATH=(\S+) "
                         r"python -m stark_challenge status", last)
    assert found, last
    assert _throwaways(scratch) != []
    done = run_cli("status", "--json", cwd=tmp_path, env={"DATABASE_PATH": found.group(1)})
    assert done.returncode == 0 and '"issued": 1' in done.stdout, done.stdout + done.stderr


def test_the_throwaway_database_is_deleted_when_the_start_fails(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    bad = run_cli("--emulator", cwd=tmp_path, env={"TMPDIR": scratch, "INVOICE_MIN": "eight"})
    assert bad.returncode == 2 and bad.stderr.strip() == "stark_challenge: INVOICE_MIN: must be a whole number"
    assert _throwaways(scratch) == []


def test_the_terminal_tells_rounds_credits_and_transfers_in_reais_within_120_columns(tmp_path):
    # README's first command: no credentials, the built-in emulator, readable log lines, Ctrl-C to stop.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    service = Service(child_env(tmp_path, LOG_FORMAT="text", PORT=port, TMPDIR=scratch), str(tmp_path / "try.log"),
                      args=["--emulator", "--port", str(port)])
    try:
        service.start(timeout=30)
        wait_for(lambda: re.search(r"transfer \d+ succeeded", service.logs()) or service.proc.poll() is not None,
                 timeout=45, message="a transfer")
        service.proc.send_signal(signal.SIGINT)
        assert service.proc.wait(15) == 0, service.logs()
    finally:
        service.close()
    lines = service.logs().splitlines()
    (database,) = re.findall(r"database (\S+)$", service.logs(), re.M)  # the user's path: not ours to shorten
    long = [line for line in lines if len(line.replace(database, "DB")) > 120]
    assert not long, long
    assert not [line for line in lines if "accepted: event" in line or "cents" in line]  # per-event lines: DEBUG
    forwarded = [line for line in lines if " fee = " in line]
    assert forwarded and all(re.search(r" INFO    invoice \d+: R\$ [\d,]+\.\d\d - R\$ [\d,]+\.\d\d fee = "
                                       r"R\$ [\d,]+\.\d\d, transfer \d+$", line) for line in forwarded), forwarded
    assert re.search(r" INFO    round 0 issued: \d+ invoices?, total R\$ [\d,]+\.\d\d$", lines[[
        i for i, line in enumerate(lines) if "round 0 issued" in line][0]])
    assert re.search(r" INFO    stopped; 1 round issued, \d+ credits? \(R\$ [\d,]+\.\d\d\), R\$ [\d,]+\.\d\d "
                     r"forwarded, \d+ transfers? open$", [line for line in lines if "stopped; " in line][0])
    assert not [line for line in lines if "pulled" in line]  # the webhook brought every event
