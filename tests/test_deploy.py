"""Deployment files: the systemd unit passes `systemd-analyze verify` and says what a hardened unit should;
deploy/env.example lists every variable, with the secrets blank, and loads as it stands."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from stark_challenge import config as config_module

from support import ROOT

UNIT = os.path.join(ROOT, "deploy", "stark-challenge.service")
ENV_EXAMPLE = os.path.join(ROOT, "deploy", "env.example")
SECRETS = ("STARK_PROJECT_ID", "STARK_PRIVATE_KEY", "WEBHOOK_USERNAME", "WEBHOOK_PASSWORD", "OPERATOR_USERNAME",
           "OPERATOR_PASSWORD")


def unit_settings(text):
    """Return {(section, key): [values]} of a unit file (keys may repeat, as SystemCallFilter= does)."""
    settings, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        settings.setdefault((section, key), []).append(value)
    return settings


@pytest.fixture(scope="module")
def unit():
    with open(UNIT) as f:
        return unit_settings(f.read())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's binary exists: point a copy at this venv's console script.
    script = os.path.join(os.path.dirname(sys.executable), "stark-challenge")
    assert os.access(script, os.X_OK), "the console script is installed with the package (pip install -e .)"
    with open(UNIT) as f:
        text = f.read()
    copy = tmp_path / "stark-challenge.service"
    copy.write_text(text.replace("/opt/stark-challenge/venv/bin/stark-challenge", script))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad specifiers are only warnings (exit 0): no output at all is the bar.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_would_catch_a_mistake_in_the_unit(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "stark-challenge")
    with open(UNIT) as f:
        text = f.read().replace("/opt/stark-challenge/venv/bin/stark-challenge", script)
    copy = tmp_path / "stark-challenge.service"
    copy.write_text(text.replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes"))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectHomes'" in done.stderr


def test_unit_runs_the_console_script_as_a_notify_service(unit):
    assert unit[("Service", "Type")] == ["notify"]
    [exec_start] = unit[("Service", "ExecStart")]
    assert exec_start.split()[0] == "/opt/stark-challenge/venv/bin/stark-challenge"
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert re.search(r'^stark-challenge = "stark_challenge.__main__:main"$', f.read(), re.M)
    assert unit[("Service", "Restart")] == ["on-failure"]
    assert unit[("Service", "RestartPreventExitStatus")] == ["2"]  # a configuration error is not retried
    assert unit[("Service", "WatchdogSec")] and unit[("Service", "TimeoutStopSec")]
    assert unit[("Install", "WantedBy")] == ["multi-user.target"]


def test_unit_keeps_secrets_and_state_where_the_service_finds_them(unit):
    assert unit[("Service", "EnvironmentFile")] == ["/etc/stark-challenge/env"]
    assert unit[("Service", "StateDirectory")] == ["stark-challenge"]
    assert unit[("Service", "DynamicUser")] == ["yes"]
    assert unit[("Service", "LoadCredential")] == ["private-key.pem:/etc/stark-challenge/private-key.pem"]
    assert "STARK_PRIVATE_KEY=%d/private-key.pem" in unit[("Service", "Environment")]
    # systemd sets STATE_DIRECTORY; the database goes there by default.
    environ = {"STATE_DIRECTORY": "/var/lib/stark-challenge", "STARK_PROJECT_ID": "1",
               "STARK_PRIVATE_KEY": "-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----"}
    config = config_module.load(environ, dotenv_path=None)
    assert config.database_path == "/var/lib/stark-challenge/stark_challenge.sqlite3"


def test_unit_is_hardened(unit):
    service = {key: values for (section, key), values in unit.items() if section == "Service"}
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "CapabilityBoundingSet": "",
                       "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes"}.items():
        assert service.get(key) == [value], key
    assert service["SystemCallFilter"][0] == "@system-service"


def _bytes(size):
    """Return a systemd size (``256M``) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMG]?)", size).groups()
    return int(number) * 1024 ** " KMG".index(unit or " ")


def test_unit_bounds_memory_and_tasks_above_what_the_service_holds_under_attack(unit, service_factory):
    # The hostile-client tests hold the RSS under 120 MiB with four times MAX_CONNECTIONS
    # clients sending the largest heads allowed: the limits leave room above that.
    memory_high, memory_max = (_bytes(unit[("Service", key)][0]) for key in ("MemoryHigh", "MemoryMax"))
    assert 120 * 1024 ** 2 < memory_high < memory_max
    # Threads at the default MAX_CONNECTIONS, counted on the running service, with room
    # for the schedule's timer threads and the watchdog.
    [tasks_max] = unit[("Service", "TasksMax")]
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1).start()
    assert "MAX_CONNECTIONS" not in service.env
    with open(f"/proc/{service.proc.pid}/status") as f:
        threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
    assert threads + 8 <= int(tasks_max)


def test_env_example_lists_every_variable_once_with_secrets_blank():
    with open(ENV_EXAMPLE) as f:
        lines = f.read().splitlines()
    named = [m.group(1) for m in (re.match(r"#?([A-Z_]+)=(.*)$", line) for line in lines) if m]
    assert sorted(named) == sorted(v.name for v in config_module.VARIABLES)
    values = config_module.read_dotenv(ENV_EXAMPLE)
    for name in SECRETS:
        assert values.get(name, "") == "", name
    # Commented out: a value here, even empty, would override the unit's credential path.
    assert "STARK_PRIVATE_KEY" not in values


def test_env_example_as_it_stands_gives_the_documented_defaults():
    values = config_module.read_dotenv(ENV_EXAMPLE)
    for variable in config_module.VARIABLES:
        if variable.name in values:
            assert values[variable.name] == variable.default, variable.name
    from_example = config_module.load({}, dotenv_path=ENV_EXAMPLE, require_credentials=False)
    from_defaults = config_module.load({}, dotenv_path=None, require_credentials=False)
    assert from_example == from_defaults


def test_unit_lets_journald_read_each_lines_priority(unit):
    # The service picks LOG_FORMAT=journal itself under systemd (tests/test_journald.py);
    # the unit must not force another format, and has journald read <N> prefixes.
    assert unit[("Service", "SyslogLevelPrefix")] == ["yes"]
    assert unit[("Service", "SyslogIdentifier")] == ["stark-challenge"]
    assert not any("LOG_FORMAT" in line for line in unit[("Service", "Environment")])
