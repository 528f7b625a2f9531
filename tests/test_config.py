"""config: every variable validated, errors name the variable and never its value."""

import os

import pytest

from stark_challenge import config
from stark_challenge.errors import ConfigError

from support import run_cli

PEM = "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----"
BASE = {"STARK_PROJECT_ID": "5656565656565656", "STARK_PRIVATE_KEY": PEM}


def load(**values):
    return config.load({**BASE, **values}, dotenv_path=None)


def test_defaults_match_the_challenge():
    c = load()
    assert (c.invoice_interval_s, c.invoice_min, c.invoice_max, c.invoice_duration_s) == (10800, 8, 12, 86400)
    assert (c.transfer_bank_code, c.transfer_branch, c.transfer_account) == ("20018183", "0001", "6341320293482496")
    assert (c.transfer_name, c.transfer_tax_id, c.transfer_account_type) == (
        "Stark Bank S.A.", "20.018.183/0001-80", "payment")
    assert (c.environment, c.host, c.port, c.instance_tag) == ("sandbox", "0.0.0.0", 8000, "stark-challenge")
    assert c.database_path == os.path.join(".", "stark_challenge.sqlite3")
    assert not c.basic_auth


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("3h", 10800), ("1.5d", 129600)])
def test_durations_accept_seconds_and_units(text, seconds):
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("values, variable", [
    ({"INVOICE_INTERVAL": "3 hours"}, "INVOICE_INTERVAL"),
    ({"INVOICE_INTERVAL": "0"}, "INVOICE_INTERVAL"),
    ({"INVOICE_MIN": "eight"}, "INVOICE_MIN"),
    ({"INVOICE_MIN": "13"}, "INVOICE_MIN"),
    ({"INVOICE_MAX": "0"}, "INVOICE_MAX"),
    ({"PORT": "70000"}, "PORT"),
    ({"STARK_ENVIRONMENT": "staging"}, "STARK_ENVIRONMENT"),
    ({"TRANSFER_TAX_ID": "20.018.183/0001-81"}, "TRANSFER_TAX_ID"),
    ({"TRANSFER_BANK_CODE": "2001"}, "TRANSFER_BANK_CODE"),
    ({"TRANSFER_ACCOUNT_TYPE": "current"}, "TRANSFER_ACCOUNT_TYPE"),
    ({"WEBHOOK_USERNAME": "user"}, "WEBHOOK_USERNAME and WEBHOOK_PASSWORD"),
    ({"OPERATOR_PASSWORD": "pw"}, "OPERATOR_USERNAME and OPERATOR_PASSWORD"),
    ({"OPERATOR_USERNAME": "a:b", "OPERATOR_PASSWORD": "pw"}, "OPERATOR_USERNAME"),
    ({"WEBHOOK_USERNAME": "stark", "WEBHOOK_PASSWORD": "same", "OPERATOR_USERNAME": "ops",
      "OPERATOR_PASSWORD": "same"}, "OPERATOR_PASSWORD: must differ from WEBHOOK_PASSWORD"),
    ({"INSTANCE_TAG": "Has Spaces"}, "INSTANCE_TAG"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"STARK_PROJECT_ID": ""}, "STARK_PROJECT_ID"),
    ({"STARK_PRIVATE_KEY": "/no/such/key.pem"}, "STARK_PRIVATE_KEY"),
])
def test_a_bad_value_is_named_by_its_variable(values, variable):
    with pytest.raises(ConfigError) as raised:
        load(**values)
    assert str(raised.value).startswith(variable)


def test_errors_never_repeat_the_value():
    secret = "hunter2-very-secret"
    with pytest.raises(ConfigError) as raised:
        load(WEBHOOK_PASSWORD=secret)
    assert secret not in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load(INVOICE_MIN=secret)
    assert secret not in str(raised.value)


def test_secrets_stay_out_of_repr():
    c = load(WEBHOOK_USERNAME="u", WEBHOOK_PASSWORD="p4ssw0rd", OPERATOR_USERNAME="o", OPERATOR_PASSWORD="0p3r4t0r")
    assert "p4ssw0rd" not in repr(c) and "0p3r4t0r" not in repr(c) and "BEGIN" not in repr(c)
    assert c.basic_auth and c.operator_auth
    assert not load().operator_auth


def test_the_webhooks_pair_as_the_operators_exits_2_with_one_line(tmp_path):
    proc = run_cli(cwd=tmp_path, env={**BASE, "WEBHOOK_USERNAME": "stark", "WEBHOOK_PASSWORD": "s3cret",
                                      "OPERATOR_USERNAME": "stark", "OPERATOR_PASSWORD": "s3cret"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["stark_challenge: OPERATOR_PASSWORD: must differ from WEBHOOK_PASSWORD"]


def test_dotenv_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport INVOICE_MIN=3\nINVOICE_MAX='5'\nPORT=\"9000\"\n\nSTARK_PROJECT_ID=42\n"
        f"STARK_PRIVATE_KEY=\"{PEM.replace(chr(10), chr(92) + 'n')}\"\n"
    )
    c = config.load({"PORT": "9100"}, dotenv_path=str(env_file))
    assert (c.invoice_min, c.invoice_max, c.port, c.project_id) == (3, 5, 9100, "42")
    assert c.private_key == PEM


def test_a_malformed_dotenv_line_is_reported_with_its_number(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("INVOICE_MIN=3\nthis is not an assignment\n")
    with pytest.raises(ConfigError, match="line 2"):
        config.load(BASE, dotenv_path=str(env_file))


def test_the_private_key_can_be_a_file_path(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text(PEM)
    assert load(STARK_PRIVATE_KEY=str(key)).private_key == PEM


def test_state_directory_sets_the_default_database_path():
    c = config.load({**BASE, "STATE_DIRECTORY": "/var/lib/stark-challenge:/other"}, dotenv_path=None)
    assert c.database_path == "/var/lib/stark-challenge/stark_challenge.sqlite3"


def test_credentials_may_be_missing_only_when_not_required():
    assert config.load({}, dotenv_path=None, require_credentials=False).project_id == ""
    with pytest.raises(ConfigError, match="--emulator"):
        config.load({}, dotenv_path=None)


def test_bad_configuration_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = run_cli(cwd=tmp_path, env={**BASE, "INVOICE_MIN": "many"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["stark_challenge: INVOICE_MIN: must be a whole number"]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_missing_credentials_point_to_the_emulator(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "STARK_PROJECT_ID" in proc.stderr and "--emulator" in proc.stderr


def test_help_documents_every_variable(tmp_path):
    out = run_cli("--help", cwd=tmp_path).stdout
    for variable in config.VARIABLES:
        assert variable.name in out
