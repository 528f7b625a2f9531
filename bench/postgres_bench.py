"""Benchmark of the shared store: the webhook intake and the forwarding on PostgreSQL, one and two
instances, beside one instance on SQLite.

Not a test: ``make bench`` runs it after ``webhook_bench.py`` (``.venv/bin/python
bench/postgres_bench.py`` runs it alone) and writes its figures under ``postgres`` in ``bench/results.json``, leaving the other
keys as they are. For each setup (``sqlite_1``, ``postgres_1``, ``postgres_2``) it starts the
service as a user runs it (``python -m stark_challenge``, the native verifier when installed)
against the Stark Bank emulator, on a fresh database: a throwaway PostgreSQL server (Debian's
binaries, as the tests start it: ``tests/support/postgres.py``) or a SQLite file; a second
instance starts once round 0 is issued. Round 0 issues ``STEADY + CREDITS`` invoices, the
emulator pays them all, and their signed ``credited`` events are sent by ``bench/loadgen.py``,
shared out round robin between the instances (a load balancer's work); the benchmark stands in
for Stark Bank's courier, so every event counts as delivered at the emulator (a start-up pull
finds none). Two phases:

- ``steady``: the first ``STEADY`` credits at ``STEADY_RATE`` a second in all, on a fixed
  schedule (a realistic intake, far below saturation);
- then the other ``CREDITS`` as fast as answers come back, over ``CONNECTIONS`` keep-alive
  connections (saturation: the figures at the top level of each setup).

Figures of each phase:

- ``accepted_per_s``: webhooks answered 200 per second of the phase, all instances together;
- ``p50_ms``/``p99_ms``: their latency;
- ``credit_to_transfer_p50_ms``/``_p99_ms``: from each webhook's 200 to its transfer's
  ``created`` at the emulator;
- at saturation, ``service_cpu_s`` and ``database_cpu_s``: the CPU the instances and the
  PostgreSQL server (postmaster and backends, ``/proc``) used from the first webhook until
  every transfer was made, and both per accepted webhook.

Bounded: about a minute on a 2-core machine, loopback only; every process it starts is
stopped and its temporary files removed before it exits.
"""

import base64
import datetime
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time

import webhook_bench as wb  # the service, load generator and statistics of the main benchmark

sys.path.insert(0, os.path.join(wb.ROOT, "tests"))
from support.postgres import Cluster, find_bindir  # noqa: E402  (the tests' throwaway server)

from stark_challenge.emulator import Emulator  # noqa: E402
from stark_challenge.store import Store, StoreError  # noqa: E402

CREDITS = 1500  # credits sent as fast as answers come back, per setup
STEADY = 100  # credits sent first, at STEADY_RATE a second: a realistic intake, well below saturation
STEADY_RATE = 5.0
CONNECTIONS = 8  # keep-alive connections of the load, shared out between the instances
SETUPS = (("sqlite_1", "sqlite", 1), ("postgres_1", "postgres", 1), ("postgres_2", "postgres", 2))
TIMEOUT_S = 120.0


def wait(predicate, what, timeout=TIMEOUT_S, interval=0.05):
    return wb.wait(predicate, what, timeout, interval)


class Run:
    """One run: the emulator, the PostgreSQL server, the work directory; ``setup()`` measures one setup."""

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="stark-pgbench-")
        self.emulator = Emulator(pay_ratio=0.0, transfer_delay_s=0.5, invoice_fee=50, seed=8).start()
        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
        self.cluster = Cluster(bindir).start()
        self.services = []

    def close(self):
        for service in self.services:
            service.stop()
        self.emulator.stop()
        self.cluster.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self, location, count):
        """Start ``count`` instances of one deployment on ``location``; return them and the Authorization header."""
        project_id, private_key = self.emulator.create_project()
        password = secrets.token_urlsafe(18)
        env = {k: v for k, v in wb.clean_env().items() if not k.startswith(("STARK_", "WEBHOOK_", "INVOICE_",
                                                                             "DATABASE_"))}
        env.update(self.emulator.env(project_id, private_key))
        env.update({"HOST": "127.0.0.1", "LOG_FORMAT": "json", "LOG_LEVEL": "WARNING",
                    "INSTANCE_TAG": wb.INSTANCE_TAG, "WEBHOOK_USERNAME": "stark", "WEBHOOK_PASSWORD": password,
                    "INVOICE_INTERVAL": "24h", "INVOICE_DURATION": "0", "INVOICE_MIN": str(STEADY + CREDITS),
                    "INVOICE_MAX": str(STEADY + CREDITS), "EVENT_POLL_INTERVAL": "1h", "BANK_TIMEOUT": "5s",
                    "DATABASE_URL" if location.startswith("postgresql://") else "DATABASE_PATH": location})
        services = []
        for k in range(count):
            if k == 1:
                # The benchmark delivers the events itself, standing in for Stark Bank's courier: the
                # events of round 0 count as delivered, so a later instance's start-up pull finds none.
                wait(lambda: _rounds(location) == ["issued"], "round 0")
                self.emulator.mark_delivered([e["id"] for e in self.emulator.events()])
            service = wb.Service({**env, "PORT": str(wb.free_port())},
                                 os.path.join(self.workdir, f"{len(self.services)}.log"))
            service.pure = False
            service.start(timeout=60)
            self.services.append(service)
            services.append(service)
            wait(lambda: b'"ok"' in wb.http_get(service.port, "/health")[1], "the first pass")
        auth = "Basic " + base64.b64encode(f"stark:{password}".encode()).decode()
        return services, auth

    def setup(self, name, backend, count):
        """Measure one setup; return its figures."""
        location = (self.cluster.new_url() if backend == "postgres"
                    else os.path.join(self.workdir, f"{name}.sqlite3"))
        before = {i["id"] for i in self.emulator.invoices()}
        services, auth = self._start(location, count)
        wait(lambda: _rounds(location) == ["issued"], f"{name}: round 0")
        ids = {i["id"] for i in self.emulator.invoices()} - before
        for invoice_id in ids:
            self.emulator.pay(invoice_id)
        events = [e for e in self.emulator.events() if e["subscription"] == "invoice"
                  and e["log"]["type"] == "credited" and e["log"]["invoice"]["id"] in ids]
        self.emulator.mark_delivered([e["id"] for e in self.emulator.events()])  # the benchmark delivers them
        requests = wb.Requests(self.emulator, auth, None)
        signed = [requests.signed(event) for event in events]

        steady = self._send(name + "-steady", services, events[:STEADY], signed[:STEADY], "rate")
        cpu0 = sum(wb.cpu_s(s.pid) for s in services)
        db0 = self.cluster.cpu_seconds()
        load = self._send(name, services, events[STEADY:], signed[STEADY:], "closed")
        cpu = sum(wb.cpu_s(s.pid) for s in services) - cpu0
        db = self.cluster.cpu_seconds() - db0 if backend == "postgres" else None
        for service in services:
            service.stop()
        acked = len(load["to_transfer"])
        figures = {
            "instances": count, "backend": backend, **{k: v for k, v in load.items() if k != "to_transfer"},
            "service_cpu_s": wb.rnd(cpu, 3), "service_cpu_ms_per_webhook": wb.rnd(cpu * 1000 / acked, 3),
            "database_cpu_s": wb.rnd(db, 3),
            "database_cpu_ms_per_webhook": None if db is None else wb.rnd(db * 1000 / acked, 3),
            "steady": {k: v for k, v in steady.items() if k != "to_transfer"},
        }
        print(f"  {name:<11} steady {STEADY_RATE:g}/s: p99 {steady['p99_ms']} ms  credit->transfer p50 "
              f"{steady['credit_to_transfer_p50_ms']} ms, p99 {steady['credit_to_transfer_p99_ms']} ms", flush=True)
        print(f"  {name:<11} {figures['accepted_per_s']:>7} accepted/s  p99 {figures['p99_ms']} ms  "
              f"credit->transfer p99 {figures['credit_to_transfer_p99_ms']} ms  service CPU "
              f"{figures['service_cpu_ms_per_webhook']} ms/webhook  database CPU "
              f"{figures['database_cpu_ms_per_webhook']} ms/webhook", flush=True)
        return figures

    def _send(self, name, services, events, signed, mode):
        """Send ``signed`` (the requests of ``events``) round robin to ``services``; wait for every transfer.

        ``mode``: "closed" (as fast as answers come back, ``CONNECTIONS`` shared out) or
        "rate" (``STEADY_RATE`` a second in all, on a fixed schedule). Return the figures:
        sent, accepted, accepted_per_s, p50_ms/p99_ms of the answers, and
        credit_to_transfer_p50_ms/_p99_ms (with ``to_transfer``, every one of them in ms).
        """
        count = len(services)
        shares = [list(range(k, len(signed), count)) for k in range(count)]  # round robin
        results = [None] * count
        options = ({"connections": max(1, CONNECTIONS // count)} if mode == "closed"
                   else {"connections": 2, "rate": STEADY_RATE / count})
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, wb.run_loadgen(
            self.workdir, f"{name}-{k}", [signed[i] for i in shares[k]], mode, services[k].port, **options)))
            for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        acked, latencies, first, last = {}, [], None, None
        for k, result in enumerate(results):
            for index, due, done, status, _ in result["results"]:
                if status == 200:
                    event = events[shares[k][index]]
                    acked[event["log"]["invoice"]["id"]] = result["wall0"] + (done - result["perf0"])
                latencies.append((done - due) * 1000)
            first = min(first or 1e18, min(r[1] for r in result["results"]) + result["wall0"] - result["perf0"])
            last = max(last or 0, max(r[2] for r in result["results"]) + result["wall0"] - result["perf0"])

        def transfers():
            found = {t["tags"][1].removeprefix("invoice-"): t for t in self.emulator.transfers()
                     if wb.INSTANCE_TAG in t["tags"]}
            return found if set(acked) <= set(found) else None

        found = wait(transfers, f"{name}: every credit's transfer", interval=0.1)
        created = {i: datetime.datetime.fromisoformat(found[i]["created"]).timestamp() for i in acked}
        to_transfer = [(created[i] - acked[i]) * 1000 for i in acked]
        return {"sent": len(latencies), "accepted": len(acked),
                "accepted_per_s": wb.rnd(len(acked) / (last - first), 1),
                "p50_ms": wb.rnd(wb.percentile(latencies, 50)), "p99_ms": wb.rnd(wb.percentile(latencies, 99)),
                "credit_to_transfer_p50_ms": wb.rnd(wb.percentile(to_transfer, 50)),
                "credit_to_transfer_p99_ms": wb.rnd(wb.percentile(to_transfer, 99)),
                "to_transfer": to_transfer}


def _rounds(location):
    try:
        reader = Store(location, read_only=True)
    except StoreError:  # not created yet
        return None
    try:
        return [r.state for r in reader.rounds()]
    except StoreError:  # the tables are being created
        return None
    finally:
        reader.close()


def main():
    print(f"PostgreSQL phase: {CREDITS} credits per setup, {CONNECTIONS} connections", flush=True)
    run = Run()
    try:
        figures = {name: run.setup(name, backend, count) for name, backend, count in SETUPS}
    finally:
        run.close()
    figures["machine"] = wb.machine()
    try:
        with open(wb.RESULTS) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    results["postgres"] = figures
    tmp = wb.RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, wb.RESULTS)
    print(f"written: {os.path.relpath(wb.RESULTS, wb.ROOT)} (postgres)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
