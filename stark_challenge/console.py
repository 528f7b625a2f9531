"""Console: what the service tells about itself, and the operator's retry: the bodies behind the gate's routes.

``health`` for ``GET /health`` (a status word, for anyone), ``readiness`` for ``GET /readyz``
(the database and Stark Bank's key, for anyone; it may fetch the key); ``status_page`` for
``GET /status`` and ``metrics_page`` for ``GET /metrics`` (the money summary, the live
details and the same numbers for Prometheus); ``retry`` for ``POST /transfers/retry`` and
``replay`` for ``POST /events/replay``. Who may ask, and the HTTP status of each
answer, are the gate's; this module reads the store and the running parts, queues a retry
through ``resend`` and replays an event through ``replay``. It opens no socket
and starts no thread. Thread-safe: retries run one at a time, the rest only reads.
"""

import threading
from http import HTTPStatus

from . import __version__, metrics, replay, report, resend
from .errors import BankUnavailable
from .timing import utcnow

__all__ = ["Console"]


class Console:
    """The service's own pages over one store, its worker and its signature checks.

    ``schedule`` is ``() -> scheduler.Schedule or None`` (None until the service starts
    it); ``worker_started`` an Event set once the worker thread runs; ``counters`` the
    process's ``metrics.Counters``; ``signatures`` the ``verify.Signatures`` in use.
    """

    def __init__(self, store, bank, signatures, worker, counters, instance_tag, schedule, worker_started,
                 clock=utcnow):
        self._store, self._bank, self._signatures = store, bank, signatures
        self._worker, self._counters = worker, counters
        self._instance_tag = instance_tag
        self._schedule = schedule
        self._worker_started = worker_started
        self._clock = clock  # () -> aware UTC datetime
        self._retry_lock = threading.Lock()  # one operator retry at a time (the store's key is the guarantee)

    def health(self):
        """Return (HTTPStatus, body) for GET /health: the status word only, for anyone who asks.

        ``degraded`` (503) when the store does not answer or the worker thread is dead;
        ``starting`` (200: webhooks are already taken) until the worker's first pass is
        over; ``ok`` (200) otherwise. The details are in ``details()``, for operators.
        """
        if not self._store.ping():
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if not self._worker_started.is_set():  # the port is bound a moment before the worker starts
            return HTTPStatus.OK, {"status": "starting"}
        if not self._worker.state()["alive"]:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if self._worker.last_pass_at is None:
            return HTTPStatus.OK, {"status": "starting"}
        return HTTPStatus.OK, {"status": "ok"}

    def readiness(self):
        """Return (HTTPStatus, body) for GET /readyz: 200 ``ready`` when the store answers and Stark Bank's
        public key is at hand (the webhook's signature check needs it), else 503 naming each as ``ok`` or
        ``unavailable``.

        With no key cached yet, it is fetched here (``KeyCache.get``: at most one attempt per
        its retry period, whatever the number of probes).
        """
        store_ok = self._store.ping()
        try:
            key_ok = self._signatures.keys.get() is not None
        except BankUnavailable:
            key_ok = False
        if store_ok and key_ok:
            return HTTPStatus.OK, {"status": "ready"}
        return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "not ready", "database": "ok" if store_ok else "unavailable",
                                                "public_key": "ok" if key_ok else "unavailable"}

    def details(self):
        """Return the service's live details (version, store, scheduler, worker, verifier, key fetches) as a dict."""
        store_ok = self._store.ping()
        schedule = self._schedule()
        return {
            "version": __version__,
            "store": "ok" if store_ok else "unavailable",
            "scheduler": (schedule.state() if schedule is not None else {"state": "not started"}) if store_ok else None,
            "worker": self._worker.state(),
            "verifier": self._signatures.name,
            "public_key_fetches": self._signatures.keys.fetches,
        }

    def status_report(self):
        """Return the status report dict (sd_notify STATUS=, and the body of GET /status with ``service``)."""
        return report.build(self._store.summary(), self._clock())

    def status_page(self):
        """Return GET /status's body: the status report, and the live details under ``service``."""
        return {**self.status_report(), "service": self.details()}

    def metrics_page(self):
        """Return GET /metrics's body: the Prometheus text exposition of the store's and the process's numbers."""
        families = metrics.service_families(
            self.status_report(), self._store.credit_outcomes(), self._counters, self._signatures.keys.fetches,
            self._worker.last_pass_at, __version__, self._signatures.name)
        return metrics.exposition(families + metrics.process_families())

    def retry(self, invoice_id):
        """Queue one more transfer attempt for a stuck credit (``resend.retry``); return its Outcome.

        The worker is woken to send what was queued. Raise BankUnavailable if Stark Bank does not answer.
        """
        with self._retry_lock:
            outcome = resend.retry(self._store, self._bank, self._instance_tag, invoice_id, self._clock())
        if outcome.code == "queued":
            self._worker.wake()
        return outcome

    def replay(self, event_id):
        """Fetch event ``event_id`` from Stark Bank and accept it as a pull would (``replay.replay``); return its Outcome.

        A new event wakes the worker. Raise BankUnavailable if Stark Bank does not answer.
        """
        return replay.replay(self._store, self._bank, event_id, self._clock(), on_new=self._worker.wake)
