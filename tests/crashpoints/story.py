"""The money path's story, step by step, against one emulator and one service process.

``Run`` holds what a run of the story needs: an emulator, the service (started through
``seam.py``, so its durable commits are numbered) on a SQLite file or a PostgreSQL
schema of its own, and the invoices of round 0 by their part in the story (A to E).
``STEPS`` is the story as data: each ``Step`` is a name and a function of the run; add
a step to extend it. Every step leaves the service quiet
(``Run.quiet``): nothing in flight at Stark Bank, no delivery being sent, every stored
event processed, no transfer waiting to be sent.

The story is deterministic, so that "the n-th call" and "the k-th commit" name the same
moment in every run: the emulator holds every webhook (``hold_deliveries``) and the story
lets them go one at a time, each only once the service is quiet again; the first round's
create call is held until the worker's start-up pull has been answered; faults are
armed just before the call they are for. Nothing here sleeps to wait: every wait polls
a condition with a deadline, and ends at once with ``Crashed`` when the service process
died (the kill a crash point armed).
"""

import base64
import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, NamedTuple

from stark_challenge import config as config_module
from stark_challenge.emulator import Emulator

from support import child_env, free_port

__all__ = ["Run", "Step", "STEPS", "Crashed", "StoryStuck", "INVOICES", "ROLES", "SEAM", "AFTER_CRASH"]

SEAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seam.py")
ROLES = ("A", "B", "C", "D", "E")  # one invoice of round 0 for each part of the story
INVOICES = len(ROLES)
USERNAME = "stark"  # the webhook's basic auth user
OPERATOR = "operator"  # the basic auth user of /status and the operator's routes
WAIT_S = 20.0  # the longest any one condition of the story may take
POLL_S = 0.01
DELIVERY_ATTEMPTS = 5  # the emulator's default tries per webhook delivery
# The story's settings. A claim (on a round or a transfer) held by a killed process is taken over once its
# lease ends: the shortest lease there is (BANK_TIMEOUT + 1 s), so that a restart settles in seconds.
SETTINGS = {"INVOICE_MIN": INVOICES, "INVOICE_MAX": INVOICES, "INVOICE_INTERVAL": "1h", "INVOICE_DURATION": "1h",
            "EVENT_POLL_INTERVAL": "1h", "BANK_TIMEOUT": "3s", "CLAIM_LEASE": "1s"}
# What the service started again after a kill has on top: its reconciliation pass (which raises and
# resolves the alarms) every second, and a transfer still open after a second is an alarm, so that
# whatever a crash left open shows in /status's ALARMS within seconds (the invariants read it there).
AFTER_CRASH = {"RECONCILE_INTERVAL": "1s", "ALARM_AFTER": "1s"}


class Crashed(Exception):
    """The service process died while the story was waiting on it."""


class StoryStuck(AssertionError):
    """A condition of the story did not come true within its deadline."""


class Step(NamedTuple):
    """One step of the story."""

    name: str  # what it does, as the output names it
    act: Callable  # act(run): does it, and returns once the service is quiet


class Run:
    """One run of the story: an emulator, the service's home and process, and what the story made so far.

    ``commit_kill``: (launch, k) to have the service's ``launch``-th process (1-based)
    SIGKILL itself at its k-th durable commit, or None. The emulator's tripwire is
    armed by the caller. ``database_url``: the service's database is that PostgreSQL
    one (an empty schema), not a SQLite file in ``workdir``. Use as a context manager:
    everything stops at exit.
    """

    def __init__(self, workdir, certificates, commit_kill=None, seed=1, database_url=None):
        self.workdir = workdir
        self.database_url = database_url
        self._reader = None  # the harness's own connection to a PostgreSQL database, made at first use
        self.emu = Emulator(seed=seed, certificates=certificates, pay_ratio=0.0, transfer_delay_s=0.05,
                            delivery_backoff_s=0.05, hold_deliveries=True)
        self.commit_kill = commit_kill
        self.launches = 0  # processes started so far: the service's, and commands'
        self.processes = {}  # their names by number: "service", "transfers retry"
        self.last_command = None  # the arguments of the last command run
        self.proc = None
        self.invoices = {}  # role -> the emulator's invoice, once round 0 is issued
        self.step_started = []  # (time.monotonic(), step name), in order
        self.password = secrets.token_hex(8)
        self.operator_password = secrets.token_hex(8)
        self.env = None
        self.port = None

    def __enter__(self):
        self.emu.start()
        project_id, private_key = self.emu.create_project()
        self.port = free_port()
        self.env = child_env(self.workdir, **self.emu.env(project_id, private_key), **SETTINGS, **{
            "HOST": "127.0.0.1", "PORT": self.port, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
            "WEBHOOK_USERNAME": USERNAME, "WEBHOOK_PASSWORD": self.password,
            "OPERATOR_USERNAME": OPERATOR, "OPERATOR_PASSWORD": self.operator_password,
        })
        if self.database_url:
            self.env["DATABASE_URL"] = self.database_url
        else:
            self.env["DATABASE_PATH"] = os.path.join(self.workdir, "state.sqlite3")
        self.emu.add_webhook(config_module.with_userinfo(f"http://127.0.0.1:{self.port}/webhook", USERNAME,
                                                         self.password))
        return self

    def __exit__(self, *exc_info):
        self.stop_service(kill=True)
        self.emu.stop()
        if self._reader is not None:
            self._reader.close()

    def config(self):
        """Return the service's Config, as its processes read it."""
        return config_module.load(self.env, dotenv_path=None)

    @property
    def backend(self):
        """The service's database: "sqlite" or "postgres"."""
        return "postgres" if self.database_url else "sqlite"

    @property
    def database(self):
        """The SQLite file's path, or the PostgreSQL URL."""
        return self.database_url or self.env["DATABASE_PATH"]

    # -- the service process ------------------------------------------------------------

    def start_service(self, seam=True, timeout=WAIT_S, settings=None):
        """Start the next service process and wait for /health to answer 200; return seconds it took.

        Through the commit seam unless ``seam`` is False (a restart after a crash is the
        plain service), with ``settings`` on top of the story's. Raise Crashed if it dies first.
        """
        began = time.monotonic()
        self.proc = self._spawn("service", (), seam, settings)
        self.wait(lambda: self.health() is not None, "the service's /health", timeout)
        return time.monotonic() - began

    def run_command(self, *args, seam=True):
        """Run the command line (``transfers retry ...``) with the service's settings, as a process of the
        run (through the seam, so its commits count too); return its exit status. Raise Crashed if killed.
        A service running meanwhile is the run's process again once the command ended."""
        self.last_command = args
        service, self.proc = self.proc, self._spawn(" ".join(args[:2]), args, seam)
        self.wait(lambda: self.proc.poll() is not None, " ".join(args), WAIT_S, dead_ok=True)
        proc, self.proc = self.proc, service
        if proc.returncode < 0:
            raise Crashed(f"{' '.join(args)} died (signal {-proc.returncode})")
        return proc.returncode

    def _spawn(self, name, args, seam, settings=None):
        """Start process number ``self.launches + 1`` of the run: the service or a command (``args``)."""
        self.launches += 1
        self.processes[self.launches] = name
        env = dict(self.env, **(settings or {}))
        command = [sys.executable, "-m", "stark_challenge", *args]
        if seam:
            command = [sys.executable, SEAM, *args]
            env["CRASH_COMMIT_LOG"] = self.commit_log(self.launches)
            if self.commit_kill is not None and self.commit_kill[0] == self.launches:
                env["CRASH_AT_COMMIT"] = str(self.commit_kill[1])
        with open(os.path.join(self.workdir, "service.log"), "a") as log:
            return subprocess.Popen(command, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)

    def commit_log(self, launch):
        """The file where the ``launch``-th process notes its durable commits."""
        return os.path.join(self.workdir, f"commits-{launch}.log")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL the process of the run (the service, or a command) and wait until it is gone (the
        tripwire's action; any thread)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop_service(self, kill=False):
        """Stop the service with SIGTERM (and wait), or SIGKILL with ``kill``; raise Crashed if it had died
        (a SIGKILL from the tripwire while it stops counts too)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise StoryStuck("the service did not stop within 15 s of SIGTERM") from None
        self.proc = None
        if not kill and proc.returncode != 0:
            raise Crashed(f"the service stopped with status {proc.returncode}")

    def health(self):
        """Return /health's status word, or None if it does not answer 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                return json.loads(answer.read())["status"] if answer.status == 200 else None
        except (OSError, ValueError, KeyError):
            return None

    def status_page(self):
        """Return GET /status (behind the operator's basic auth) as a dict."""
        token = base64.b64encode(f"{OPERATOR}:{self.operator_password}".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/status",
                                         headers={"Authorization": "Basic " + token})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    # -- reading the service's database -------------------------------------------------

    def rows(self, sql, params=()):
        """Return the rows of ``sql`` (``?`` placeholders) on the service's database, as tuples: a SQLite
        file opened read-only for each call, or PostgreSQL through a connection of the harness's own."""
        if self.database_url:
            return self._postgres_rows(sql, params)
        if not os.path.exists(self.database):
            return []
        uri = "file:" + urllib.parse.quote(self.database) + "?mode=ro"
        if not os.path.exists(self.database + "-wal"):
            uri += "&immutable=1"
        conn = sqlite3.connect(uri, uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            conn.close()

    def _postgres_rows(self, sql, params):
        import psycopg  # a PostgreSQL run only: the [postgres] extra

        if self._reader is None or self._reader.closed:
            self._reader = psycopg.connect(self.database_url, autocommit=True, connect_timeout=10)
        try:
            return [tuple(r) for r in self._reader.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]
        except psycopg.errors.UndefinedTable:  # before the service made its tables
            return []

    def transfer_rows(self, role):
        """Return [(attempt, state, tries)] of the transfers of the invoice playing ``role``."""
        return self.rows("select attempt, state, tries from transfer where invoice_id = ? order by attempt",
                         (self.invoices[role]["id"],))

    # -- waiting ------------------------------------------------------------------------

    def wait(self, predicate, what, timeout=WAIT_S, dead_ok=False):
        """Poll ``predicate`` until it is truthy and return its value; raise Crashed if the process of the
        run died (unless ``dead_ok``), StoryStuck after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not dead_ok and self.proc is not None and self.proc.poll() is not None:
                raise Crashed(f"the service died (status {self.proc.returncode}) waiting for {what}")
            if time.monotonic() > deadline:
                raise StoryStuck(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(POLL_S)

    def is_quiet(self, pending_ok=False):
        """Return True when nothing moves: no call at Stark Bank, no delivery being sent, every
        stored event processed, no round being issued, and no transfer waiting to be sent (unless
        ``pending_ok``)."""
        if self.emu.requests_in_flight or self.emu.deliveries_sending():
            return False
        states = ("sending",) if pending_ok else ("pending", "sending")
        marks = ",".join("?" * len(states))
        # One statement (it is polled): no tables yet is not quiet either.
        return self.rows("select (select count(*) from event where processed_at is null)"
                         " + (select count(*) from round where state = 'issuing')"
                         f" + (select count(*) from transfer where state in ({marks}))", states) == [(0,)]

    def quiet(self, pending_ok=False):
        """Wait until ``is_quiet``."""
        self.wait(lambda: self.is_quiet(pending_ok), "the service to be quiet")

    def answered(self, method, path, query_part=""):
        return [c for c in self.emu.requests
                if c["method"] == method and c["path"] == path and query_part in c["query"]]

    def in_flight(self, method, path):
        return any(c["method"] == method and c["path"] == path for c in self.emu.requests_in_flight)

    # -- webhooks, one at a time --------------------------------------------------------

    def deliver_one(self, times=1, pending_ok=False):
        """Let the oldest held webhook go (``times`` copies, one after the other) and wait until it was
        answered and the service is quiet again (``pending_ok``: see ``is_quiet``)."""
        self.wait(lambda: self.emu.deliveries_held() > 0, "a webhook to deliver")
        tried = len(self.emu.deliveries())
        if times > 1:
            self.emu.set(deliver_times=times)
        self.emu.release_deliveries(1)
        if times > 1:
            self.emu.set(deliver_times=1)
        self.wait(lambda: len(self.emu.deliveries()) >= tried + times, "the webhook's delivery")
        self.quiet(pending_ok)

    def deliver_until(self, done, what):
        """Deliver held webhooks one at a time until ``done()`` holds with none held."""
        def finished_or_held():
            if self.emu.deliveries_held():
                return "deliver"
            return "done" if done() and self.is_quiet() else None
        while self.wait(finished_or_held, what) == "deliver":
            self.deliver_one()

    def succeeded(self, role, attempt=None):
        """Return True if the service recorded ``success`` for the invoice's transfer (that attempt, or any)."""
        return any(s == "success" and attempt in (None, a) for a, s, _ in self.transfer_rows(role))

    def pay(self, role):
        self.emu.pay(self.invoices[role]["id"])


# -- the steps --------------------------------------------------------------------------


def start(run):
    """Start the service on a new database: round 0 is issued (after the start-up pull, held till then)."""
    run.emu.answer_late("POST", "/v2/invoice", delay_s=60)
    run.start_service()
    run.wait(lambda: run.answered("GET", "/v2/event") and run.health() == "ok", "the start-up pull")
    run.wait(lambda: run.in_flight("POST", "/v2/invoice"), "round 0's create call")
    run.emu.answer_held_calls()
    run.wait(lambda: run.rows("select state from round") == [("issued",)], "round 0 issued")
    run.quiet()
    invoices = run.emu.invoices()
    assert len(invoices) == INVOICES, f"round 0 has {len(invoices)} invoices, not {INVOICES}"
    run.invoices = dict(zip(ROLES, invoices))


def created_events(run):
    """Deliver the `created` events of round 0's invoices (the first fetches Stark Bank's public key)."""
    for _ in range(INVOICES):
        run.deliver_one()


def credit_a_twice(run):
    """A is paid: `paid`, then `credited` delivered twice; A's transfer is created."""
    run.pay("A")
    run.deliver_one()
    run.deliver_one(times=2)


def transfer_a_succeeds(run):
    """A's transfer goes `created`, `processing`, `success` (each event delivered)."""
    run.deliver_until(lambda: run.succeeded("A"), "A's transfer to succeed")


def transfer_b_500_then_lookup(run):
    """B's create call is carried out at Stark Bank but answered 500: found by the lookup by tag. Then
    `success`."""
    run.emu.fail_next_after("POST", "/v2/transfer", status=500)
    run.pay("B")
    run.deliver_one()
    run.deliver_one()
    run.deliver_until(lambda: run.succeeded("B"), "B's transfer to succeed")


def transfer_c_fails_twice(run):
    """C's transfer fails at Stark Bank (confirmed), so its second attempt is queued and sent; that one
    fails too: the credit is stuck (its latest attempt failed, nothing forwarded), what ``transfers retry``
    is for."""
    run.emu.set(transfer_fail_ratio=1.0)  # drawn when each transfer is created
    run.pay("C")
    run.deliver_one()
    run.deliver_one()
    run.deliver_until(lambda: [(a, s) for a, s, _ in run.transfer_rows("C")] == [(1, "failed"), (2, "failed")],
                      "C's two attempts to fail")
    run.emu.set(transfer_fail_ratio=0.0)


def transfer_e_unanswered(run):
    """E's create call and its lookup go unanswered (500), and the service is stopped: E is `pending`,
    to be sent again under its own external id (no definite answer never makes a new one)."""
    run.emu.fail_next("POST", "/v2/transfer", status=500)
    run.emu.fail_next("GET", "/v2/transfer", status=500)
    run.pay("E")
    run.deliver_one()
    run.deliver_one(pending_ok=True)  # E's credit: its transfer ends pending, to be tried again after a backoff
    run.wait(lambda: run.transfer_rows("E") == [(1, "pending", 1)] and run.is_quiet(pending_ok=True),
             "E's first try to go unanswered")
    run.stop_service()


def missed_events(run):
    """D is paid while the service is stopped, and both its webhooks are given up."""
    run.emu.set(delivery_attempts=1)
    run.pay("D")
    tried = len(run.emu.deliveries())
    run.emu.release_deliveries(2)
    run.wait(lambda: len(run.emu.deliveries()) >= tried + 2 and not run.emu.deliveries_sending(),
             "D's webhooks to be given up")
    run.emu.set(delivery_attempts=DELIVERY_ATTEMPTS)


def retry_then_start(run):
    """The operator runs `transfers retry` for E, then for C, while the service is stopped. E's first
    attempt has no definite answer, so the command makes it due now under the same external id (never a
    second one); C's latest attempt failed, so the command asks Stark Bank for every transfer of the
    invoice and, none moving money, queues a third attempt. The service, started, pulls D's events (the
    missed-event pull) and sends the three transfers."""
    for role in ("E", "C"):
        done = run.run_command("transfers", "retry", run.invoices[role]["id"])
        assert done == 0, f"transfers retry {role} exited {done}"
    run.start_service()
    run.wait(lambda: run.succeeded("D") or run.emu.deliveries_held(), "the transfers sent")
    run.deliver_until(lambda: run.succeeded("E") and run.succeeded("C", attempt=3) and run.succeeded("D"),
                      "E's, C's and D's transfers to succeed")


STEPS = (
    Step("round 0 issued", start),
    Step("created events delivered", created_events),
    Step("A credited, webhook delivered twice", credit_a_twice),
    Step("A's transfer created, then success", transfer_a_succeeds),
    Step("B answered 500, then found by lookup", transfer_b_500_then_lookup),
    Step("C failed, its second attempt too: stuck", transfer_c_fails_twice),
    Step("E unanswered, service stopped", transfer_e_unanswered),
    Step("D paid while stopped, webhooks given up", missed_events),
    Step("E and C mended by transfers retry; D pulled at the start", retry_then_start),
)
