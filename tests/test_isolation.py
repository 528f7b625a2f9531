"""Isolation: a user's settings (a ``.env`` in the repository, variables in the shell) never
reach a test. The service and the command line run in directories of their own with an
allow-listed environment; in-process code runs in a temporary directory.

The proof: hostile values in a ``.env`` at the repository root AND in this process's
environment, then a service run, a CLI run and an in-process ``config.load`` give the
results of a clean setup.
"""

import os

import pytest

from stark_challenge import config as config_module
from support import ROOT, make_config, run_cli, service_settled, wait_for

FEE = 50  # the emulator's default invoice_fee, in cents


@pytest.fixture
def hostile_setup(tmp_path, monkeypatch):
    """Write hostile settings to ROOT/.env and os.environ; put back whatever .env was there, even on failure."""
    values = {
        "WEBHOOK_USERNAME": "evil",
        "WEBHOOK_PASSWORD": "evil-password",
        "NOTIFY_SOCKET": str(tmp_path / "hostile-notify.sock"),
        "TRANSFER_BANK_CODE": "341",
        "TRANSFER_ACCOUNT": "666",
        "TRANSFER_NAME": "Mallory",
        "TRANSFER_TAX_ID": "012.345.678-90",
        "INSTANCE_TAG": "evil",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "ERROR",
        "DATABASE_PATH": str(tmp_path / "hostile.sqlite3"),
        "STARK_PROJECT_ID": "666",
        "STARK_PRIVATE_KEY": str(tmp_path / "hostile-key.pem"),
        "INVOICE_MIN": "1",
        "INVOICE_MAX": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "PORT": "1",
    }
    path = os.path.join(ROOT, ".env")
    saved = None
    if os.path.exists(path):
        with open(path, "rb") as f:
            saved = f.read()
    try:
        with open(path, "w") as f:
            f.writelines(f"{name}={value}\n" for name, value in values.items())
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        yield values
    finally:
        if saved is None:
            os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(saved)


def environ_of(pid):
    """Return the environment process ``pid`` started with (Linux)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


def test_a_service_run_ignores_the_users_dotenv_and_shell(hostile_setup, emulator, service_factory):
    service = service_factory(INVOICE_MIN=2, INVOICE_MAX=2)  # the webhook is registered without basic auth
    service.start()
    leaked = {name for name, value in environ_of(service.proc.pid).items() if hostile_setup.get(name) == value}
    assert leaked == set()
    assert service.cwd != ROOT and not os.path.exists(os.path.join(service.cwd, ".env"))

    invoice = wait_for(lambda: len(emulator.invoices()) == 2 and emulator.invoices()[0], message="round 0")
    emulator.pay(invoice["id"])
    (transfer,) = wait_for(lambda: emulator.transfers(), message="the transfer")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")

    # The defaults, not the hostile values: no basic auth (the webhooks got 200), the
    # default receiver and tag, JSON logs, the database the test chose.
    assert {d["status"] for d in emulator.deliveries()} == {200}
    assert (transfer["name"], transfer["bankCode"], transfer["accountNumber"]) == (
        "Stark Bank S.A.", "20018183", "6341320293482496")
    assert transfer["externalId"] == f"stark-challenge-inv-{invoice['id']}"
    assert transfer["amount"] == invoice["amount"] - FEE
    assert all("stark-challenge" in i["tags"] and "evil" not in i["tags"] for i in emulator.invoices())
    assert service.log_messages() and "Mallory" not in service.logs()
    assert not os.path.exists(hostile_setup["DATABASE_PATH"])
    assert not os.path.exists(hostile_setup["NOTIFY_SOCKET"])


def test_a_cli_run_ignores_the_users_dotenv_and_shell(hostile_setup, emulator_project, tmp_path):
    done = run_cli("check", cwd=tmp_path, env={**emulator_project.env, "DATABASE_PATH": tmp_path / "db.sqlite3"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:4] == [
        "  rounds: 8-12 invoices every 3h for 24h (8 rounds), tagged 'stark-challenge'",
        "  credits forwarded to: Stark Bank S.A., bank 20018183, branch 0001, account 6341320293482496 (payment)",
        "  listening on 0.0.0.0:8000, basic auth OFF, operator endpoints off (404)",
    ]


def test_in_process_configuration_ignores_the_users_dotenv_and_shell(hostile_setup):
    assert os.getcwd() != ROOT
    defaults = config_module.load({}, require_credentials=False)  # reads ./.env, as the service does
    assert (defaults.webhook_username, defaults.instance_tag, defaults.transfer_name, defaults.port) == (
        "", "stark-challenge", "Stark Bank S.A.", 8000)
    made = make_config()
    assert (made.project_id, made.basic_auth, made.invoice_min, made.log_format) == ("1", False, 8, "json")
