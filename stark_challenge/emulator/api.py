"""The Stark Bank API routes: what each call does to the ledger and what it answers.

`Api.handle(method, target, headers, body)` is the whole API as one function from a
decrypted HTTP request to a `Reply` (status, JSON bytes, and whether to drop the
connection instead of answering); it knows nothing about sockets or TLS (see `proxy`).
Each call goes through, in order:

1. the latency_s knob (a wait),
2. injected faults (`faults`): answer an error without acting, or act and then drop or
   answer an error,
   and the tripwire (`tripwire`), which may stop the client just before or after the call,
3. routing by method and path (404 if none),
4. authentication (`auth`; 401) for every route but GET /v2/public-key; the project
   authenticated picks the workspace (ledger) the call sees and acts on: a project
   never sees another workspace's invoices, transfers, events or webhooks,
5. JSON decoding of POST/PATCH bodies (400 invalidJson),
6. the route itself: 200 with the SDK's JSON (or a PDF or PNG file for the pdf and
   qrcode routes), or 400 with ``{"errors": [{"code", "message"}]}`` (the SDK raises
   InputErrors for 400 only). A body field the route does not know is a 400 too.

Lists are served by `query.select` (newest first, paged, filtered and checked). An id
that does not exist is a 400 with Stark Bank's code: invalidInvoice, invalidTransfer,
invalidInvoiceLog, invalidTransferLog as the SDK's own tests against the real API expect;
invalidEventId, invalidWebhookId and invalidEventAttemptId where nothing says otherwise.

Every call is recorded (method, path, status) for tests to count once answered, and
listed as in flight from its arrival until then (so a test can act while a call waits
out latency_s). Thread-safe: the ledger locks its own state and this module keeps only
the call records, under its lock.
"""

import datetime
import json
import logging
import re
import threading
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from . import documents, query as queries, validate
from .faults import DROP, FAIL, FAIL_AFTER, SLOW
from .tripwire import Tripwire
from .validate import Rejected

__all__ = ["Api", "Reply"]

logger = logging.getLogger(__name__)

class Reply(NamedTuple):
    """What to send back for one API call."""

    status: int
    body: bytes
    drop: bool = False
    """Close the connection without answering (the action, if any, was performed)."""
    content_type: str = "application/json"


class _File(NamedTuple):
    """A route's answer that is a file, not JSON."""

    content_type: str
    body: bytes


class _ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.errors = [{"code": code, "message": message}]


def _bad(code, message):
    return Rejected.one(code, message)


def _external_ids(body):
    """Return the externalIds a transfer create call sent (whatever became of it), for the record."""
    try:
        return [t.get("externalId") for t in json.loads(body)["transfers"] if isinstance(t, dict)]
    except (ValueError, KeyError, TypeError):
        return []


class Api:
    """The routes over a `Ledger`; see the module docstring for the order of checks."""

    def __init__(self, bank, projects, event_key, knobs, faults, stopping):
        self._bank = bank  # the first workspace; serves unauthenticated routes
        self._workspaces = {}  # workspace id -> Ledger, for the workspaces added later
        self._projects = projects
        self._event_key = event_key
        self._knobs = knobs
        self._faults = faults
        self._stopping = stopping  # threading.Event set on shutdown; ends latency waits
        self._lock = threading.Lock()
        self._calls = []  # {"method", "path", "query", "status"[, "dropped"]}
        self._in_flight = []  # {"method", "path", "query"} of calls received, not yet answered
        self._held = []  # one threading.Event per call held by answer_late; set to release it
        self._public_key_fetches = 0
        self.tripwire = Tripwire()  # numbers the calls; crash tests stop the client at one (tripwire.py)
        # (method, path pattern, handler, needs authentication); first match wins.
        self._routes = [(method, re.compile(pattern + "$"), handler, signed) for method, pattern, handler, signed in (
            ("GET", r"/v2/public-key", self._public_key, False),
            ("GET", r"/v2/balance", self._balance, True),
            ("POST", r"/v2/invoice", self._create_invoices, True),
            ("GET", r"/v2/invoice", self._lister("invoice", "invoices"), True),
            ("GET", r"/v2/invoice/log", self._lister("invoice-log", "logs"), True),
            ("GET", r"/v2/invoice/log/([^/]+)", self._getter("invoice-log", "log", "invalidInvoiceLog"), True),
            ("GET", r"/v2/invoice/log/([^/]+)/pdf", self._invoice_log_pdf, True),
            ("GET", r"/v2/invoice/([^/]+)", self._getter("invoice", "invoice", "invalidInvoice"), True),
            ("PATCH", r"/v2/invoice/([^/]+)", self._update_invoice, True),
            ("GET", r"/v2/invoice/([^/]+)/pdf", self._invoice_pdf, True),
            ("GET", r"/v2/invoice/([^/]+)/qrcode", self._invoice_qrcode, True),
            ("GET", r"/v2/invoice/([^/]+)/payment", self._invoice_payment, True),
            ("POST", r"/v2/transfer", self._create_transfers, True),
            ("GET", r"/v2/transfer", self._lister("transfer", "transfers"), True),
            ("GET", r"/v2/transfer/log", self._lister("transfer-log", "logs"), True),
            ("GET", r"/v2/transfer/log/([^/]+)", self._getter("transfer-log", "log", "invalidTransferLog"), True),
            ("GET", r"/v2/transfer/([^/]+)", self._getter("transfer", "transfer", "invalidTransfer"), True),
            ("DELETE", r"/v2/transfer/([^/]+)", self._cancel_transfer, True),
            ("GET", r"/v2/transfer/([^/]+)/pdf", self._transfer_pdf, True),
            ("GET", r"/v2/event", self._lister("event", "events"), True),
            ("GET", r"/v2/event/attempt", self._lister("event-attempt", "attempts"), True),
            ("GET", r"/v2/event/attempt/([^/]+)", self._getter("event-attempt", "attempt", "invalidEventAttemptId"),
             True),
            ("GET", r"/v2/event/([^/]+)", self._getter("event", "event", "invalidEventId"), True),
            ("PATCH", r"/v2/event/([^/]+)", self._update_event, True),
            ("DELETE", r"/v2/event/([^/]+)", self._deleter("event", "invalidEventId"), True),
            ("POST", r"/v2/webhook", self._create_webhook, True),
            ("GET", r"/v2/webhook", self._lister("webhook", "webhooks"), True),
            ("GET", r"/v2/webhook/([^/]+)", self._getter("webhook", "webhook", "invalidWebhookId"), True),
            ("DELETE", r"/v2/webhook/([^/]+)", self._deleter("webhook", "invalidWebhookId"), True),
        )]

    def add_workspace(self, bank):
        """Serve ``bank`` to the projects registered in its workspace."""
        with self._lock:
            self._workspaces[bank.workspace_id] = bank

    def _bank_of(self, headers):
        workspace_id = self._projects.workspace_of(headers)
        with self._lock:
            return self._workspaces.get(workspace_id, self._bank) if workspace_id is not None else self._bank

    # -- the record -----------------------------------------------------------------

    def calls(self):
        """Return a copy of the record of every API call, oldest first."""
        with self._lock:
            return [dict(call) for call in self._calls]

    def calls_in_flight(self):
        """Return a copy of the calls received and not yet answered, oldest first."""
        with self._lock:
            return [dict(call) for call in self._in_flight]

    @property
    def public_key_fetches(self):
        """How many times GET /v2/public-key was answered."""
        with self._lock:
            return self._public_key_fetches

    # -- the entry point ------------------------------------------------------------

    def handle(self, method, target, headers, body):
        """Answer one API call; return a Reply. headers has lowercased names; body is bytes."""
        parts = urlsplit(target)
        # The SDK asks for "/v2//public-key" (starkcore/utils/parse.py joins "/public-key"
        # onto ".../v2/"); like Stark Bank, treat repeated slashes as one.
        path = re.sub("/+", "/", parts.path).rstrip("/") or "/"
        query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        arrived = {"method": method, "path": path, "query": parts.query}
        with self._lock:
            self._in_flight.append(arrived)
        try:
            return self._handle(method, parts, path, query, headers, body)
        finally:
            with self._lock:
                self._in_flight.remove(arrived)

    def _hold(self, delay_s):
        """Wait delay_s, or less if the emulator stops or release_held is called."""
        released = threading.Event()
        with self._lock:
            self._held.append(released)
        try:
            if not self._stopping.is_set():  # checked after registering: release_held cannot miss it
                released.wait(delay_s)
        finally:
            with self._lock:
                self._held.remove(released)

    def release_held(self):
        """End the waits of the calls held by answer_late now: they are performed and answered."""
        with self._lock:
            for released in self._held:
                released.set()

    def _handle(self, method, parts, path, query, headers, body):
        if self._knobs.latency_s:
            self._stopping.wait(self._knobs.latency_s)
        fault = self._faults.take(method, path)
        if fault is not None and fault[0] == SLOW:
            self._hold(fault[1])
            fault = None
        ticket = self.tripwire.before(method, path, parts.query)
        drop = False
        if ticket is None:  # the tripwire stopped the client before Stark Bank acted: nothing is done
            status, payload, drop = 0, {}, True
        elif fault is not None and fault[0] == FAIL:
            status, payload = fault[1], {"errors": [{"code": "injectedFault", "message": "injected by the emulator"}]}
        else:
            drop = fault is not None and fault[0] == DROP
            status, payload = self._route(method, path, query, headers, body)
            if fault is not None and fault[0] == FAIL_AFTER:  # done, and answered as a failure
                status, payload = fault[1], {"errors": [{"code": "injectedFault",
                                                         "message": "injected by the emulator"}]}
        drop = self.tripwire.after(ticket) or drop
        with self._lock:
            call = {"method": method, "path": path, "query": parts.query, "status": status}
            if drop:
                call["dropped"] = True
            if (method, path) == ("POST", "/v2/transfer"):
                call["external_ids"] = _external_ids(body)
            self._calls.append(call)
        if isinstance(payload, _File):
            return Reply(status, payload.body, drop, payload.content_type)
        return Reply(status, json.dumps(payload).encode("utf-8"), drop)

    def _route(self, method, path, query, headers, body):
        for route_method, pattern, handler, signed in self._routes:
            match = pattern.match(path)
            if match is None or route_method != method:
                continue
            text = body.decode("utf-8", errors="replace")
            try:
                bank = self._bank
                if signed:
                    error = self._projects.check(headers, text, self._knobs.max_clock_skew_s)
                    if error is not None:
                        raise _ApiError(401, error["code"], error["message"])
                    bank = self._bank_of(headers)
                payload = None
                if method in ("POST", "PATCH", "PUT"):
                    try:
                        payload = json.loads(text)
                    except ValueError:
                        raise _bad("invalidJson", "the body is not valid JSON") from None
                    if not isinstance(payload, dict):
                        raise _bad("invalidJson", "the body must be a JSON object")
                return 200, handler(bank, query, payload, *match.groups())
            except _ApiError as error:
                return error.status, {"errors": error.errors}
            except Rejected as rejected:
                return 400, {"errors": rejected.errors}
            except Exception:
                logger.exception("emulator route %s %s failed", method, path)
                return 500, {"errors": [{"code": "internalServerError", "message": "emulator bug; see its log"}]}
        return 404, {"errors": [{"code": "routeNotFound", "message": "no route %s %s" % (method, path)}]}

    # -- generic routes -------------------------------------------------------------

    def _lister(self, kind, plural):
        def list_rows(bank, query, _payload):
            page, cursor = queries.select(bank.rows(kind, lagged=True), query, kind)
            return {plural: page, "cursor": cursor}
        return list_rows

    def _getter(self, kind, singular, code):
        def get_row(bank, _query, _payload, row_id):
            row = bank.get(kind, row_id, lagged=True)
            if row is None:
                raise _bad(code, "%s %s does not exist" % (singular, row_id))
            return {singular: row}
        return get_row

    def _deleter(self, kind, code):
        def delete_row(bank, _query, _payload, row_id):
            row = bank.delete(kind, row_id)
            if row is None:
                raise _bad(code, "%s %s does not exist" % (kind, row_id))
            return {kind: row}
        return delete_row

    # -- specific routes ------------------------------------------------------------

    def _public_key(self, _bank, _query, _payload):
        with self._lock:
            self._public_key_fetches += 1
        return {"publicKeys": [{"content": self._event_key.public_pem, "id": self._bank.workspace_id,
                                "created": "2020-01-01T00:00:00.000000+00:00"}], "cursor": None}

    def _balance(self, bank, _query, _payload):
        now = validate.iso(datetime.datetime.now(datetime.timezone.utc))
        return {"balances": [{"id": bank.workspace_id, "amount": bank.balance(), "currency": "BRL",
                              "updated": now}], "cursor": None}

    def _create_invoices(self, bank, _query, payload):
        return self._create("invoices", payload, validate.check_invoices, bank.create_invoices)

    def _create_transfers(self, bank, _query, payload):
        return self._create("transfers", payload, validate.check_transfers, bank.create_transfers)

    @staticmethod
    def _create(field, payload, check, create):
        """Validate the list under ``field`` with ``check``; create it all with ``create``, or refuse it all."""
        validate.check_fields(payload, (field,))
        entities, errors = check(payload.get(field), datetime.datetime.now(datetime.timezone.utc))
        if errors:
            raise Rejected(errors)
        return {field: create(entities)}

    def _update_invoice(self, bank, _query, payload, invoice_id):
        status, amount, due, expiration = validate.check_invoice_update(payload)
        try:
            return {"invoice": bank.update_invoice(invoice_id, status=status, amount=amount, due=due,
                                                   expiration=expiration)}
        except ValueError:
            raise _bad("invalidInvoice", "invoice %s does not exist" % invoice_id) from None

    def _cancel_transfer(self, bank, _query, _payload, transfer_id):
        try:
            return {"transfer": bank.cancel_transfer(transfer_id)}
        except ValueError:
            raise _bad("invalidTransfer", "transfer %s does not exist" % transfer_id) from None

    def _update_event(self, bank, _query, payload, event_id):
        validate.check_fields(payload, ("isDelivered",))
        if payload.get("isDelivered") is not True:
            raise _bad("invalidIsDelivered", "isDelivered can only be set to true")
        event = bank.mark_delivered(event_id)
        if event is None:
            raise _bad("invalidEventId", "event %s does not exist" % event_id)
        return {"event": event}

    def _create_webhook(self, bank, _query, payload):
        validate.check_fields(payload, ("url", "subscriptions"))
        return {"webhook": bank.add_webhook(payload.get("url"), payload.get("subscriptions"))}

    # -- files and sub-resources ----------------------------------------------------

    def _found(self, bank, kind, row_id, code):
        row = bank.get(kind, row_id)
        if row is None:
            raise _bad(code, "%s %s does not exist" % (kind, row_id))
        return row

    def _invoice_pdf(self, bank, _query, _payload, invoice_id):
        invoice = self._found(bank, "invoice", invoice_id, "invalidInvoice")
        return _File("application/pdf", documents.receipt("Invoice %s" % invoice_id, invoice))

    def _invoice_qrcode(self, bank, query, _payload, invoice_id):
        size = query.get("size", "7")
        if not size.isdigit() or not 1 <= int(size) <= 50:
            raise _bad("invalidSize", "size must be an integer number of pixels per module from 1 to 50")
        invoice = self._found(bank, "invoice", invoice_id, "invalidInvoice")
        return _File("image/png", documents.qr_png(invoice["brcode"], int(size)))

    def _invoice_payment(self, bank, _query, _payload, invoice_id):
        self._found(bank, "invoice", invoice_id, "invalidInvoice")
        try:
            return {"payment": bank.payment(invoice_id)}
        except ValueError as error:
            raise _bad("invalidInvoice", str(error)) from None

    def _invoice_log_pdf(self, bank, _query, _payload, log_id):
        log = self._found(bank, "invoice-log", log_id, "invalidInvoiceLog")
        if log["type"] != "reversed":
            raise _bad("invalidInvoiceLog", "log %s is %s: only reversed logs have a receipt" % (log_id, log["type"]))
        return _File("application/pdf", documents.receipt("Invoice reversal %s" % log_id, log))

    def _transfer_pdf(self, bank, _query, _payload, transfer_id):
        transfer = self._found(bank, "transfer", transfer_id, "invalidTransfer")
        if transfer["status"] not in ("processing", "success"):
            raise _bad("invalidTransfer", "transfer %s is %s: only processing and successful transfers have a "
                                          "receipt" % (transfer_id, transfer["status"]))
        return _File("application/pdf", documents.receipt("Transfer %s" % transfer_id, transfer))
