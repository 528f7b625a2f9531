"""App: the service's objects, wired together, started and stopped in order.

Built from a Config, a configured Bank and an open Store. ``start()`` binds the
port first (OSError if taken); only once the port listens is the schedule's window
recorded (``scheduler.open_window``), so a start that fails opens no 24 h window;
then requests are answered and the worker and the schedule start. ``stop()`` drains them all,
bounded by ``SHUTDOWN_TIMEOUT_S`` each, and closes the store.
"""

import logging
import threading
from http import HTTPStatus

from . import __version__, memory, metrics, report, resend
from .gate import Gate
from .invoicer import Invoicer
from .retention import Retention
from .scheduler import Schedule, open_window
from .server import Server
from .store import CACHE_KIB
from .timing import utcnow
from .worker import Worker

__all__ = ["App", "SHUTDOWN_TIMEOUT_S"]

logger = logging.getLogger("stark_challenge")

SHUTDOWN_TIMEOUT_S = 5.0


class App:
    """The service: HTTP server, worker and schedule over one store. See the module docstring."""

    def __init__(self, config, bank, store):
        self.config, self.bank, self.store = config, bank, store
        self.counters = metrics.Counters()  # the process's own counts, for GET /metrics
        figures = None  # GET /debug/memory, only when DEBUG_MEMORY asks for it
        if config.debug_memory != "off":
            if config.debug_memory == "trace":
                memory.start_tracing()
            figures = memory.Figures(cache_kib=CACHE_KIB).read
        self.worker = Worker(store, bank, config.instance_tag, config.event_poll_interval_s, counters=self.counters,
                             retention=Retention(store, config.event_retention_s, utcnow))
        self.gate = Gate(store, bank, config, clock=utcnow, on_event=self.worker.wake,
                         health=self.health, report=self.status_page, counters=self.counters,
                         metrics_page=self.metrics_page, retry=self.retry_transfer, memory_page=figures)
        self._retry_lock = threading.Lock()  # one operator retry at a time (the store's key is the guarantee)
        self.schedule = None  # built by start(), once the service listens
        self.server = None
        self.worker_started = threading.Event()  # set by start() once the worker thread runs

    def health(self):
        """Return (HTTPStatus, body) for GET /health: the status word only, for anyone who asks.

        ``degraded`` (503) when the store does not answer or the worker thread is dead;
        ``starting`` (200: webhooks are already taken) until the worker's first pass is
        over; ``ok`` (200) otherwise. The details are in ``details()``, behind basic auth.
        """
        if not self.store.ping():
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if not self.worker_started.is_set():  # the port is bound a moment before the worker starts
            return HTTPStatus.OK, {"status": "starting"}
        if not self.worker.state()["alive"]:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if self.worker.last_pass_at is None:
            return HTTPStatus.OK, {"status": "starting"}
        return HTTPStatus.OK, {"status": "ok"}

    def details(self):
        """Return the service's live details (version, store, scheduler, worker, verifier, key fetches) as a dict."""
        store_ok = self.store.ping()
        schedule = self.schedule.state() if self.schedule is not None else {"state": "not started"}
        return {
            "version": __version__,
            "store": "ok" if store_ok else "unavailable",
            "scheduler": schedule if store_ok else None,
            "worker": self.worker.state(),
            "verifier": self.bank.verifier,
            "public_key_fetches": self.bank.keys.fetches,
        }

    def status_report(self):
        """Return the status report dict (sd_notify STATUS=, and the body of GET /status with ``service``)."""
        return report.build(self.store.summary(), utcnow())

    def status_page(self):
        """Return GET /status's body: the status report, and the live details under ``service``."""
        return {**self.status_report(), "service": self.details()}

    def metrics_page(self):
        """Return GET /metrics's body: the Prometheus text exposition of the store's and the process's numbers."""
        families = metrics.service_families(
            self.status_report(), self.store.credit_outcomes(), self.counters, self.bank.keys.fetches,
            self.worker.last_pass_at, __version__, self.bank.verifier)
        return metrics.exposition(families)

    def retry_transfer(self, invoice_id):
        """Queue one more transfer attempt for a stuck credit (``resend.retry``); return its Outcome.

        The worker is woken to send what was queued. Raise BankUnavailable if Stark Bank does not answer.
        """
        with self._retry_lock:
            outcome = resend.retry(self.store, self.bank, self.config.instance_tag, invoice_id, utcnow())
        if outcome.code == "queued":
            self.worker.wake()
        return outcome

    def healthy(self):
        """Return True if the store answers and the worker and HTTP threads run (the watchdog's test)."""
        serving = self.server is None or self.server.alive()
        return serving and self.store.ping() and self.worker.state()["alive"]

    def start(self):
        """Bind the port, record the window, start the worker and the schedule. Raise OSError if the port is taken."""
        c = self.config
        # Bound and listening (connections wait in the backlog) before the window is recorded;
        # answering starts once the schedule exists, so /status always shows it.
        self.server = Server((c.host, c.port), self.gate, c.max_connections, c.request_timeout_s)
        self.schedule = self._schedule()
        self.server.start()
        logger.info("stark_challenge %s listening on %s:%d (%s, database %s, signatures verified by %s)",
                    __version__, c.host, self.server.port, c.environment, c.database_path, self.bank.verifier)
        self.worker.start()
        self.worker_started.set()
        self.schedule.start()

    def _schedule(self):
        """Record (or read back) the window, and return the Schedule whose rounds the Invoicer issues."""
        c = self.config
        window = open_window(self.store, c.invoice_interval_s, c.invoice_duration_s, utcnow)
        done = [r for r in self.store.rounds() if r.state in ("issued", "failed")]
        if done:
            logger.info("recovery: resuming the schedule started %s (%d of its rounds already settled)",
                        window["started_at"].isoformat(timespec="seconds"), len(done))
        invoicer = Invoicer(self.bank, self.store, c, window["schedule_id"], clock=utcnow,
                            retry_base_s=min(30.0, window["interval_s"] / 10))
        return Schedule(self.store, invoicer.issue_round, c.invoice_interval_s, c.invoice_duration_s,
                        clock=utcnow, window=window)

    def stop(self):
        """Stop accepting, finish in-flight work, close the store."""
        # Ask the worker and the schedule first, so that they finish their current item
        # while the server drains its requests; then wait for each (bounded).
        self.worker.stop(timeout=0)
        if self.schedule is not None:
            self.schedule.stop(timeout=0)
        if self.server is not None:
            self.server.stop(SHUTDOWN_TIMEOUT_S)
        if self.schedule is not None:
            self.schedule.stop(SHUTDOWN_TIMEOUT_S)
        self.worker.stop(SHUTDOWN_TIMEOUT_S)
        self.store.close()
