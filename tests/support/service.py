"""The service as a user runs it: ``python -m stark_challenge`` in a subprocess, in a directory
of its own, with an environment built from an allow-list (see ``environment``), and ways to
read what it did: its log, its HTTP answers, its SQLite file (read-only) and ``status``.
"""

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

from .environment import run_cli
from .waiting import wait_for

__all__ = ["Service", "messages_matching", "query", "service_settled", "status_json"]


class Service:
    """One service process. ``start()`` waits for /health; ``stop()`` sends SIGTERM and waits;
    ``kill()`` is kill -9. The port, database, log and working directory stay the same across
    restarts. ``env`` is the whole environment of the process (build it with ``child_env``);
    ``cwd`` defaults to the log file's directory; ``args`` are command-line arguments
    (``--emulator``, say; ``PORT`` in ``env`` still names the port)."""

    def __init__(self, env, log_path, cwd=None, args=()):
        self.env = env
        self.port = int(env["PORT"])
        self.log_path = log_path
        self.cwd = cwd or os.path.dirname(os.path.abspath(log_path))
        self.args = list(args)
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, env=None, **streams):
        """Start the process without waiting for it (``env`` replaces ``self.env``); return it."""
        self.proc = subprocess.Popen([sys.executable, "-m", "stark_challenge", *self.args], env=env or self.env,
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, **streams)
        return self.proc

    def start(self, timeout=15.0):
        with open(self.log_path, "a") as log:
            self.spawn(stdout=log, stderr=subprocess.STDOUT)
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

    def close(self, timeout=10.0):
        """End the process at teardown: SIGTERM first (so it exits cleanly and its coverage
        data is written), kill -9 if it does not exit in ``timeout`` s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.stop(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

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

    def operate(self, method, path, body=None, headers=None, timeout=10):
        """``request`` with the operator's basic auth (OPERATOR_USERNAME/PASSWORD of ``env``)."""
        token = base64.b64encode(f"{self.env['OPERATOR_USERNAME']}:{self.env['OPERATOR_PASSWORD']}".encode())
        return self.request(method, path, body, {**(headers or {}), "Authorization": "Basic " + token.decode()},
                            timeout)

    def request(self, method, path, body=None, headers=None, timeout=10):
        """Return (status, parsed JSON body) of a request to the service."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def messages_matching(service, pattern):
    """Return the service's log messages matching a regex."""
    rx = re.compile(pattern)
    return [m for m in service.log_messages() if rx.search(m)]


def query(service, sql, params=()):
    """Return the rows of ``sql`` on the service's database, opened read-only (safe while it runs)."""
    path = service.env["DATABASE_PATH"]
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    if not os.path.exists(path + "-wal"):  # stopped cleanly: every write is in the main file
        uri += "&immutable=1"
    conn = sqlite3.connect(uri, uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def status_json(service):
    """Return ``python -m stark_challenge status --json`` for the service's database."""
    done = run_cli("status", "--json", cwd=service.cwd, env={"DATABASE_PATH": service.env["DATABASE_PATH"]})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def service_settled(service, emulator):
    """Return True when everything the emulator did has reached the service and been dealt
    with: the emulator idle (no payment or transfer step scheduled, no delivery held, being
    sent or waiting to be tried again) and no API call held; at the service, every stored
    event processed and no transfer waiting to be sent or in its call. Assert that "nothing
    happened" only after this holds."""
    if emulator.requests_in_flight or not emulator.idle():
        return False
    unprocessed = query(service, "select count(*) from event where processed_at is null")[0][0]
    unsent = query(service, "select count(*) from transfer where state in ('pending', 'sending', 'exists')")[0][0]
    return unprocessed == 0 and unsent == 0
