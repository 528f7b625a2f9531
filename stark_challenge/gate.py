"""Gate: every decision at the HTTP front door, and the status each one answers; no sockets here.

``server`` only transports: it hands the head of each request to ``read_head`` (its
framing, request line and fields, read once) and a complete request to
``Gate.screen`` (below) and then, unless decided there, to ``Gate.answer``, and
writes the ``Reply`` back. So every check
and its answer can be read, and tested, in this one module.

The routes (``ROUTES``, the one routing table): ``POST /webhook``, Stark Bank's events;
``GET /health``, the status word only, for probes; ``GET /status``, the money summary
and the service's details, and ``GET /metrics``, the same numbers for Prometheus (text),
both behind the webhook's basic auth; ``POST /transfers/retry`` (``{"invoice_id": ...}``),
an operator's retry of a stuck transfer (``resend``), only when basic auth is
configured (403 otherwise: it moves money). Any other path is 404, another method on a
known path 405 (with ``Allow``). ``GET /debug/memory``, the process's memory figures
(``memory``), exists only when ``DEBUG_MEMORY`` is on (404 otherwise), behind the same basic
auth. Every answer is JSON, except the metrics.

The checks of a webhook, cheapest first, and the answer each failure gets:

====================================================  ========================
check                                                 failure
====================================================  ========================
framing (``read_head``): head at most 16 KiB and 64   400 / 431 / 413 and the
lines, one Content-Length of ASCII digits (at most    connection closed, before
``MAX_BODY_BYTES``), no Transfer-Encoding, a          the body is read
well-formed request line
basic auth, when configured (constant-time compare)   401 + WWW-Authenticate
Content-Length present                                411
``Digital-Signature`` header present                  401
body is UTF-8                                         400
signature matches the exact raw body (``bank``)       401
Stark Bank's key cannot be fetched                    503 (Stark Bank retries)
body is JSON, nested less than the parser's depth,    400
and an event of the expected shape
the store cannot write                                503 (Stark Bank retries)
====================================================  ========================

Only then: 200. The event is committed to the store (``events.accept``) before the
answer, so an acknowledged event is never lost; a redelivered one is answered 200
and not stored again. Processing happens later, from the store (``worker``).
``GET /status`` takes the same basic auth. Thread-safe.

``Gate.screen`` runs the same webhook checks, with the same answers, counts and log
lines, on the HTTP selector thread, but only when none of them can wait: with the
native verifier, Stark Bank's key cached and no refetch of it due
(``bank.Bank.verdict_at_once``). A refused webhook is then answered from that thread;
one that passes reaches ``answer`` marked ``signed``, and only its event is stored.

Refusals are logged through one ``logs.Throttle`` (``Gate.refusals``, which the
server's own refusals share): the first of each kind, then at most one a second
with the count held back, so a flood of forged requests is not also a flood of log
lines.
"""

import base64
import binascii
import hmac
import json
import logging
import re
import threading
import time
from http import HTTPStatus
from typing import NamedTuple

from . import events, metrics
from .errors import BankUnavailable, SignatureError, StarkChallengeError
from .logs import Throttle

__all__ = ["Gate", "Reply", "Screening", "Framing", "Head", "Headers", "check_head", "read_head", "head_end", "check_basic_auth",
           "ROUTES", "MAX_BODY_BYTES", "MAX_HEAD_BYTES", "MAX_HEADER_LINES"]

logger = logging.getLogger(__name__)

# Stark Bank's events are a few KiB; anything larger is not one of them.
MAX_BODY_BYTES = 64 * 1024
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; Stark Bank's are well under 2 KiB
MAX_HEADER_LINES = 64  # header lines in one request; Stark Bank sends about ten

# path -> {method: the Gate method that answers it}
ROUTES = {
    "/webhook": {"POST": "webhook"},
    "/health": {"GET": "health", "HEAD": "health"},
    "/status": {"GET": "status", "HEAD": "status"},
    "/metrics": {"GET": "metrics", "HEAD": "metrics"},
    "/transfers/retry": {"POST": "retry"},
    "/debug/memory": {"GET": "debug_memory"},
}

# The longest invoice id a retry request may name (Stark Bank's ids are about 16 digits).
MAX_INVOICE_ID = 64


class Reply(NamedTuple):
    """What to answer: an HTTP status, a JSON-able body, and extra headers."""

    status: HTTPStatus
    body: object  # a JSON-able dict, or text (str) sent as it is with the Content-Type in headers
    headers: tuple = ()


class Screening(NamedTuple):
    """What the HTTP selector thread may do with a complete request (``Gate.screen``)."""

    reply: Reply = None  # decided at once: send this answer now
    signed: bool = False  # hand it on; every check passed, its signature included: only its event is left


def _error(status, message, headers=()):
    return Reply(status, {"error": message}, headers)


class Framing(NamedTuple):
    """What the head of a request says about its framing, or why it is refused."""

    error: HTTPStatus = None  # None if the request may be read; else the status to refuse it with
    reason: str = ""  # one line for the client and the log when refused
    body_bytes: int = 0  # length of the body that follows the head
    expect_continue: bool = False  # the client waits for "100 Continue" before sending the body


def _refused(status, reason):
    return Framing(status, reason)


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIGITS = re.compile(rb"[0-9]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class Headers:
    """A request's header fields, read once by ``read_head``: ``get(name)`` in any case of ``name``.

    What the Gate and the handler need of ``http.client.HTTPMessage`` (which
    ``http.server`` would build with the ``email`` package, the dearest part of a
    request after the signature check): ``get`` and ``[]`` give the value of the first
    field of that name, or None; ``in``, ``len`` and ``items()`` (every field, in order,
    names as sent). Values are decoded as Latin-1, as ``http.client`` decodes them, and
    stripped of the spaces and tabs around them (RFC 9110, 5.5). Read-only; thread-safe.
    """

    __slots__ = ("_fields", "_first")

    def __init__(self, fields=()):
        self._fields = tuple(fields)  # (name, value) pairs, as sent
        self._first = {}  # lower-case name -> the value of its first field
        for name, value in self._fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name, default=None):
        """Return the value of the first field named ``name`` (any case), or ``default``."""
        return self._first.get(name.lower(), default)

    def __getitem__(self, name):
        return self._first.get(name.lower())  # None when absent, as email.message.Message answers

    def __contains__(self, name):
        return name.lower() in self._first

    def __len__(self):
        return len(self._fields)

    def items(self):
        """Return every (name, value) field, in the order sent."""
        return list(self._fields)


class Head(NamedTuple):
    """A request head read by ``read_head``: its framing and, when not refused, its request line and fields."""

    framing: Framing  # framing.error is None if the request may be read
    method: str = ""  # the request line's first word, as sent (a token)
    target: str = ""  # its second word: the path and query, Latin-1 decoded
    version: str = ""  # "HTTP/1.0" or "HTTP/1.1"
    headers: Headers = Headers()  # the header fields; empty when refused


def check_head(head):
    """Return the Framing of a request head (bytes, without its closing blank line).

    The framing part of ``read_head``: see there. Pure; thread-safe.
    """
    return read_head(head).framing


def read_head(head):
    """Return the Head of a request head (bytes, without its closing blank line): framing, request line, fields.

    Every line is read once, here, so a request that passes needs no other parser.
    Strict where leniency lets two parsers disagree (request smuggling): the request
    line is ``METHOD target HTTP/1.x``; every header line is ``name: value`` (no folding,
    no space before the colon); ``Content-Length`` is ASCII digits, and its copies, if
    any, agree; ``Transfer-Encoding`` is refused whatever its value (Stark Bank sends a
    Content-Length). A refused head gives its Framing only. Pure; thread-safe.
    """
    lines = head.split(b"\n")
    if len(lines) - 1 > MAX_HEADER_LINES:
        return Head(_refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADER_LINES} header lines"))
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1] or not _VERSION.fullmatch(parts[2]):
        return Head(_refused(HTTPStatus.BAD_REQUEST, "malformed request line"))
    lengths, expect_continue, fields = set(), False, []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return Head(_refused(HTTPStatus.BAD_REQUEST, "malformed header line"))
        value = value.strip(b" \t")
        fields.append((name.decode("ascii"), value.decode("latin-1")))  # a token is ASCII
        name = name.lower()
        if name == b"transfer-encoding":
            return Head(_refused(HTTPStatus.BAD_REQUEST, "Transfer-Encoding is not accepted; send a Content-Length"))
        if name == b"content-length":
            if not _DIGITS.fullmatch(value):
                return Head(_refused(HTTPStatus.BAD_REQUEST, "Content-Length must be ASCII digits"))
            lengths.add(value.lstrip(b"0") or b"0")
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
    if len(lengths) > 1:
        return Head(_refused(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers"))
    length = lengths.pop() if lengths else b"0"
    # Digits are counted before int(): a length of thousands of digits is refused unparsed.
    if len(length) > 9 or int(length) > MAX_BODY_BYTES:
        return Head(_refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes"))
    version = parts[2].decode("ascii")
    framing = Framing(body_bytes=int(length), expect_continue=expect_continue and version == "HTTP/1.1")
    return Head(framing, parts[0].decode("ascii"), parts[1].decode("latin-1"), version, Headers(fields))


def head_end(buffer):
    """Return (end of the head, start of the body) in ``buffer``, or None while the head is incomplete."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return None


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

    ``health`` is ``() -> (HTTPStatus, dict)`` for ``GET /health``; ``report`` is
    ``() -> dict`` for ``GET /status``; ``on_event`` is called after a new event is stored.
    ``counters`` (``metrics.Counters``) counts webhooks by outcome and signature verdicts;
    ``metrics_page`` is ``() -> str`` for ``GET /metrics``; ``retry`` is
    ``(invoice_id) -> resend.Outcome`` for ``POST /transfers/retry``; ``memory_page`` is
    ``() -> dict`` for ``GET /debug/memory``, None (the default) to leave that route 404.
    """

    # A hook: overridable to add a realm per deployment.
    realm = "stark_challenge"

    def __init__(self, store, bank, config, clock, on_event=None, health=None, report=None, counters=None,
                 metrics_page=None, retry=None, memory_page=None):
        self._store = store
        self._bank = bank
        self._username = config.webhook_username
        self._password = config.webhook_password
        self._clock = clock  # () -> aware UTC datetime
        self._on_event = on_event
        self._health = health or (lambda: (HTTPStatus.OK, {"status": "ok"}))
        self._report = report or dict
        self.counters = counters or metrics.Counters()
        self._metrics_page = metrics_page or str
        self._retry = retry
        self._memory_page = memory_page  # None: DEBUG_MEMORY is off and the route answers 404
        self.refusals = Throttle()  # refusal lines: the first of a kind, then at most one a second
        self._receiving = 0  # webhooks in receive(): each may be an event about to be stored
        self._receiving_lock = threading.Lock()

    def refuse(self, status, reason, what, client, headers=()):
        """Log a refusal (throttled) and return its Reply."""
        self.refusals.log(logger, logging.WARNING, "%s refused (%d): %s from %s", what, status, reason, client,
                          kind=reason)
        return _error(status, reason, headers)

    def answer(self, method, path, headers, body, client, signed=False):
        """Return the Reply to a complete request (``body`` is None when it has no Content-Length).

        ``signed``: ``screen`` passed this webhook, its signature included; only its event is left to store.
        """
        if signed:
            return self.receive(headers, body, signed=True)
        allowed = ROUTES.get(path.split("?", 1)[0])
        if allowed is None:
            return _error(HTTPStatus.NOT_FOUND, "not found")
        if method not in allowed:
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed", (("Allow", ", ".join(allowed)),))
        return getattr(self, allowed[method])(headers, body, client)

    def health(self, headers, body, client):
        """GET /health: the status word, for anyone who asks."""
        status, payload = self._health()
        return Reply(status, payload)

    def status(self, headers, body, client):
        """GET /status: the report, behind basic auth."""
        denied = self.authorize(headers)
        if denied is not None:
            self.refusals.log(logger, logging.WARNING, "status refused: bad or missing basic auth from %s", client)
            return denied
        return Reply(HTTPStatus.OK, self._report())

    def metrics(self, headers, body, client):
        """GET /metrics: the Prometheus text exposition, behind basic auth."""
        denied = self.authorize(headers)
        if denied is not None:
            self.refusals.log(logger, logging.WARNING, "metrics refused: bad or missing basic auth from %s", client)
            return denied
        return Reply(HTTPStatus.OK, self._metrics_page(), (("Content-Type", metrics.CONTENT_TYPE),))

    def debug_memory(self, headers, body, client):
        """GET /debug/memory: the memory figures (``memory.Figures``), behind basic auth; 404 unless enabled."""
        if self._memory_page is None:
            return _error(HTTPStatus.NOT_FOUND, "not found")
        denied = self.authorize(headers)
        if denied is not None:
            self.refusals.log(logger, logging.WARNING, "debug refused: bad or missing basic auth from %s", client)
            return denied
        return Reply(HTTPStatus.OK, self._memory_page())

    def retry(self, headers, body, client):
        """POST /transfers/retry: ``{"invoice_id": "..."}``, an operator's retry (``resend.retry``), behind basic auth.

        200 queued or recorded, 409 refused (the state is named), 404 no transfer for
        that invoice, 400 a malformed body, 403 without basic auth configured, 503 if
        Stark Bank does not answer.
        """
        if not (self._username and self._password) or self._retry is None:
            return _error(HTTPStatus.FORBIDDEN, "retries over HTTP need WEBHOOK_USERNAME and WEBHOOK_PASSWORD set")
        denied = self.authorize(headers)
        if denied is not None:
            self.refusals.log(logger, logging.WARNING, "retry refused: bad or missing basic auth from %s", client)
            return denied
        try:
            invoice_id = json.loads(body or b"")["invoice_id"]
        except (ValueError, KeyError, TypeError, RecursionError):
            invoice_id = None
        if not (isinstance(invoice_id, str) and 0 < len(invoice_id) <= MAX_INVOICE_ID and invoice_id.isascii()
                and invoice_id.isdigit()):  # Stark Bank's ids are digits
            return _error(HTTPStatus.BAD_REQUEST, 'expected {"invoice_id": "<digits>"}')
        try:
            outcome = self._retry(invoice_id)
        except BankUnavailable as e:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"Stark Bank did not answer, nothing queued: {e}")
        status = {"refused": HTTPStatus.CONFLICT, "unknown": HTTPStatus.NOT_FOUND}.get(outcome.code, HTTPStatus.OK)
        return Reply(status, {"outcome": outcome.code, "message": outcome.message})

    def webhook(self, headers, body, client):
        """POST /webhook: basic auth, a Content-Length, then ``receive``."""
        denied = self._webhook_denied(headers, body, client)
        if denied is not None:
            return denied
        return self.receive(headers, body)

    def _webhook_denied(self, headers, body, client):
        """Return the Reply refusing a webhook for its basic auth or its missing Content-Length, else None."""
        denied = self.authorize(headers)
        if denied is not None:
            self.refusals.log(logger, logging.WARNING, "webhook refused: bad or missing basic auth from %s", client)
            self._count_webhook("refused", "auth")
            return denied
        if body is None:
            self._count_webhook("refused", "length_required")
            return self.refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required", "POST /webhook", client)
        return None

    def screen(self, method, path, headers, body, client):
        """Decide a complete request on the HTTP selector thread, if that is cheap and waits for nothing.

        Only ``POST /webhook``, and only when its signature can be checked at once
        (``Bank.verdict_at_once``: the native verifier, Stark Bank's key cached, no
        refetch due). Return a Screening: its ``reply`` for a webhook refused (basic
        auth, Content-Length, signature header, encoding, signature), to be sent at
        once; ``signed`` for one that passed every check, its signature included, so
        the handler only stores its event (``answer(..., signed=True)``); neither
        otherwise: the handler decides the request whole. Verdicts, counts and log
        lines are those ``answer`` gives.
        """
        if ROUTES.get(path.split("?", 1)[0], {}).get(method) != "webhook" or not self._bank.checks_at_once:
            return Screening()
        denied = self._webhook_denied(headers, body, client)
        if denied is not None:
            return Screening(reply=denied)
        refused, content = self._content(headers, body)
        if refused is not None:
            return Screening(reply=refused)
        began = time.thread_time()
        try:
            signs = self._bank.verdict_at_once(content, headers.get("Digital-Signature"))
        except SignatureError as e:
            return Screening(reply=self._bad_signature(e, began))
        if not signs:
            return Screening()
        self._count_check("valid", began)
        return Screening(signed=True)

    def _count_check(self, verdict, began):
        """Count a signature check by verdict, and the CPU it took this thread since ``began`` (thread time)."""
        labels = (("verdict", verdict),)
        self.counters.add("stark_challenge_signature_verifications_total", labels)
        self.counters.add("stark_challenge_signature_check_cpu_seconds_total", labels, time.thread_time() - began)

    def _count_webhook(self, outcome, reason=""):
        labels = (("outcome", outcome), ("reason", reason)) if reason else (("outcome", outcome),)
        self.counters.add("stark_challenge_webhooks_total", labels)

    def authorize(self, headers):
        """Return None if the request may proceed, or the 401 Reply if basic auth fails."""
        if not (self._username and self._password):
            return None
        if check_basic_auth(headers.get("Authorization"), self._username, self._password):
            return None
        return _error(
            HTTPStatus.UNAUTHORIZED, "authentication required",
            (("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'),),
        )

    def receive(self, headers, body, signed=False):
        """Check a webhook whose basic auth already passed; store its event; return the Reply.

        ``signed``: ``screen`` passed it, its signature included: only storing is left.
        Counts the webhooks being received at once: an event's commit waits briefly for
        theirs (``Store.add_event``), so concurrent webhooks share one fsync.
        """
        with self._receiving_lock:
            self._receiving += 1
        try:
            if signed:
                return self._store_event(body.decode("utf-8"))
            return self._receive(headers, body)
        finally:
            with self._receiving_lock:
                self._receiving -= 1

    def _content(self, headers, body):
        """Return (None, the body as text) if the webhook names a signature and is UTF-8, else (the Reply, None)."""
        if not headers.get("Digital-Signature"):
            self.refusals.log(logger, logging.WARNING, "webhook refused: no Digital-Signature header")
            self._count_webhook("refused", "no_signature")
            return _error(HTTPStatus.UNAUTHORIZED, "missing Digital-Signature header"), None
        try:
            return None, body.decode("utf-8")
        except UnicodeDecodeError:
            self.refusals.log(logger, logging.WARNING, "webhook refused: body is not UTF-8")
            self._count_webhook("refused", "not_utf8")
            return _error(HTTPStatus.BAD_REQUEST, "body is not UTF-8"), None

    def _bad_signature(self, error, began):
        """Count and log a signature that is not Stark Bank's (``error``: the SignatureError); return the 401."""
        self._count_check("invalid", began)
        self.refusals.log(logger, logging.WARNING, "webhook refused: %s", error, kind=str(error))
        self._count_webhook("refused", "bad_signature")
        return _error(HTTPStatus.UNAUTHORIZED, "invalid Digital-Signature")

    def _receive(self, headers, body):
        refused, content = self._content(headers, body)
        if refused is not None:
            return refused
        began = time.thread_time()
        try:
            self._bank.verify_event(content, headers.get("Digital-Signature"))
        except SignatureError as e:
            return self._bad_signature(e, began)
        except BankUnavailable as e:
            self.refusals.log(logger, logging.WARNING,
                              "webhook not verified, Stark Bank's key is unavailable (%s); answering 503", e)
            self._count_webhook("unavailable", "public_key")
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "cannot verify the signature now; deliver again later")
        self._count_check("valid", began)
        return self._store_event(content)

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
