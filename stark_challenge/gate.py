"""Gate: the front door's policy: what each request may do and the status it gets; no sockets, no bytes.

``Gate.admit`` is the one entry point: it takes a complete ``wire.Request`` (framing
already checked by ``wire.read_head``) and returns the ``Reply``, or, when the caller
may not wait (the HTTP selector thread), either the Reply if it could be decided
without waiting or a callable that finishes deciding, for a thread that may wait. So
every check and its answer can be read, and tested, in this one module.

The routes (``ROUTES``, the one routing table, and the one place that says which
methods exist): ``POST /webhook``, Stark Bank's events; ``GET /health``, the status word
only, for probes; ``GET /livez`` (the process answers) and ``GET /readyz`` (the database
answers and Stark Bank's key is at hand), for an orchestrator's probes; ``GET /status``, the money summary and the service's details, and
``GET /metrics``, the same numbers for Prometheus (text); ``POST /transfers/retry``
(``{"invoice_id": ...}``), an operator's retry of a stuck transfer (``resend``);
``POST /events/replay`` (``{"event_id": ...}``), an operator's replay of an event from
Stark Bank (``replay``). The last four are the operator's: behind the operator's basic auth
(``OPERATOR_USERNAME``/``OPERATOR_PASSWORD``), never the webhook's, and 404 when that
pair is not configured. ``GET /debug/memory``, the process's memory figures (``memory``), is
the operator's too, and exists only when ``DEBUG_MEMORY`` is on. Any other path is 404, another known method on a known path
405 (with ``Allow``), a method outside ``METHODS`` 501 and the connection closed. Every
answer is JSON, except the metrics.

The checks of a webhook, cheapest first, and the answer each failure gets:

====================================================  ========================
check                                                 failure
====================================================  ========================
framing (``wire.read_head``, before the body is       400 / 431 / 413 and the
read): head at most 16 KiB and 64 lines, one          connection closed
Content-Length of ASCII digits (at most
``wire.MAX_BODY_BYTES``), no Transfer-Encoding
basic auth, when configured (constant-time compare)   401 + WWW-Authenticate
Content-Length present                                411
``Digital-Signature`` header present                  401
body is UTF-8                                         400
signature matches the exact raw body (``verify``)     401
Stark Bank's key cannot be fetched                    503 (Stark Bank retries)
body is JSON, nested less than the parser's depth,    400
and an event of the expected shape
the store cannot write                                503 (Stark Bank retries)
====================================================  ========================

Only then: 200. The event is committed to the store (``events.accept``) before the
answer, so an acknowledged event is never lost; a redelivered one is answered 200
and not stored again. Processing happens later, from the store (``worker``).

Without waiting (``admit(request, may_wait=False)``) only webhooks are decided, only
with a cheap verifier, and only as far as nothing waits: Stark Bank's key cached
and no refetch of it due (``verify.Signatures.check``), a refused webhook gets its
Reply there; one that passes every check, its signature included, gets a callable that
only stores its event. Anything else gets a callable that decides it whole. Either
way each check runs once, with the same counts and log lines.

Refusals are logged through one ``logs.Throttle`` (``Gate.refusals``, which the
server's own refusals share): the first of each kind, then at most one a second
with the count held back, so a flood of forged requests is not also a flood of log
lines. Thread-safe.
"""

import base64
import binascii
import contextlib
import functools
import hmac
import json
import logging
import threading
import time
from http import HTTPStatus
from typing import NamedTuple

from . import events, metrics
from .errors import BankUnavailable, SignatureError, StarkChallengeError
from .logs import Throttle

__all__ = ["Gate", "Reply", "check_basic_auth", "METHODS", "ROUTES"]

logger = logging.getLogger(__name__)

# path -> {method: the Gate method that answers it}
ROUTES = {
    "/webhook": {"POST": "webhook"},
    "/health": {"GET": "health", "HEAD": "health"},
    "/livez": {"GET": "livez", "HEAD": "livez"},
    "/readyz": {"GET": "readyz", "HEAD": "readyz"},
    "/status": {"GET": "status", "HEAD": "status"},
    "/metrics": {"GET": "metrics", "HEAD": "metrics"},
    "/transfers/retry": {"POST": "retry"},
    "/events/replay": {"POST": "replay"},
    "/debug/memory": {"GET": "debug_memory"},
}
# The routes behind the operator's credentials, which do not exist without them.
OPERATOR_ROUTES = frozenset({"/status", "/metrics", "/transfers/retry", "/events/replay", "/debug/memory"})
# Methods answered 404 or 405; any other is 501, as http.server answers a method it has no do_ for.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

# The longest id a retry or replay request may name (Stark Bank's ids are about 16 digits).
MAX_ID = 64
# The realms of the two credentials, so that a browser keeps them apart.
WEBHOOK_REALM = "stark_challenge"
OPERATOR_REALM = "stark_challenge operator"


class Reply(NamedTuple):
    """What to answer: an HTTP status, a JSON-able body, extra headers, and whether to close the connection."""

    status: HTTPStatus
    body: object  # a JSON-able dict, or text (str) sent as it is with the Content-Type in headers
    headers: tuple = ()
    close: bool = False  # close the connection after this answer, whatever the request asked


def _error(status, message, headers=(), close=False):
    return Reply(status, {"error": message}, headers, close)


def check_basic_auth(header, username, password):
    """Return True if the Authorization ``header`` carries exactly these basic-auth credentials.

    Compares in constant time (both fields always compared), so the answer's timing
    does not tell how much of a guess was right.
    """
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_password = decoded.partition(b":")
    user_ok = hmac.compare_digest(given_user, username.encode("utf-8"))
    password_ok = hmac.compare_digest(given_password, password.encode("utf-8"))
    return bool(sep) & user_ok & password_ok


class Gate:
    """Decides every request: its route, its checks, and the Reply. Collaborators come in through the constructor.

    ``signatures`` is the ``verify.Signatures`` that judges a Digital-Signature;
    ``on_event`` is called after a new event is stored. The operator's pages come from
    ``health`` (``() -> (HTTPStatus, dict)``, ``GET /health``), ``report`` (``() -> dict``,
    ``GET /status``), ``metrics_page`` (``() -> str``, ``GET /metrics``), ``retry``
    (``(invoice_id) -> resend.Outcome``, ``POST /transfers/retry``) and ``replay``
    (``(event_id) -> replay.Outcome``, ``POST /events/replay``): ``console.Console``'s, as is
    ``readiness`` (``() -> (HTTPStatus, dict)``, ``GET /readyz``); ``memory_page`` (``() -> dict``,
    ``GET /debug/memory``) is ``memory.Figures.read``, None (the default) to leave that route 404.
    ``counters`` (``metrics.Counters``) counts webhooks by outcome and signature verdicts.
    """

    def __init__(self, store, signatures, config, clock, on_event=None, health=None, report=None, counters=None,
                 metrics_page=None, retry=None, replay=None, readiness=None, memory_page=None):
        self._store = store
        self._signatures = signatures
        self._webhook_auth = (config.webhook_username, config.webhook_password)
        self._operator_auth = (config.operator_username, config.operator_password)
        self._clock = clock  # () -> aware UTC datetime
        self._on_event = on_event
        self._health = health or (lambda: (HTTPStatus.OK, {"status": "ok"}))
        self._readiness = readiness or (lambda: (HTTPStatus.OK, {"status": "ready"}))
        self._report = report or dict
        self.counters = counters or metrics.Counters()
        self._metrics_page = metrics_page or str
        self._retry = retry
        self._replay = replay
        self._memory_page = memory_page  # None: DEBUG_MEMORY is off and the route answers 404
        self.refusals = Throttle()  # refusal lines: the first of a kind, then at most one a second
        self._receiving = 0  # webhooks being verified or stored: each may be an event about to be stored
        self._receiving_lock = threading.Lock()

    def admit(self, request, may_wait=True):
        """Return the Reply to a complete ``request`` (``wire.Request``).

        ``may_wait`` False (the HTTP selector thread): return the Reply only if it is
        decided without waiting (a webhook refused, with a cheap verifier and the key
        cached); otherwise return a callable, ``() -> Reply``, that finishes the decision
        in a thread that may wait, without repeating a check already made.
        """
        path = request.path.split("?", 1)[0]
        allowed = ROUTES.get(path)
        if request.method not in METHODS:
            # Closed after: what follows a request the gate cannot read cannot be trusted.
            decide = functools.partial(self.refuse, HTTPStatus.NOT_IMPLEMENTED,
                                       f"Unsupported method ({request.method!r})", "request", request.client,
                                       close=True, kind="unsupported method")
        elif allowed is None or (path in OPERATOR_ROUTES and not all(self._operator_auth)):
            decide = functools.partial(_error, HTTPStatus.NOT_FOUND, "not found")
        elif request.method not in allowed:
            decide = functools.partial(_error, HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed",
                                       (("Allow", ", ".join(allowed)),))
        elif allowed[request.method] == "webhook":
            return self._timed(self._webhook(request, may_wait), time.monotonic())
        else:
            decide = functools.partial(getattr(self, allowed[request.method]), request)
        return decide() if may_wait else decide

    def _timed(self, decided, began):
        """Return ``decided`` (a webhook's Reply, or a callable that finishes it), counting in the webhook
        latency histogram the seconds from ``began`` (monotonic) until its Reply exists."""
        if callable(decided):  # a Reply is a tuple, never callable
            return lambda: self._timed(decided(), began)
        self.counters.observe(metrics.WEBHOOK_SECONDS, time.monotonic() - began)
        return decided

    def refuse(self, status, reason, what, client, headers=(), close=False, kind=None):
        """Log a refusal (throttled by ``kind``, a fixed text; default ``reason``) and return its Reply."""
        self.refusals.log(logger, logging.WARNING, "%s refused (%d): %s from %s", what, status, reason, client,
                          kind=kind or reason)
        return _error(status, reason, headers, close)

    # -- the routes ------------------------------------------------------------

    def health(self, request):
        """GET /health: the status word, for anyone who asks."""
        status, payload = self._health()
        return Reply(status, payload)

    def livez(self, request):
        """GET /livez: 200 whenever the process answers HTTP at all (a liveness probe restarts it otherwise)."""
        return Reply(HTTPStatus.OK, {"status": "alive"})

    def readyz(self, request):
        """GET /readyz: 200 when webhooks can be taken (database and Stark Bank's key), 503 naming what is not."""
        status, payload = self._readiness()
        return Reply(status, payload)

    def status(self, request):
        """GET /status: the report, behind the operator's basic auth."""
        return self._operator_denied(request, "status") or Reply(HTTPStatus.OK, self._report())

    def metrics(self, request):
        """GET /metrics: the Prometheus text exposition, behind the operator's basic auth."""
        return self._operator_denied(request, "metrics") or Reply(
            HTTPStatus.OK, self._metrics_page(), (("Content-Type", metrics.CONTENT_TYPE),))

    def retry(self, request):
        """POST /transfers/retry: ``{"invoice_id": "..."}``, an operator's retry (``resend.retry``).

        Behind the operator's basic auth. 200 queued, resent (the same external id sent
        or looked up again) or recorded, 409 refused (the state is named), 404 no
        transfer for that invoice, 400 a malformed body, 503 if
        Stark Bank does not answer (nothing queued).
        """
        return self._operator_call(request, "retry", "invoice_id", self._retry, "nothing queued",
                                   {"refused": HTTPStatus.CONFLICT, "unknown": HTTPStatus.NOT_FOUND})

    def debug_memory(self, request):
        """GET /debug/memory: the memory figures, behind the operator's basic auth; 404 unless DEBUG_MEMORY is on."""
        if self._memory_page is None:
            return _error(HTTPStatus.NOT_FOUND, "not found")
        return self._operator_denied(request, "debug") or Reply(HTTPStatus.OK, self._memory_page())

    def replay(self, request):
        """POST /events/replay: ``{"event_id": "..."}``, an operator's replay (``replay.replay``).

        Behind the operator's basic auth. 200 stored or duplicate, 404 Stark Bank has no
        such event for us, 422 its copy is malformed, 400 a malformed body, 503 if Stark
        Bank does not answer (nothing stored).
        """
        return self._operator_call(request, "replay", "event_id", self._replay, "nothing stored",
                                   {"unknown": HTTPStatus.NOT_FOUND, "invalid": HTTPStatus.UNPROCESSABLE_ENTITY})

    def _operator_call(self, request, what, field, call, nothing, statuses):
        """Run ``call(id)`` for the id in the body's ``field``; return its Outcome as a Reply (``statuses`` by code).

        Behind the operator's basic auth; an id is Stark Bank's: digits, at most ``MAX_ID``.
        A Gate built without ``call`` has no such route (404).
        """
        if call is None:
            return _error(HTTPStatus.NOT_FOUND, "not found")
        denied = self._operator_denied(request, what)
        if denied is not None:
            return denied
        try:
            given = json.loads(request.body or b"")[field]
        except (ValueError, KeyError, TypeError, RecursionError):
            given = None
        if not (isinstance(given, str) and 0 < len(given) <= MAX_ID and given.isascii() and given.isdigit()):
            return _error(HTTPStatus.BAD_REQUEST, f'expected {{"{field}": "<digits>"}}')
        try:
            outcome = call(given)
        except BankUnavailable as e:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"Stark Bank did not answer, {nothing}: {e}")
        return Reply(statuses.get(outcome.code, HTTPStatus.OK), {"outcome": outcome.code, "message": outcome.message})

    def _webhook(self, request, may_wait):
        """POST /webhook: every check in order, then the event stored; see ``admit`` for ``may_wait``."""
        if not (may_wait or self._signatures.cheap):  # the selector thread decides webhooks only when checks are cheap
            return functools.partial(self._webhook, request, True)
        refused, content = self._webhook_refused(request)
        if refused is not None:
            return refused
        signature = request.headers.get("Digital-Signature")
        if may_wait:
            return self._receive(content, signature)
        began = time.thread_time()
        try:
            signs = self._signatures.check(content, signature, may_wait=False)
        except SignatureError as e:
            return self._bad_signature(e, began)
        if signs is None:  # only a check that may wait can tell
            return functools.partial(self._receive, content, signature)
        self._count_check("valid", began)
        return functools.partial(self._receive, content, None)

    def _webhook_refused(self, request):
        """Check a webhook's basic auth, length, signature header and encoding.

        Return (None, the body as text) if they pass, else (the Reply refusing it, None).
        """
        headers = request.headers
        if all(self._webhook_auth) and not check_basic_auth(headers.get("Authorization"), *self._webhook_auth):
            self.refusals.log(logger, logging.WARNING, "webhook refused: bad or missing basic auth from %s",
                              request.client)
            self._count_webhook("refused", "auth")
            return _error(HTTPStatus.UNAUTHORIZED, "authentication required", _challenge(WEBHOOK_REALM)), None
        if request.body is None:
            self._count_webhook("refused", "length_required")
            return self.refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required", "POST /webhook",
                               request.client), None
        if not headers.get("Digital-Signature"):
            self.refusals.log(logger, logging.WARNING, "webhook refused: no Digital-Signature header")
            self._count_webhook("refused", "no_signature")
            return _error(HTTPStatus.UNAUTHORIZED, "missing Digital-Signature header"), None
        try:
            return None, request.body.decode("utf-8")
        except UnicodeDecodeError:
            self.refusals.log(logger, logging.WARNING, "webhook refused: body is not UTF-8")
            self._count_webhook("refused", "not_utf8")
            return _error(HTTPStatus.BAD_REQUEST, "body is not UTF-8"), None

    def _operator_denied(self, request, what):
        """Return the 401 Reply if the request lacks the operator's credentials, else None."""
        if check_basic_auth(request.headers.get("Authorization"), *self._operator_auth):
            return None
        self.refusals.log(logger, logging.WARNING, "%s refused: bad or missing basic auth from %s", what,
                          request.client)
        return _error(HTTPStatus.UNAUTHORIZED, "authentication required", _challenge(OPERATOR_REALM))

    # -- a webhook's signature and event ---------------------------------------

    def _receive(self, content, signature):
        """Check ``signature`` over ``content`` (None: already checked), then store the event; return the Reply.

        Counts the webhooks being received at once: an event's commit waits briefly for
        theirs (``Store.add_event``), so concurrent webhooks share one fsync.
        """
        with self._counted_receiving():
            if signature is not None:
                began = time.thread_time()
                try:
                    self._signatures.check(content, signature)
                except SignatureError as e:
                    return self._bad_signature(e, began)
                except BankUnavailable as e:
                    self.refusals.log(logger, logging.WARNING,
                                      "webhook not verified, Stark Bank's key is unavailable (%s); answering 503", e)
                    self._count_webhook("unavailable", "public_key")
                    return _error(HTTPStatus.SERVICE_UNAVAILABLE,
                                  "cannot verify the signature now; deliver again later")
                self._count_check("valid", began)
            return self._store_event(content)

    @contextlib.contextmanager
    def _counted_receiving(self):
        with self._receiving_lock:
            self._receiving += 1
        try:
            yield
        finally:
            with self._receiving_lock:
                self._receiving -= 1

    def _count_check(self, verdict, began):
        """Count a signature check by verdict, and the CPU it took this thread since ``began`` (thread time)."""
        labels = (("verdict", verdict),)
        self.counters.add("stark_challenge_signature_verifications_total", labels)
        self.counters.add("stark_challenge_signature_check_cpu_seconds_total", labels, time.thread_time() - began)

    def _count_webhook(self, outcome, reason=""):
        labels = (("outcome", outcome), ("reason", reason)) if reason else (("outcome", outcome),)
        self.counters.add("stark_challenge_webhooks_total", labels)

    def _bad_signature(self, error, began):
        """Count and log a signature that is not Stark Bank's (``error``: the SignatureError); return the 401."""
        self._count_check("invalid", began)
        self.refusals.log(logger, logging.WARNING, "webhook refused: %s", error, kind=str(error))
        self._count_webhook("refused", "bad_signature")
        return _error(HTTPStatus.UNAUTHORIZED, "invalid Digital-Signature")

    def _store_event(self, content):
        """Store the event of a webhook whose signature is Stark Bank's (``content``: its body); return the Reply."""
        try:
            event = events.check_shape(json.loads(content))
        except ValueError as e:  # json.JSONDecodeError is a ValueError; so is an int of too many digits
            self.refusals.log(logger, logging.WARNING, "webhook refused: signed but malformed (%s)", e,
                              kind="malformed")
            self._count_webhook("refused", "malformed")
            return _error(HTTPStatus.BAD_REQUEST, f"malformed event: {e}")
        except RecursionError:  # json's C scanner recurses once per nested [ or {
            self.refusals.log(logger, logging.WARNING, "webhook refused: signed but nested too deeply")
            self._count_webhook("refused", "malformed")
            return _error(HTTPStatus.BAD_REQUEST, "malformed event: nested too deeply")
        try:
            new = events.accept(self._store, event, "webhook", self._clock(), self._on_event,
                                coming=self._receiving - 1)
        except StarkChallengeError as e:
            logger.error("webhook %s not stored: %s; answering 503", event.id, e)
            self._count_webhook("unavailable", "store")
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "cannot store the event now; deliver again later")
        self._count_webhook("stored" if new else "duplicate")
        return Reply(HTTPStatus.OK, {"status": "stored" if new else "duplicate", "event": event.id})


def _challenge(realm):
    return (("WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"'),)
