"""Soak run: the service under steady, realistic traffic for a set time, its memory sampled throughout.

Not a test: ``make soak`` runs it (``SOAK_MINUTES``, default 30), prints the figures and
their slopes, and writes ``bench/soak.json`` and ``bench/soak.svg`` (memory over time, for
a browser). It starts the real service (``python -m stark_challenge``, as a user runs it,
with ``DEBUG_MEMORY=on`` so ``GET /debug/memory`` answers) against the Stark Bank emulator
on loopback, with basic auth on, and for the whole run:

- the service issues a round every ``ROUND_S`` (8 to 12 invoices); the emulator pays
  ``PAY_RATIO`` of them and delivers every event of the service's own money (``created``,
  ``paid``, ``credited`` invoices; ``created``, ``processing``, ``success`` transfers) to
  its webhook, as Stark Bank does; each credit is forwarded by a transfer;
- ``bench/loadgen.py`` (its own process) offers ``SOAK_RATE`` (20) signed webhooks a
  second, each on a new connection: events of every kind the service receives, for
  another app's invoices and transfers (``updated`` the most, then ``created``,
  ``paid``, ``credited``, ``overdue``, ``canceled``, ``expired``, ``voided``,
  ``reversed``; transfer ``created`` ... ``failed``), and ``REDELIVERED`` (15 %)
  redeliveries: requests sent before, and events of the service's own money again;
- every minute ``bench/hostile.py`` (its own process) runs slow, silent, huge-head and
  malformed clients for ``HOSTILE_S`` seconds;
- every ``HOLD_EVERY_S`` the emulator holds its deliveries for ``HOLD_S``, well over
  the service's ``EVENT_POLL_INTERVAL``: the missed-event pull finds and
  processes them, then they are delivered late (more redeliveries);
- halfway, the service is stopped (SIGTERM) and started again on the same database;
- events older than ``SOAK_RETENTION`` (5 minutes here, 90 days by default) are
  deleted by the service, so the database's size levels off within the run.

Every ``SOAK_SAMPLE_S`` (30) seconds it samples, from ``/proc/<pid>``: resident memory
(all, and anonymous), threads, open files; from ``GET /debug/memory``: Python's
allocated blocks, the objects the collector tracks, SQLite's memory and page cache; the
database's files (main, WAL). The slope of each after warm-up (``SOAK_WARMUP_MIN``, 5,
after each start, at most a third of each half) is fitted by least squares with one
line per process life (a common slope, its own intercept), and given per hour.

At the end, with the traffic stopped and everything processed, it checks: every
webhook the load generator sent was answered 200; every delivery the emulator made
was answered 200 or not answered at all (the restart); every event at the emulator
ended delivered; every invoice of the service's that was paid has exactly one transfer
of its amount less the fee, and no other transfer exists; the pull stored events (at
some sample or at the end: retention deletes them like any other). Exit status 1 if a
check fails.

Knobs (environment): ``SOAK_MINUTES``, ``SOAK_RATE``, ``SOAK_SAMPLE_S``,
``SOAK_WARMUP_MIN``, ``SOAK_RETENTION``, ``SOAK_OUTPUT`` (a path without extension, instead of
``bench/soak``), ``SOAK_RESTART=0`` (no restart: one process life to
study), ``DEBUG_MEMORY=trace`` (tracemalloc's total and top lines in each sample); and whatever the service reads, e.g.
``MALLOC_ARENA_MAX=2 make soak`` to compare the allocator's arenas.

Bounded: the run's minutes plus about two to drain and check; loopback only; every
process it starts is stopped before it exits and its temporary files removed.
"""

import base64
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from stark_challenge.config import with_userinfo  # noqa: E402
from stark_challenge.emulator import Emulator  # noqa: E402
from stark_challenge.memory import ARENAS  # noqa: E402
from stark_challenge.store import Store  # noqa: E402
from stark_challenge.timing import utcnow  # noqa: E402
from webhook_bench import (  # noqa: E402
    HOSTILE, LOADGEN, Service, clean_env, event_body, free_port, http_get, machine, write_lines,
)

# Where the figures and the plot go; SOAK_OUTPUT=/tmp/trial writes /tmp/trial.json and .svg instead.
OUT_STEM = os.environ.get("SOAK_OUTPUT") or os.path.join(ROOT, "bench", "soak")
OUT_JSON, OUT_SVG = OUT_STEM + ".json", OUT_STEM + ".svg"

MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
RATE = float(os.environ.get("SOAK_RATE", "20"))  # webhooks a second from the load generator
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_S", "30"))
WARMUP_MIN = float(os.environ.get("SOAK_WARMUP_MIN", "5"))
RETENTION = os.environ.get("SOAK_RETENTION", "5m")
RESTART = os.environ.get("SOAK_RESTART", "1") != "0"  # 0: no restart halfway (one process life to study)
INSTANCE_TAG = "stark-soak"
ROUND_S = 30  # the service's INVOICE_INTERVAL
PAY_RATIO = 0.6
REDELIVERED = 0.15  # share of the load generator's requests that are redeliveries
CONNECTIONS = 4  # load generator threads (each request on a new connection)
HOSTILE_EVERY_S = 60.0
HOSTILE_S = 20.0
HOSTILE_CLIENTS = {"slow": 4, "silent": 3, "huge": 3, "malformed": 1}
POLL = "1m"  # the service's EVENT_POLL_INTERVAL
HOLD_EVERY_S = 300.0
HOLD_FIRST_S = 60.0
HOLD_S = 150.0  # two and a half poll intervals: a pull always falls inside
DRAIN_TIMEOUT_S = 240.0
# Foreign events of each kind, by weight: mostly updates, as a busy workspace sends.
KINDS = (
    ("invoice", "updated", 40), ("invoice", "created", 15), ("invoice", "paid", 8), ("invoice", "credited", 4),
    ("invoice", "overdue", 6), ("invoice", "canceled", 5), ("invoice", "expired", 5), ("invoice", "voided", 2),
    ("invoice", "reversed", 2), ("transfer", "created", 4), ("transfer", "processing", 4),
    ("transfer", "success", 4), ("transfer", "failed", 1),
)


# -- what is sent ------------------------------------------------------------------


class Traffic:
    """Signed webhook requests: foreign events of every kind, and redeliveries of earlier ones."""

    def __init__(self, emulator, auth, rng):
        self._emulator = emulator
        self._auth = auth
        self._rng = rng
        self._serial = int(time.time() * 1000) * 10_000
        self._sent = []  # a bounded pool of requests sent before, for redeliveries
        self._kinds = [(s, t) for s, t, w in KINDS for _ in range(w)]

    def _signed(self, body):
        return {"body": body, "headers": {"Content-Type": "application/json", "Authorization": self._auth,
                                          "Digital-Signature": self._emulator.sign(body)}}

    def _foreign(self):
        self._serial += 1
        serial = str(self._serial)
        subscription, log_type = self._rng.choice(self._kinds)
        now = utcnow().isoformat(timespec="microseconds")
        if subscription == "invoice":
            entity = {"id": serial, "amount": 1000 + self._serial % 90000, "fee": 50, "status": "paid",
                      "name": "Ana Souza", "taxId": "012.345.678-90", "tags": ["another-app"],
                      "created": now, "updated": now}
        else:
            entity = {"id": serial, "amount": 1000 + self._serial % 90000, "status": log_type,
                      "externalId": f"another-app-{serial}", "tags": ["another-app"], "name": "Someone",
                      "taxId": "012.345.678-90", "bankCode": "20018183", "created": now, "updated": now}
        event = {"id": str(self._serial + 10**17), "created": now, "isDelivered": False,
                 "subscription": subscription, "workspaceId": "1",
                 "log": {"id": f"log-{serial}", "type": log_type, "created": now, "errors": [],
                         subscription: entity}}
        return self._signed(event_body(event))

    def chunk(self, count, own_events):
        """Return ``count`` requests: new foreign events, with ``REDELIVERED`` of them redeliveries."""
        out = []
        for _ in range(count):
            if self._rng.random() < REDELIVERED and (self._sent or own_events):
                if own_events and self._rng.random() < 0.5:
                    out.append(self._signed(event_body(self._rng.choice(own_events))))
                elif self._sent:
                    out.append(self._rng.choice(self._sent))
                else:
                    out.append(self._foreign())
            else:
                request = self._foreign()
                out.append(request)
                if len(self._sent) < 2000:
                    self._sent.append(request)
                else:
                    self._sent[self._rng.randrange(len(self._sent))] = request
        return out


# -- the statistics ------------------------------------------------------------------


def pooled_slope(segments):
    """Return the least-squares slope (per x unit) of y on x with one intercept per segment, or None.

    ``segments`` is a list of [(x, y)]: the samples of each process life after its warm-up.
    """
    sxy = sxx = 0.0
    for points in segments:
        if len(points) < 2:
            continue
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxy += sum((x - mx) * (y - my) for x, y in points)
        sxx += sum((x - mx) ** 2 for x, _ in points)
    return sxy / sxx if sxx > 0 else None


# -- the plot ------------------------------------------------------------------------


def svg_plot(samples, restarts, title):
    """Return an SVG (text) of resident memory, Python's and SQLite's memory against minutes."""
    width, height, left, right, top, bottom = 900, 460, 70, 170, 40, 50
    series = [
        ("resident (MB)", "#1f77b4", [(s["minute"], s["rss_kib"] / 1024) for s in samples]),
        ("anonymous (MB)", "#2ca02c", [(s["minute"], s["rss_anon_kib"] / 1024) for s in samples]),
        ("Python blocks x 100k", "#ff7f0e", [(s["minute"], s["python_blocks"] / 100_000) for s in samples
                                             if s.get("python_blocks") is not None]),
        ("SQLite memory (MB)", "#9467bd", [(s["minute"], s["sqlite_memory_bytes"] / 2**20) for s in samples
                                           if s.get("sqlite_memory_bytes") is not None]),
    ]
    xs = [x for _, _, points in series for x, _ in points] or [0, 1]
    ys = [y for _, _, points in series for _, y in points] or [0, 1]
    x0, x1 = 0.0, max(max(xs), 1e-9)
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y):
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>']
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for i in range(7):
        x = x0 + (x1 - x0) * i / 6
        out.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">minutes</text>')
    for minute in restarts:
        out.append(f'<line x1="{px(minute):.1f}" y1="{top}" x2="{px(minute):.1f}" y2="{top + plot_h}" '
                   f'stroke="red" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{px(minute) + 4:.1f}" y="{top + 12}" fill="red">restart</text>')
    for i, (name, colour, points) in enumerate(series):
        if points:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        ly = top + 10 + i * 18
        out.append(f'<line x1="{left + plot_w + 12}" y1="{ly}" x2="{left + plot_w + 32}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left + plot_w + 36}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- the run ---------------------------------------------------------------------------


class Soak:
    """One run: owns the emulator, the service, the load and attack processes and the work directory."""

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="stark-soak-")
        self.db_path = os.path.join(self.workdir, "soak.sqlite3")
        self.rng = random.Random(27)
        self.emulator = None
        self.service = None
        self.loadgen = None
        self.hostile = None
        self.samples = []
        self.starts = []  # (monotonic time, pid) of each start
        self.sent = {"requests": 0, "statuses": {}, "stored": 0}
        self.attacks = {"runs": 0, "connections": 0}
        self.holds = 0

    # the pieces

    def _start(self):
        self.emulator = Emulator(pay_ratio=PAY_RATIO, pay_delay_s=3.0, transfer_delay_s=1.0, invoice_fee=50,
                                 delivery_attempts=8, delivery_backoff_s=0.5, seed=27).start()
        project_id, private_key = self.emulator.create_project()
        password, operator_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        env = {k: v for k, v in clean_env().items()
               if not k.startswith(("STARK_", "WEBHOOK_", "INVOICE_", "OPERATOR_"))}
        env.update(self.emulator.env(project_id, private_key))
        port = free_port()
        env.update({
            "HOST": "127.0.0.1", "PORT": str(port), "DATABASE_PATH": self.db_path,
            "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "INSTANCE_TAG": INSTANCE_TAG,
            "WEBHOOK_USERNAME": "stark", "WEBHOOK_PASSWORD": password,
            "OPERATOR_USERNAME": "operator", "OPERATOR_PASSWORD": operator_password,
            "INVOICE_INTERVAL": f"{ROUND_S}s", "INVOICE_DURATION": "0", "INVOICE_MIN": "8", "INVOICE_MAX": "12",
            "EVENT_POLL_INTERVAL": POLL, "BANK_TIMEOUT": "10s", "EVENT_RETENTION": RETENTION,
            "DEBUG_MEMORY": os.environ.get("DEBUG_MEMORY", "on"),  # trace: tracemalloc's figures too
        })
        self.auth = "Basic " + base64.b64encode(f"stark:{password}".encode()).decode()
        self.operator = "Basic " + base64.b64encode(f"operator:{operator_password}".encode()).decode()
        self.service = Service(env, os.path.join(self.workdir, "service.log"))
        self.service.pure = False  # the verifier a user's install picks
        self.emulator.add_webhook(with_userinfo(f"http://127.0.0.1:{port}/webhook", "stark", password))
        self.traffic = Traffic(self.emulator, self.auth, self.rng)
        self._start_service()

    def _start_service(self):
        self.service.start(timeout=30)
        self.starts.append((time.monotonic(), self.service.pid))

    def _restart(self):
        print(f"  {self._minute():6.1f} min  restarting the service (SIGTERM, then a new start)", flush=True)
        status = self.service.stop(timeout=30)
        if status != 0:
            raise RuntimeError(f"the service exited with {status} on SIGTERM; its log:\n{self.service.tail()}")
        self._start_service()

    def _minute(self):
        return (time.monotonic() - self.began) / 60

    def _get_json(self, path):
        status, body = http_get(self.service.port, path, {"Authorization": self.operator}, timeout=10)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}")
        return json.loads(body)

    def _sample(self):
        pid = self.service.pid
        sample = {"minute": round(self._minute(), 3), "pid": pid,
                  "loadavg": float(open("/proc/loadavg").read().split()[0])}  # the machine's, for context
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
                    key = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "VmHWM": "rss_peak_kib",
                           "Threads": "threads"}[name]
                    sample[key] = int(value.split()[0])
        sample["open_files"] = len(os.listdir(f"/proc/{pid}/fd"))
        figures = self._get_json("/debug/memory")
        sample["python_blocks"] = figures["python_blocks"]
        sample["gc_objects"] = figures["gc_objects"]
        sqlite = figures.get("sqlite") or {}
        sample["sqlite_memory_bytes"] = sqlite.get("memory_used_bytes")
        sample["sqlite_page_cache_bytes"] = sqlite.get("page_cache_bytes")
        if "tracemalloc" in figures:
            sample["traced_bytes"] = figures["tracemalloc"]["current_bytes"]
            sample["traced_top"] = figures["tracemalloc"]["top"][:5]
        sample["db_bytes"] = os.path.getsize(self.db_path)
        sample["wal_bytes"] = os.path.getsize(self.db_path + "-wal") if os.path.exists(self.db_path + "-wal") else 0
        status = self._get_json("/status")
        sample["events_stored"] = status["events"]["received"]
        sample["db_used_bytes"] = status.get("storage", {}).get("bytes")
        sample["events_pulled"] = self._pulled()  # retention deletes them later: the check takes the largest
        self.samples.append(sample)
        print(f"  {sample['minute']:6.1f} min  RSS {sample['rss_kib'] / 1024:6.1f} MB  "
              f"threads {sample['threads']:3d}  files {sample['open_files']:3d}  "
              f"blocks {sample['python_blocks']:7d}  SQLite {(sample['sqlite_memory_bytes'] or 0) / 2**20:5.2f} MB  "
              f"db {sample['db_bytes'] / 2**20:6.2f} MB (+WAL {sample['wal_bytes'] / 2**20:5.2f})  "
              f"events {sample['events_stored']}", flush=True)

    def _launch_loadgen(self, requests):
        name = f"chunk{len(self.samples)}"
        requests_path = os.path.join(self.workdir, f"{name}.jsonl")
        job_path = os.path.join(self.workdir, f"{name}.job.json")
        write_lines(requests_path, requests)
        with open(job_path, "w") as f:
            json.dump({"host": "127.0.0.1", "port": self.service.port, "path": "/webhook",
                       "requests": requests_path, "connections": CONNECTIONS, "mode": "rate", "rate": RATE,
                       "duration_s": SAMPLE_S, "fresh": True}, f)
        out = open(os.path.join(self.workdir, f"{name}.out.json"), "w+")
        self.loadgen = (subprocess.Popen([sys.executable, LOADGEN, job_path], stdout=out,
                                         stderr=subprocess.PIPE, text=True, env=clean_env()), out)

    def _collect_loadgen(self):
        proc, out = self.loadgen
        self.loadgen = None
        _, err = proc.communicate(timeout=SAMPLE_S + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed: {err}")
        out.seek(0)
        result = json.load(out)
        out.close()
        for _, _, _, status, stored in result["results"]:
            self.sent["requests"] += 1
            self.sent["statuses"][str(status)] = self.sent["statuses"].get(str(status), 0) + 1
            self.sent["stored"] += bool(stored)

    def _launch_hostile(self):
        job_path = os.path.join(self.workdir, "hostile.job.json")
        with open(job_path, "w") as f:
            json.dump({"host": "127.0.0.1", "port": self.service.port, "duration_s": HOSTILE_S,
                       **HOSTILE_CLIENTS}, f)
        self.hostile = subprocess.Popen([sys.executable, HOSTILE, job_path], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=clean_env())

    def _collect_hostile(self, wait):
        if self.hostile is None or (not wait and self.hostile.poll() is None):
            return
        out, err = self.hostile.communicate(timeout=HOSTILE_S + 60)
        if self.hostile.returncode != 0:
            raise RuntimeError(f"hostile.py failed: {err}")
        self.hostile = None
        self.attacks["runs"] += 1
        self.attacks["connections"] += sum(kind["connections"] for kind in json.loads(out).values())

    def _own_events(self):
        return [e for e in self.emulator.events() if e["subscription"] in ("invoice", "transfer")]

    def _wait(self, predicate, what, timeout=DRAIN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}; service log:\n{self.service.tail()}")

    def _pulled(self):
        reader = Store(self.db_path, read_only=True)
        try:
            return reader._one("select count(*) from event where source = 'pull'")[0]
        finally:
            reader.close()

    def _pending(self):
        reader = Store(self.db_path, read_only=True)
        try:
            summary = reader.summary()
        finally:
            reader.close()
        return summary["events"]["pending"] + summary["transfers"].get("queued", {}).get("count", 0)

    # the run

    def run(self):
        self._start()
        self.began = time.monotonic()
        end = self.began + MINUTES * 60
        restart_at = self.began + MINUTES * 30
        restarted = not RESTART
        next_hostile = self.began + HOSTILE_EVERY_S / 2
        next_hold = self.began + HOLD_FIRST_S
        hold_until = None
        own = []
        print(f"soak: {MINUTES:g} min at {RATE:g} webhooks/s (+ the emulator's own deliveries), "
              f"a sample every {SAMPLE_S:g} s; service pid {self.service.pid}", flush=True)
        self._sample()
        requests = self.traffic.chunk(int(RATE * SAMPLE_S), own)
        while time.monotonic() < end:
            chunk_end = time.monotonic() + SAMPLE_S
            self._launch_loadgen(requests)
            own = self._own_events()
            requests = self.traffic.chunk(int(RATE * SAMPLE_S), own)  # the next chunk, signed meanwhile
            while time.monotonic() < chunk_end:
                now = time.monotonic()
                if now >= next_hostile and self.hostile is None:
                    self._launch_hostile()
                    next_hostile = now + HOSTILE_EVERY_S
                self._collect_hostile(wait=False)
                if hold_until is None and now >= next_hold and now + HOLD_S < end - 60:
                    self.emulator.set(hold_deliveries=True)
                    hold_until, next_hold = now + HOLD_S, now + HOLD_EVERY_S
                    self.holds += 1
                if hold_until is not None and now >= hold_until:
                    self.emulator.set(hold_deliveries=False)
                    self.emulator.release_deliveries()
                    hold_until = None
                time.sleep(0.2)
            self._collect_loadgen()
            self._sample()
            if not restarted and time.monotonic() >= restart_at:
                self._collect_hostile(wait=True)
                self._restart()
                restarted = True
                self._sample()
        self._collect_hostile(wait=True)
        if hold_until is not None:
            self.emulator.set(hold_deliveries=False)
            self.emulator.release_deliveries()
        return self._finish()

    def _finish(self):
        print(f"  {self._minute():6.1f} min  traffic stopped; waiting for every event and transfer", flush=True)
        self.emulator.set(pay_ratio=0.0)  # rounds go on issuing; nothing new is paid meanwhile
        time.sleep(4.0)  # payments already drawn come due (pay_delay_s)
        self._wait(lambda: self.emulator.idle() and self._pending() == 0, "the emulator and the service to settle")
        self._wait(self._credits_settled, "a transfer for every paid invoice")
        checks = self._checks()
        return checks

    def _paid_and_transfers(self):
        invoices = {i["id"]: i for i in self.emulator.invoices() if INSTANCE_TAG in (i.get("tags") or [])}
        paid = {k: v for k, v in invoices.items() if v["status"] == "paid"}
        transfers = [t for t in self.emulator.transfers() if INSTANCE_TAG in (t.get("tags") or [])]
        return paid, transfers

    def _credits_settled(self):
        paid, transfers = self._paid_and_transfers()
        covered = {tag.removeprefix("invoice-") for t in transfers for tag in t["tags"] if tag.startswith("invoice-")}
        return set(paid) <= covered and self._pending() == 0

    def _checks(self):
        paid, transfers = self._paid_and_transfers()
        by_invoice = {}
        for t in transfers:
            invoice_id = next(tag.removeprefix("invoice-") for tag in t["tags"] if tag.startswith("invoice-"))
            by_invoice.setdefault(invoice_id, []).append(t)
        wrong = [i for i, inv in paid.items()
                 if len(by_invoice.get(i, [])) != 1 or by_invoice[i][0]["amount"] != inv["amount"] - inv["fee"]]
        stray = sorted(set(by_invoice) - set(paid))
        deliveries = self.emulator.deliveries()
        answered = {}
        for d in deliveries:
            answered[str(d["status"])] = answered.get(str(d["status"]), 0) + 1
        undelivered = [e["id"] for e in self.emulator.events() if not e["isDelivered"]]
        reader = Store(self.db_path, read_only=True)
        try:
            summary = reader.summary()
        finally:
            reader.close()
        # The most stored at once, at a sample or now (EVENT_RETENTION deletes them like any other).
        pulled = max([self._pulled()] + [s.get("events_pulled", 0) for s in self.samples])
        sent_ok = self.sent["statuses"].get("200", 0)
        checks = {
            "every_webhook_answered_200": sent_ok == self.sent["requests"] and sent_ok > 0,
            "every_delivery_answered_200_or_unreached": all(k in ("200", "None") for k in answered),
            "every_event_delivered_at_the_emulator": not undelivered,
            "every_credit_forwarded_exactly_once": not wrong and not stray and len(paid) > 0,
            "the_pull_stored_events": pulled > 0 or not self.holds,
        }
        return {
            "checks": checks,
            "credits": {"paid_invoices": len(paid), "transfers": len(transfers), "wrong": wrong[:20],
                        "stray": stray[:20], "credited_in_store": summary["credits"]["count"]},
            "webhooks_sent": self.sent,
            "emulator_deliveries": {"tries": len(deliveries), "answers": answered, "undelivered": undelivered[:20],
                                    "events": len(self.emulator.events())},
            "events_pulled": pulled,
            "hostile": self.attacks,
            "delivery_holds": self.holds,
            "storage_at_end": summary.get("storage"),
            "events_in_store_at_end": summary["events"]["received"],
        }

    def close(self):
        for proc in (self.loadgen[0] if self.loadgen else None, self.hostile):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self.service is not None:
            self.service.stop()
        if self.emulator is not None:
            self.emulator.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


FIGURES = (  # (key in a sample, label, unit, divisor)
    ("rss_kib", "resident memory", "MB", 1024),
    ("rss_anon_kib", "  anonymous", "MB", 1024),
    ("python_blocks", "Python allocated blocks", "k", 1000),
    ("gc_objects", "objects tracked by gc", "k", 1000),
    ("sqlite_memory_bytes", "SQLite memory", "MB", 2**20),
    ("sqlite_page_cache_bytes", "  its page cache", "MB", 2**20),
    ("threads", "threads", "", 1),
    ("open_files", "open files", "", 1),
    ("db_bytes", "database file", "MB", 2**20),
    ("wal_bytes", "  its WAL", "MB", 2**20),
    ("events_stored", "events stored", "k", 1000),
    ("traced_bytes", "traced by tracemalloc", "MB", 2**20),
)


def figures(samples, starts_minutes):
    """Return {key: first, last, min, max, slope per hour after warm-up} for each of FIGURES."""
    segments = []
    for i, start in enumerate(starts_minutes):
        stop = starts_minutes[i + 1] if i + 1 < len(starts_minutes) else float("inf")
        life = [s for s in samples if start <= s["minute"] < stop]
        if not life:
            continue
        span = life[-1]["minute"] - start
        warmup = min(WARMUP_MIN, span / 3)
        segments.append([s for s in life if s["minute"] >= start + warmup])
    out = {}
    for key, label, unit, divisor in FIGURES:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            continue
        slope = pooled_slope([[(s["minute"] / 60, s[key] / divisor) for s in seg if s.get(key) is not None]
                              for seg in segments])
        after = [s[key] / divisor for seg in segments for s in seg if s.get(key) is not None]
        out[key] = {"label": label.strip(), "unit": unit, "first": values[0] / divisor, "last": values[-1] / divisor,
                    "min": min(values) / divisor, "max": max(values) / divisor,
                    "after_warmup_min": min(after) if after else None,
                    "after_warmup_max": max(after) if after else None,
                    "slope_per_hour": slope}
    return out


def main():
    host = machine()  # before the run: its load average is the one at the start
    soak = Soak()
    try:
        outcome = soak.run()
        starts = [round((t - soak.began) / 60, 3) if t >= soak.began else 0.0 for t, _ in soak.starts]
    finally:
        samples = soak.samples
        soak.close()
    table = figures(samples, starts)
    result = {"machine": host, "minutes": MINUTES, "rate_per_s": RATE, "sample_s": SAMPLE_S,
              "warmup_min": WARMUP_MIN, "retention": RETENTION,
              "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX") or f"{ARENAS} (the service's own cap)",
              "restarts_at_minute": starts[1:], "figures": table, **outcome, "samples": samples}
    m = result["machine"]
    m["loadavg_at_end"] = open("/proc/loadavg").read().split()[0]  # the machine may be shared: how busy it was
    print(f"\n{m['nproc']} x {m['cpu_model']}, Python {m['python']}, commit {m['commit']}, "
          f"load average at start {m['loadavg_at_start']}, at end {m['loadavg_at_end']}")
    print(f"{'figure':<26} {'first':>9} {'last':>9} {'min':>9} {'max':>9} {'slope/h after warm-up':>22}")
    for key, row in table.items():
        slope = "n/a" if row["slope_per_hour"] is None else f"{row['slope_per_hour']:+.2f} {row['unit']}/h"
        print(f"{row['label']:<26} {row['first']:>9.2f} {row['last']:>9.2f} {row['min']:>9.2f} {row['max']:>9.2f} "
              f"{slope:>22}")
    sent = outcome["webhooks_sent"]
    print(f"\nwebhooks sent {sent['requests']} (answers {sent['statuses']}, {sent['stored']} new events); "
          f"emulator deliveries {outcome['emulator_deliveries']['tries']} (answers "
          f"{outcome['emulator_deliveries']['answers']}); events pulled {outcome['events_pulled']}; "
          f"credits {outcome['credits']['paid_invoices']} paid, {outcome['credits']['transfers']} transfers; "
          f"hostile connections {outcome['hostile']['connections']} in {outcome['hostile']['runs']} runs")
    for name, ok in outcome["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name.replace('_', ' ')}")
    with open(OUT_JSON + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(OUT_JSON + ".tmp", OUT_JSON)
    rss = table.get("rss_kib", {}).get("slope_per_hour")
    title = (f"stark_challenge soak: {MINUTES:g} min at {RATE:g} webhooks/s, commit {m['commit']}; "
             f"resident memory after warm-up {rss:+.2f} MB/h" if rss is not None else "stark_challenge soak")
    with open(OUT_SVG, "w") as f:
        f.write(svg_plot(samples, starts[1:], title))
    print(f"\nwritten: {OUT_JSON}, {OUT_SVG}")
    return 0 if all(outcome["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
