"""App: the service's objects, wired together, started and stopped in order; it answers nothing itself.

Built from a Config, a configured Bank and an open Store. What the HTTP routes answer is
``gate``'s (the decisions) and ``console``'s (the service's own pages, the retry). ``start()`` binds the
port first (OSError if taken); only once the port listens is the schedule's window
recorded (``scheduler.open_window``), so a start that fails opens no 24 h window;
then requests are answered and the worker and the schedule start. ``stop()`` drains them all,
bounded by ``SHUTDOWN_TIMEOUT_S`` each, and closes the store.
"""

import logging
import threading

from . import __version__, memory, metrics, report
from .console import Console
from .errors import StoreError
from .gate import Gate
from .invoicer import Invoicer
from .retention import Retention
from .scheduler import Schedule, open_window
from .server import Server
from .sqlite_db import CACHE_KIB
from .timing import utcnow
from .verify import Signatures
from .worker import IDLE_WAKE_S, Worker

__all__ = ["App", "SHUTDOWN_TIMEOUT_S"]

logger = logging.getLogger("stark_challenge")

SHUTDOWN_TIMEOUT_S = 5.0


class App:
    """The service: HTTP server, worker and schedule over one store. See the module docstring.

    ``console`` holds the service's own pages (health, status, metrics) and the operator's
    retry; ``signatures`` the webhook signature checks, with Stark Bank's key fetched by ``bank``.
    """

    def __init__(self, config, bank, store, signatures=None):
        self.config, self.bank, self.store = config, bank, store
        self.signatures = signatures or Signatures(bank.fetch_public_key)
        self.counters = metrics.Counters()  # the process's own counts, for GET /metrics
        figures = None  # GET /debug/memory, only when DEBUG_MEMORY asks for it
        if config.debug_memory != "off":
            if config.debug_memory == "trace":
                memory.start_tracing()
            figures = memory.Figures(cache_kib=CACHE_KIB, backend=store.backend).read
        # With other instances on the database, look for their abandoned claims at least twice per lease.
        idle_s = min(IDLE_WAKE_S, config.lease_s / 2) if store.backend == "postgres" else IDLE_WAKE_S
        self.worker = Worker(store, bank, config.instance_tag, config.event_poll_interval_s, counters=self.counters,
                             reconcile_interval_s=config.reconcile_interval_s,
                             reconcile_after_s=config.reconcile_after_s, alarm_after_s=config.alarm_after_s,
                             lease_s=config.lease_s, idle_s=idle_s,
                             retention=Retention(store, config.event_retention_s, utcnow))
        self.worker_started = threading.Event()  # set by start() once the worker thread runs
        self.schedule = None  # built by start(), once the service listens
        self.server = None
        self.console = Console(store, bank, self.signatures, self.worker, self.counters, config.instance_tag,
                               schedule=lambda: self.schedule, worker_started=self.worker_started)
        self.gate = Gate(store, self.signatures, config, clock=utcnow, on_event=self.worker.wake,
                         health=self.console.health, report=self.console.status_page, counters=self.counters,
                         metrics_page=self.console.metrics_page, retry=self.console.retry,
                         replay=self.console.replay, readiness=self.console.readiness, memory_page=figures)

    def healthy(self):
        """Return True if the store answers and the worker and HTTP threads run (the watchdog's test).

        A PostgreSQL server that is away does not count: a restart of this process would
        not bring it back, and the store connects again on its own once it is back.
        """
        serving = self.server is None or self.server.alive()
        store_ok = self.store.backend == "postgres" or self.store.ping()
        return serving and store_ok and self.worker.state()["alive"]

    def status_line(self):
        """Return the one-line status for systemd (STATUS=), or why it cannot be read now."""
        try:
            return report.one_line(self.console.status_report())
        except StoreError as e:
            return f"database unavailable: {e}"

    def start(self, before_rounds=None):
        """Bind the port, record the window, start the worker and the schedule. Raise OSError if the port is taken.

        ``before_rounds(port)``, if given, is called once the port listens and before the
        schedule starts (the try-it registers its webhook there, so round 0 is pushed).
        """
        c = self.config
        # Bound and listening (connections wait in the backlog) before the window is recorded;
        # answering starts once the schedule exists, so /status always shows it.
        self.server = Server((c.host, c.port), self.gate, c.max_connections, c.request_timeout_s)
        self.schedule = self._schedule()
        self.server.start()
        # Two lines, so that each fits 120 columns (the database's location aside; a URL's password hidden).
        logger.info("stark_challenge %s (%s), database %s", __version__, c.environment, self.store.name)
        logger.info("listening on %s:%d, signatures verified by %s", c.host, self.server.port, self.signatures.name)
        self.worker.start()
        self.worker_started.set()
        if before_rounds is not None:
            before_rounds(self.server.port)
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
