"""Command line: conventions (--help, --version, exit 0/1/2, one line and no traceback on a bad
configuration), `check`, `keygen` and `webhook`, run as a user runs them: a subprocess, with the
emulator standing in for Stark Bank."""

import os
import re
import socket
import stat
import sys

import pytest

from stark_challenge import __version__, verify

from support import run_cli, wait_for

PASSWORD = "p@ss/w:rd-Secret"
HELP = [[], ["run"], ["status"], ["check"], ["keygen"], ["webhook"],
        ["webhook", "register"], ["webhook", "list"], ["webhook", "delete"]]


cli = run_cli  # the command line with an isolated environment plus ``env``, in ``cwd``


def one_line_error(done, status):
    """Assert ``done`` failed with ``status``, printing one line and no traceback; return the line."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(("stark_challenge: ", "usage: ")), done.stderr
    return lines[0]


@pytest.fixture
def project(emulator_project):
    """Return (env, project_id) for a new emulator project: proxy, CA, credentials."""
    return emulator_project.env, emulator_project.id


def api_calls(emulator):
    return len(emulator.requests)


# -- conventions --------------------------------------------------------------------


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "top")
def test_every_subcommand_has_help(command, tmp_path):
    done = cli(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: python -m stark_challenge " + " ".join(command))


def test_top_level_help_lists_commands_variables_and_exit_statuses(tmp_path):
    out = cli("--help", cwd=tmp_path).stdout
    for word in ("run", "status", "check", "keygen", "webhook", "STARK_PROJECT_ID", "LOG_FORMAT",
                 "exit status: 0 ok, 1 runtime failure, 2 usage or configuration error"):
        assert word in out


def test_version_is_printed_by_the_module_and_the_console_script(tmp_path):
    assert cli("--version", cwd=tmp_path).stdout == f"stark_challenge {__version__}\n"
    # The unit's ExecStart runs the installed console script.
    script = os.path.join(os.path.dirname(sys.executable), "stark-challenge")
    assert cli("--version", cwd=tmp_path, executable=script).stdout == f"stark_challenge {__version__}\n"


@pytest.mark.parametrize("args", [["frobnicate"], ["webhook"], ["status", "--bogus"], ["--port", "x"]],
                         ids=lambda a: " ".join(a))
def test_usage_errors_exit_2(args, tmp_path):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith("usage: python -m stark_challenge")


@pytest.mark.parametrize("command", [["run"], ["check"], ["check", "--offline"], ["status"],
                                     ["webhook", "list"]], ids=lambda c: " ".join(c))
def test_bad_configuration_prints_one_line_and_exits_2(command, project, tmp_path):
    env, _ = project
    done = cli(*command, cwd=tmp_path, env={**env, "INVOICE_MIN": "eight"})
    assert one_line_error(done, 2) == "stark_challenge: INVOICE_MIN: must be a whole number"


def test_missing_credentials_name_the_variable(tmp_path):
    line = one_line_error(cli("run", cwd=tmp_path), 2)
    assert line.startswith("stark_challenge: STARK_PROJECT_ID: not set.")


def test_a_bad_value_in_dotenv_is_reported_without_its_value(project, tmp_path):
    env, _ = project
    (tmp_path / ".env").write_text("WEBHOOK_USERNAME=ops\nWEBHOOK_PASSWORD=\nBANK_TIMEOUT=soon-ish\n")
    line = one_line_error(cli("check", "--offline", cwd=tmp_path, env=env), 2)
    assert line == "stark_challenge: WEBHOOK_USERNAME and WEBHOOK_PASSWORD: set both or neither"


# -- check --------------------------------------------------------------------------


def test_check_with_good_credentials_calls_stark_bank_once_and_prints_the_plan(emulator, project, tmp_path):
    env, _ = project
    before = api_calls(emulator)
    done = cli("check", cwd=tmp_path, env={**env, "INVOICE_INTERVAL": "3h", "INVOICE_DURATION": "24h"})
    assert done.returncode == 0 and done.stderr == ""
    assert api_calls(emulator) == before + 1
    assert done.stdout.splitlines() == [
        "configuration ok; credentials accepted by Stark Bank (sandbox)",
        "  rounds: 8-12 invoices every 3h for 24h (8 rounds), tagged 'stark-challenge'",
        "  credits forwarded to: Stark Bank S.A., bank 20018183, branch 0001, account 6341320293482496 (payment)",
        "  listening on 0.0.0.0:8000, basic auth OFF, operator endpoints off (404)",
        "  database: ./stark_challenge.sqlite3 (new: the first round is issued at start)",
        f"  webhook signatures verified by: {verify.best_verifier().name}",
    ]


def test_check_with_an_unknown_project_exits_2_with_stark_banks_reason(emulator, project, tmp_path):
    env, _ = project
    line = one_line_error(cli("check", cwd=tmp_path, env={**env, "STARK_PROJECT_ID": "9999999999"}), 2)
    assert line == ("stark_challenge: check credentials: Stark Bank refused them: "
                    "invalidAccessId: Access-Id 'project/9999999999' is not a registered project")


def test_check_with_a_key_stark_bank_does_not_know_exits_2(emulator, project, tmp_path):
    env, _ = project
    _, other_key = emulator.create_project()
    line = one_line_error(cli("check", cwd=tmp_path, env={**env, "STARK_PRIVATE_KEY": other_key}), 2)
    assert line.startswith("stark_challenge: check credentials: Stark Bank refused them: ")
    assert "PRIVATE KEY" not in line


def test_check_with_an_unreadable_key_exits_2_before_any_call(emulator, project, tmp_path):
    env, _ = project
    before = api_calls(emulator)
    broken = "-----BEGIN EC PRIVATE KEY-----\nbm90IGEga2V5\n-----END EC PRIVATE KEY-----"
    line = one_line_error(cli("check", cwd=tmp_path, env={**env, "STARK_PRIVATE_KEY": broken}), 2)
    assert line == "stark_challenge: STARK_PRIVATE_KEY: not a valid secp256k1 private key in PEM format"
    line = one_line_error(cli("check", cwd=tmp_path, env={**env, "STARK_PRIVATE_KEY": str(tmp_path / "no.pem")}), 2)
    assert line == "stark_challenge: STARK_PRIVATE_KEY: the key file cannot be read (No such file or directory)"
    assert api_calls(emulator) == before


def test_check_exits_1_when_stark_bank_cannot_be_reached(project, tmp_path):
    env, _ = project
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: refused
        done = cli("check", cwd=tmp_path, env={**env, "HTTPS_PROXY": nowhere, "https_proxy": nowhere})
    line = one_line_error(done, 1)
    assert line.startswith("stark_challenge: check credentials: no answer from Stark Bank (")


def test_check_offline_makes_no_api_call(emulator, project, tmp_path):
    env, _ = project
    before = list(emulator.requests)
    done = cli("check", "--offline", cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.startswith("configuration ok (sandbox)\n")
    assert emulator.requests == before


def test_check_tells_that_a_start_resumes_an_existing_schedule(emulator, service_factory, tmp_path):
    service = service_factory(INVOICE_INTERVAL="1h", INVOICE_DURATION="24h")
    service.start()
    # /health answers before round 0 is issued: wait for the round, then stop.
    wait_for(lambda: service.operate("GET", "/status")[1]["service"]["scheduler"]["rounds_issued"] == 1,
             message="round 0 issued")
    assert service.stop() == 0
    done = cli("check", "--offline", cwd=tmp_path, env=service.env)
    assert done.returncode == 0
    database = done.stdout.splitlines()[-2]
    assert re.fullmatch(rf"  database: {re.escape(service.env['DATABASE_PATH'])} \(resumes the schedule started "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: 1 rounds issued, 1 due\)", database), database


# -- keygen -------------------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_that_stark_bank_accepts(emulator, tmp_path):
    keys = tmp_path / "keys"
    done = cli("keygen", str(keys), cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    private, public = keys / "private-key.pem", keys / "public-key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) & 0o077 in (0o044, 0o000)  # never writable by others
    assert private.read_text().startswith("-----BEGIN EC PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "upload the public key" in done.stdout.lower()
    assert "PRIVATE KEY" not in done.stdout  # tells where the key is, never the key

    # "Upload" the public key as a new project's, then the private key file proves it.
    emulator.register_project("4242424242", public.read_text())
    env = {**emulator.env("4242424242"), "STARK_PRIVATE_KEY": str(private)}
    assert cli("check", cwd=tmp_path, env=env).returncode == 0


def test_keygen_refuses_to_overwrite_a_key(tmp_path):
    assert cli("keygen", "k", cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()}
    line = one_line_error(cli("keygen", "k", cwd=tmp_path), 1)
    assert line == "stark_challenge: k/private-key.pem exists; not overwriting a key"
    (tmp_path / "k" / "private-key.pem").unlink()  # a public key alone is not overwritten either
    line = one_line_error(cli("keygen", "k", cwd=tmp_path), 1)
    assert line == "stark_challenge: k/public-key.pem exists; not overwriting a key"
    assert (tmp_path / "k" / "public-key.pem").read_bytes() == before["public-key.pem"]


def test_keygen_defaults_to_a_keys_directory(tmp_path):
    assert cli("keygen", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["private-key.pem", "public-key.pem"]


# -- webhook ------------------------------------------------------------------------


def test_webhook_register_puts_basic_auth_in_the_url_and_never_prints_the_password(emulator, project, tmp_path):
    env, _ = project
    env = {**env, "WEBHOOK_USERNAME": "ops", "WEBHOOK_PASSWORD": PASSWORD}
    done = cli("webhook", "register", "https://hooks.example.com/webhook", cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stderr == ""
    [hook] = emulator.webhooks()
    # Quoted in the userinfo: '@', '/' and ':' in a password would otherwise break the URL.
    assert hook["url"] == "https://ops:p%40ss%2Fw%3Ard-Secret@hooks.example.com/webhook"
    assert sorted(hook["subscriptions"]) == ["invoice", "transfer"]
    assert done.stdout == (f"webhook {hook['id']} registered: https://ops:[redacted]@hooks.example.com/webhook "
                           "(invoice, transfer)\n")

    listed = cli("webhook", "list", cwd=tmp_path, env=env)
    assert listed.returncode == 0
    assert listed.stdout == f"{hook['id']}  https://ops:[redacted]@hooks.example.com/webhook  invoice, transfer\n"
    for out in (done.stdout, listed.stdout):
        assert "Secret" not in out and "p%40ss" not in out


def test_webhook_register_without_basic_auth_keeps_the_url(emulator, project, tmp_path):
    env, _ = project
    done = cli("webhook", "register", "https://hooks.example.com/webhook", cwd=tmp_path, env=env)
    assert done.returncode == 0
    assert [h["url"] for h in emulator.webhooks()] == ["https://hooks.example.com/webhook"]


def test_webhook_register_refuses_a_url_that_is_not_http(emulator, project, tmp_path):
    env, _ = project
    before = api_calls(emulator)
    line = one_line_error(cli("webhook", "register", "ftp://example.com/x", cwd=tmp_path, env=env), 2)
    assert line == "stark_challenge: URL: expected http(s)://host/path"
    assert api_calls(emulator) == before and emulator.webhooks() == []


def test_webhook_list_and_delete(emulator, project, tmp_path):
    env, _ = project
    assert cli("webhook", "list", cwd=tmp_path, env=env).stdout == "no webhooks\n"
    first = emulator.add_webhook("https://one.example.com/webhook")
    second = emulator.add_webhook("https://two.example.com/webhook", ["invoice"])

    listed = cli("webhook", "list", cwd=tmp_path, env=env).stdout.splitlines()
    assert sorted(listed) == sorted([f"{first}  https://one.example.com/webhook  invoice, transfer",
                                     f"{second}  https://two.example.com/webhook  invoice"])
    done = cli("webhook", "delete", first, cwd=tmp_path, env=env)
    assert (done.returncode, done.stdout) == (0, f"webhook {first} deleted\n")
    assert [h["id"] for h in emulator.webhooks()] == [second]


def test_webhook_delete_of_an_unknown_id_exits_1(emulator, project, tmp_path):
    env, _ = project
    line = one_line_error(cli("webhook", "delete", "123", cwd=tmp_path, env=env), 1)
    assert line == "stark_challenge: delete webhook: Stark Bank refused it: invalidWebhookId"
