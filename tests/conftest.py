"""Shared fixtures: real SQLite files, a fake clock, the Stark Bank emulator, the SDK pointed at
it, and the service itself as a subprocess. Nothing here mocks the SDK or the database."""

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import starkbank
from starkcore.utils.cache import cache as sdk_cache

from stark_challenge import config as config_module
from stark_challenge.emulator import Emulator
from stark_challenge.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout=15.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns something truthy; return that, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port():
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    """A clock for tests: ``clock()`` returns an aware UTC datetime that moves only by ``advance``."""

    def __init__(self, start=datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.timezone.utc)):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += datetime.timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state.sqlite3"))
    yield s
    s.close()


def make_config(**values):
    """Return a Config from variable names (``INVOICE_MIN="3"``), with a dummy project unless given."""
    env = {"STARK_PROJECT_ID": "1", "STARK_PRIVATE_KEY": "-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----"}
    env.update({k: str(v) for k, v in values.items()})
    return config_module.load(env, dotenv_path=None)


@pytest.fixture
def emulator():
    emu = Emulator(pay_ratio=0.0, pay_delay_s=0.05, transfer_delay_s=0.05, delivery_backoff_s=0.05, seed=7)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def sdk(emulator, monkeypatch):
    """Point the real SDK at the emulator: proxy and CA in the environment, ``starkbank.user`` set.

    Yields a dict with project_id and private_key (PEM).
    """
    project_id, private_key = emulator.create_project()
    for name, value in emulator.env().items():
        if not name.startswith("STARK_"):
            monkeypatch.setenv(name, value)
    saved_user, saved_timeout = starkbank.user, starkbank.timeout
    sdk_cache.clear()
    starkbank.user = starkbank.Project(environment="sandbox", id=project_id, private_key=private_key)
    yield {"project_id": project_id, "private_key": private_key}
    starkbank.user, starkbank.timeout = saved_user, saved_timeout
    sdk_cache.clear()


def sdk_config(sdk, **values):
    """Return a Config for the emulator's project (see ``sdk``), with overrides."""
    return make_config(**{"STARK_PROJECT_ID": sdk["project_id"], "STARK_PRIVATE_KEY": sdk["private_key"], **values})


class Service:
    """The service as a user runs it: ``python -m stark_challenge`` in a subprocess, configured by env.

    ``start()`` waits for /health; ``stop()`` sends SIGTERM and waits; ``kill()`` is kill -9.
    The port and database stay the same across restarts.
    """

    def __init__(self, env, log_path):
        self.env = env
        self.port = int(env["PORT"])
        self.log_path = log_path
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout=15.0):
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stark_challenge"], env=self.env, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for(lambda: self._healthy() or self._died(), timeout, message="the service's /health")
        if self.proc.poll() is not None:
            raise AssertionError(f"service exited {self.proc.returncode}:\n{self.logs()}")
        return self

    def _died(self):
        return self.proc.poll() is not None

    def _healthy(self):
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, timeout=15.0):
        """SIGTERM, wait; return the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        """kill -9, wait; return the exit status."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode

    def logs(self):
        with open(self.log_path) as f:
            return f.read()

    def log_messages(self):
        """Return the messages of the JSON log lines."""
        messages = []
        for line in self.logs().splitlines():
            try:
                messages.append(json.loads(line)["message"])
            except (ValueError, KeyError, TypeError):
                continue
        return messages

    def request(self, method, path, body=None, headers=None, timeout=10):
        """Return (status, parsed JSON body) of a request to the service."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def service_factory(emulator, tmp_path):
    """Return ``make(**env) -> Service`` (not started): env from the emulator, a free port, a fresh
    database, short intervals, JSON logs, and a webhook registered at the emulator for it.
    Every process started is killed at teardown."""
    made = []

    def make(webhook=True, **values):
        project_id, private_key = emulator.create_project()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STARK_", "WEBHOOK_", "INVOICE_"))}
        env.update(emulator.env(project_id, private_key))
        env.update({
            "HOST": "127.0.0.1",
            "PORT": str(free_port()),
            "DATABASE_PATH": str(tmp_path / f"service{len(made)}.sqlite3"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "INVOICE_INTERVAL": "60s",
            "INVOICE_DURATION": "0",
            "EVENT_POLL_INTERVAL": "1h",
            "BANK_TIMEOUT": "3s",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({k: str(v) for k, v in values.items()})
        service = Service(env, str(tmp_path / f"service{len(made)}.log"))
        if webhook:
            userinfo = ""
            if env.get("WEBHOOK_USERNAME"):
                userinfo = f"{env['WEBHOOK_USERNAME']}:{env['WEBHOOK_PASSWORD']}@"
            emulator.add_webhook(f"http://{userinfo}127.0.0.1:{service.port}/webhook")
        made.append(service)
        return service

    yield make
    for service in made:
        service.kill()


def signed_event(emulator, event_id, invoice, log_type="credited", subscription="invoice"):
    """Return (body bytes, headers) of a webhook for ``invoice`` (a dict, camelCase), signed by the emulator."""
    body = json.dumps({
        "event": {
            "id": event_id,
            "created": "2026-11-28T12:00:00.000000+00:00",
            "isDelivered": False,
            "subscription": subscription,
            "workspaceId": "1",
            "log": {"id": f"log-{event_id}", "type": log_type, "created": "2026-11-28T12:00:00+00:00",
                    "errors": [], subscription: invoice},
        }
    }, separators=(",", ":")).encode()
    return body, {"Digital-Signature": emulator.sign(body), "Content-Type": "application/json"}


def messages_matching(service, pattern):
    """Return the service's log messages matching a regex."""
    rx = re.compile(pattern)
    return [m for m in service.log_messages() if rx.search(m)]
