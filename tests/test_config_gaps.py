"""Configuration mistakes an operator makes on the command line: each is one line and exit 2.

A file named with --env-file that is not there, --emulator given to a command that does not
run the service, a receiver's branch Stark Bank would refuse, a comment after a value in
.env, the emulator without openssl, a port already taken.
"""

import os
import socket
import sys

import pytest

from stark_challenge import config
from stark_challenge.errors import ConfigError

from support import run_cli


def one_line_error(done, status=2):
    """Assert ``done`` failed with ``status``, printing one line and no traceback; return the line."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stark_challenge: "), done.stderr
    return lines[0]


@pytest.fixture
def project(emulator_project):
    return emulator_project.env


def test_an_env_file_named_on_the_command_line_must_exist(project, tmp_path):
    line = one_line_error(run_cli("--env-file", str(tmp_path / "missing.env"), "check", "--offline",
                                  cwd=tmp_path, env=project))
    assert line == f"stark_challenge: {tmp_path / 'missing.env'}: no such file (given with --env-file)"


def test_the_default_env_file_may_be_absent(project, tmp_path):
    done = run_cli("check", "--offline", cwd=tmp_path, env=project)
    assert done.returncode == 0, done.stderr


def test_an_env_file_named_on_the_command_line_is_read(project, tmp_path):
    named = tmp_path / "service.env"
    named.write_text("INVOICE_MIN=eight\n")
    line = one_line_error(run_cli("--env-file", str(named), "check", "--offline", cwd=tmp_path, env=project))
    assert line == "stark_challenge: INVOICE_MIN: must be a whole number"


@pytest.mark.parametrize("command", [["check"], ["status"], ["webhook", "list"]], ids=" ".join)
def test_emulator_with_a_command_other_than_run_is_refused_before_any_call(emulator, project, command, tmp_path):
    calls = len(emulator.requests)
    line = one_line_error(run_cli("--emulator", *command, cwd=tmp_path, env=project))
    assert line.startswith(f"stark_challenge: --emulator goes with run only; {command[0]} uses")
    assert len(emulator.requests) == calls


def test_keep_database_without_the_emulator_is_refused(tmp_path):
    line = one_line_error(run_cli("--keep-database", "status", cwd=tmp_path))
    assert line.startswith("stark_challenge: --keep-database goes with --emulator only")


@pytest.mark.parametrize("branch", ["12345", "1-23", "01a"])
def test_a_branch_stark_bank_refuses_fails_check_before_any_call(emulator, project, branch, tmp_path):
    calls = len(emulator.requests)
    line = one_line_error(run_cli("check", cwd=tmp_path, env={**project, "TRANSFER_BRANCH": branch}))
    assert line.startswith("stark_challenge: TRANSFER_BRANCH: must be at most 4 digits, optionally with -digit")
    assert len(emulator.requests) == calls


@pytest.mark.parametrize("variable, value", [
    ("TRANSFER_BRANCH", "0001"), ("TRANSFER_BRANCH", "1357-9"), ("TRANSFER_BRANCH", "1"),
    ("TRANSFER_ACCOUNT", "876543-2"), ("TRANSFER_ACCOUNT", "12345-X"), ("TRANSFER_BANK_CODE", "341"),
])
def test_receivers_in_stark_banks_forms_are_accepted(variable, value):
    pem = "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----"
    loaded = config.load({"STARK_PROJECT_ID": "1", "STARK_PRIVATE_KEY": pem, variable: value}, dotenv_path=None)
    assert value in loaded


def test_a_comment_after_a_value_in_dotenv_names_its_line(project, tmp_path):
    (tmp_path / ".env").write_text("# receiver\nTRANSFER_BRANCH=0001   # Stark Bank's branch\n")
    line = one_line_error(run_cli("check", "--offline", cwd=tmp_path, env=project))
    assert line == ("stark_challenge: .env, line 2: TRANSFER_BRANCH: a comment after the value; put the comment "
                    "on a line of its own, or quote the value")


def test_a_comment_after_a_quoted_value_is_dropped_and_a_hash_inside_a_value_kept(tmp_path):
    dotenv = tmp_path / "x.env"
    dotenv.write_text("WEBHOOK_PASSWORD=\"a b\"  # the password\nWEBHOOK_USERNAME=ops#1\n"
                      "TRANSFER_NAME='Stark # Bank'\n")
    assert config.read_dotenv(str(dotenv)) == {"WEBHOOK_PASSWORD": "a b", "WEBHOOK_USERNAME": "ops#1",
                                               "TRANSFER_NAME": "Stark # Bank"}


def test_a_required_dotenv_that_is_missing_raises(tmp_path):
    assert config.read_dotenv(str(tmp_path / "none.env")) == {}
    with pytest.raises(ConfigError, match="no such file"):
        config.read_dotenv(str(tmp_path / "none.env"), required=True)


def test_the_emulator_without_openssl_says_so_in_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    line = one_line_error(run_cli("--emulator", cwd=tmp_path, env={"PATH": str(empty)}))
    assert line.startswith("stark_challenge: --emulator: the openssl command is required to run the emulator")
    assert "apt install openssl" in line


def test_a_port_already_taken_suggests_port(project, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("run", cwd=tmp_path, env={**project, "HOST": "127.0.0.1", "PORT": str(port),
                                                 "DATABASE_PATH": str(tmp_path / "db.sqlite3")})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"stark_challenge: cannot listen on 127.0.0.1:{port}: ")
    assert done.stderr.splitlines()[-1].endswith("choose another port with PORT (or --port)")


def test_usage_names_the_command_as_typed(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "stark-challenge")
    assert run_cli("--help", cwd=tmp_path, executable=script).stdout.startswith("usage: stark-challenge ")
    assert run_cli("status", "--help", cwd=tmp_path, executable=script).stdout.startswith(
        "usage: stark-challenge status")
    assert run_cli("--help", cwd=tmp_path).stdout.startswith("usage: python -m stark_challenge ")
