"""One emulated workspace's ledger: invoices, transfers, their logs, events and webhooks.

`Ledger` owns all of the emulator's business state in memory and every change to it:

- invoices: created -> (simulated or explicit payment) -> paid, with one "paid" and one
  "credited" log (order set by the credited_first knob), the invoice then carrying the
  paid `amount` and the `fee`;
- transfers: created -> processing -> success, or failed (by fail_transfer or by the
  transfer_fail_ratio draw), with externalId unique across the workspace and, without
  one, a same-UTC-day repeat of amount and receiver refused, as Stark Bank does;
- every log makes one event ``{"id", "created", "isDelivered", "subscription",
  "workspaceId", "log"}``, handed to the `publish` callable (webhook delivery);
- webhooks: url and subscriptions.

An emulator may hold several workspaces (`control.Emulator.add_workspace`), one `Ledger`
each, sharing one `Ids` so that ids are unique across them, as Stark Bank's are; external
ids are unique per workspace only.

Entities are stored and returned in the API's JSON shape (camelCase). One lock guards all
state and is held only for in-memory work; `publish` is always called after the lock is
released. Random choices (payment, failure, ids) come from the injected `random.Random`
objects and are drawn at creation time, so a seeded run is repeatable whatever the
thread timing. Time comes from the injected `now` callable (aware UTC datetimes).
"""

import copy
import datetime
import itertools
import threading
from urllib.parse import urlsplit

from . import taxid
from .validate import iso

__all__ = ["Ledger", "Ids", "Rejected", "SUBSCRIPTIONS"]

# Services a webhook may subscribe to (starkbank/event/__event.py); only invoice and
# transfer ever produce events here.
SUBSCRIPTIONS = (
    "transfer", "invoice", "deposit", "boleto", "brcode-payment", "boleto-payment",
    "utility-payment", "darf-payment", "tax-payment", "boleto-holmes",
)

_PENDING_TRANSFER = ("created", "processing")
_PAYABLE_INVOICE = ("created", "registered", "overdue")
_DEFAULT_TRANSFER_ERRORS = ["Simulated failure: the receiving institution refused the transfer"]
_DUPLICATE_ERROR = "externalId was already used by another transfer"
_LAGGED = ("invoice", "transfer")  # the kinds whose reads the read_lag_s knob delays


class Rejected(Exception):
    """The ledger refuses a request; `errors` is Stark Bank's list of {"code", "message"}."""

    def __init__(self, errors):
        super().__init__("; ".join(error["message"] for error in errors))
        self.errors = errors


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


class _Table:
    """Rows by id in creation order, each with a sequence number for paging cursors."""

    def __init__(self):
        self._rows = {}
        self._sequence = {}
        self._counter = itertools.count(1)

    def add(self, row):
        self._rows[row["id"]] = row
        self._sequence[row["id"]] = next(self._counter)

    def get(self, row_id):
        return self._rows.get(row_id)

    def remove(self, row_id):
        self._sequence.pop(row_id, None)
        return self._rows.pop(row_id, None)

    def rows(self):
        return [(self._sequence[row_id], row) for row_id, row in self._rows.items()]


class Ids:
    """Fresh 16-digit ids drawn from a random.Random, never repeated; shared by workspaces; thread-safe."""

    def __init__(self, id_random):
        self._random = id_random
        self._used = set()
        self._lock = threading.Lock()

    def new(self):
        with self._lock:
            while True:
                new = str(self._random.randrange(10 ** 15, 10 ** 16))
                if new not in self._used:
                    self._used.add(new)
                    return new


class Ledger:
    """The workspace state and its transitions; every public method is thread-safe.

    id_random is a random.Random for this workspace's ids, or an `Ids` shared with
    other workspaces.
    """

    def __init__(self, knobs, timers, id_random, chance_random, publish=None, now=_utc_now):
        self._knobs = knobs
        self._timers = timers
        self._ids = id_random if isinstance(id_random, Ids) else Ids(id_random)  # draws entity ids
        self._chance = chance_random  # draws payment and failure decisions
        self._publish_events = publish or (lambda events: None)
        self._now = now
        self._lock = threading.Lock()
        self._tables = {
            kind: _Table() for kind in ("invoice", "invoice-log", "transfer", "transfer-log", "event", "webhook")
        }
        self._external_ids = set()  # every externalId ever used in the workspace
        self._implicit_keys = set()  # (UTC day, amount, receiver) of transfers without externalId
        self._doomed = {}  # transfer id -> errors it will fail with instead of succeeding
        self._history = {}  # (kind, id) -> [(time, row copy)] of invoices and transfers, for read_lag_s
        self._balance = 0  # cents: credited invoices minus transfers that did not fail
        with self._lock:
            self.workspace_id = self._new_id()

    # -- reading --------------------------------------------------------------------

    def rows(self, kind, lagged=False):
        """Return [(sequence, row copy)] of a kind ("invoice", "event", ...), oldest first.

        ``lagged``: as an API read sees them under the read_lag_s knob (``_as_read``).
        """
        with self._lock:
            rows = self._tables[kind].rows()
            if lagged:
                rows = [(n, seen) for n, seen in ((n, self._as_read(kind, row)) for n, row in rows) if seen]
            return copy.deepcopy(rows)

    def get(self, kind, row_id, lagged=False):
        """Return a copy of one row, or None if there is no such id (``lagged``: as ``rows``)."""
        with self._lock:
            row = self._tables[kind].get(row_id)
            return copy.deepcopy(self._as_read(kind, row) if lagged and row is not None else row)

    def _as_read(self, kind, row):
        """Return ``row`` as it was read_lag_s ago (None: it did not exist yet); lock held."""
        lag = self._knobs.read_lag_s
        if not lag or kind not in _LAGGED:
            return row
        seen = self._now() - datetime.timedelta(seconds=lag)
        versions = [version for at, version in self._history.get((kind, row["id"]), ()) if at <= seen]
        return versions[-1] if versions else None

    def balance(self):
        """Return the workspace balance in cents."""
        with self._lock:
            return self._balance

    def webhooks_for(self, subscription):
        """Return [(webhook id, url)] of the webhooks subscribed to subscription."""
        with self._lock:
            return [
                (row["id"], row["url"]) for _, row in self._tables["webhook"].rows()
                if subscription in row["subscriptions"]
            ]

    def new_id(self):
        """Return a fresh 16-digit id, unique in this emulator (for projects and the like)."""
        with self._lock:
            return self._new_id()

    # -- invoices -------------------------------------------------------------------

    def create_invoices(self, invoices):
        """Create validated invoices (see validate.check_invoices); return their copies.

        Each is drawn for simulated payment with probability pay_ratio, paid
        pay_delay_s later.
        """
        with self._lock:
            now = iso(self._now())
            created, events, to_pay = [], [], []
            for fields in invoices:
                invoice_id = self._new_id()
                invoice = dict(
                    id=invoice_id, nominalAmount=fields["amount"], fineAmount=0, interestAmount=0,
                    discountAmount=0, status="created", fee=0, transactionIds=[],
                    pdf="https://sandbox.api.starkbank.com/v2/invoice/%s.pdf" % invoice_id,
                    link="https://emulator.sandbox.starkbank.com/invoicelink/%s" % invoice_id,
                    brcode="00020101021226890014br.gov.bcb.pix2567emulator.starkbank.com/%s5204000053039865802BR"
                    % invoice_id,
                    created=now, updated=now, **fields,
                )
                self._tables["invoice"].add(invoice)
                events.append(self._log("invoice", invoice, "created"))
                created.append(copy.deepcopy(invoice))
                if self._chance.random() < self._knobs.pay_ratio:
                    to_pay.append(invoice_id)
        self._publish(events)
        for invoice_id in to_pay:
            self._timers.call_later(self._knobs.pay_delay_s, self._pay_if_payable, invoice_id)
        return created

    def pay(self, invoice_id, amount=None):
        """Pay an invoice now: status "paid" and the "paid" and "credited" logs; return its copy.

        amount defaults to the invoice's amount. Raise ValueError if the invoice is
        unknown or not payable (already paid or canceled).
        """
        if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
            raise ValueError("amount must be a positive integer number of cents")
        with self._lock:
            invoice = self._tables["invoice"].get(invoice_id)
            if invoice is None:
                raise ValueError("no invoice %s" % invoice_id)
            if invoice["status"] not in _PAYABLE_INVOICE:
                raise ValueError("invoice %s is %s, not payable" % (invoice_id, invoice["status"]))
            events = self._pay_locked(invoice, amount)
            paid = copy.deepcopy(invoice)
        self._publish(events)
        return paid

    def update_invoice(self, invoice_id, status=None, amount=None):
        """Cancel an unpaid invoice (status="canceled") or change its amount; return its copy.

        Raise ValueError if unknown, Rejected if the change is not allowed.
        """
        with self._lock:
            invoice = self._tables["invoice"].get(invoice_id)
            if invoice is None:
                raise ValueError("no invoice %s" % invoice_id)
            if invoice["status"] not in _PAYABLE_INVOICE:
                raise Rejected([{"code": "invalidInvoiceStatus",
                                 "message": "invoice %s is %s and cannot change" % (invoice_id, invoice["status"])}])
            invoice["updated"] = iso(self._now())
            events = []
            if amount is not None:
                invoice["amount"] = invoice["nominalAmount"] = amount
                events.append(self._log("invoice", invoice, "updated"))
            if status == "canceled":
                invoice["status"] = "canceled"
                events.append(self._log("invoice", invoice, "canceled"))
            updated = copy.deepcopy(invoice)
        self._publish(events)
        return updated

    def _pay_if_payable(self, invoice_id):
        with self._lock:
            invoice = self._tables["invoice"].get(invoice_id)
            if invoice is None or invoice["status"] not in _PAYABLE_INVOICE:
                return
            events = self._pay_locked(invoice, None)
        self._publish(events)

    def _pay_locked(self, invoice, amount):
        fee = self._knobs.invoice_fee
        invoice.update(
            status="paid", fee=fee, updated=iso(self._now()),
            amount=invoice["amount"] if amount is None else amount,
            transactionIds=invoice["transactionIds"] + [self._new_id()],
        )
        self._balance += invoice["amount"] - fee
        order = ("credited", "paid") if self._knobs.credited_first else ("paid", "credited")
        return [self._log("invoice", invoice, log_type) for log_type in order]

    # -- transfers ------------------------------------------------------------------

    def create_transfers(self, transfers):
        """Create validated transfers (see validate.check_transfers) all or none; return copies.

        Raise Rejected, creating nothing, if an externalId was ever used before (or twice
        in this request), or if a transfer without externalId repeats the amount and
        receiver of another such transfer on the same UTC day. Each created transfer
        then steps to processing and to success or failed, transfer_delay_s apart.
        """
        with self._lock:
            moment = self._now()
            now, day = iso(moment), moment.date().isoformat()
            errors, external_ids, implicit_keys, duplicates = [], set(), set(), set()
            for index, fields in enumerate(transfers):
                external_id = fields["externalId"]
                if external_id is not None:
                    repeated = external_id in self._external_ids or external_id in external_ids
                    if repeated and self._knobs.duplicate_external_id == "fail_later":
                        duplicates.add(index)
                    elif repeated:
                        errors.append({"code": "invalidExternalId",
                                       "message": "Element %d: externalId %r was already used" % (index, external_id)})
                    external_ids.add(external_id)
                    continue
                key = (day, fields["amount"], taxid.digits_of(fields["taxId"]), fields["bankCode"],
                       fields["branchCode"], fields["accountNumber"])
                if key in self._implicit_keys or key in implicit_keys:
                    errors.append({"code": "duplicatedTransfer", "message": (
                        "Element %d: a transfer of the same amount to the same receiver was already created "
                        "today; send an externalId to allow it" % index)})
                implicit_keys.add(key)
            if errors:
                raise Rejected(errors)
            self._external_ids |= external_ids
            self._implicit_keys |= implicit_keys
            created, events = [], []
            for index, fields in enumerate(transfers):
                transfer = dict(fields, id=self._new_id(), fee=0, status="created", transactionIds=[],
                                metadata={}, created=now, updated=now)
                if transfer["description"] is None:
                    transfer["description"] = "%s (%s)" % (transfer["name"], transfer["taxId"])
                self._tables["transfer"].add(transfer)
                self._balance -= transfer["amount"]
                if self._chance.random() < self._knobs.transfer_fail_ratio:
                    self._doomed[transfer["id"]] = list(_DEFAULT_TRANSFER_ERRORS)
                if index in duplicates:
                    self._doomed[transfer["id"]] = [_DUPLICATE_ERROR]
                events.append(self._log("transfer", transfer, "created"))
                created.append(copy.deepcopy(transfer))
        self._publish(events)
        for transfer in created:
            self._timers.call_later(self._knobs.transfer_delay_s, self._advance_transfer, transfer["id"])
        return created

    def fail_transfer(self, transfer_id, errors=None):
        """Fail a created or processing transfer now, with a "failed" log; return its copy.

        Raise ValueError if the transfer is unknown or already final.
        """
        with self._lock:
            transfer = self._tables["transfer"].get(transfer_id)
            if transfer is None:
                raise ValueError("no transfer %s" % transfer_id)
            if transfer["status"] not in _PENDING_TRANSFER:
                raise ValueError("transfer %s is already %s" % (transfer_id, transfer["status"]))
            events = [self._fail_locked(transfer, list(errors or _DEFAULT_TRANSFER_ERRORS))]
            failed = copy.deepcopy(transfer)
        self._publish(events)
        return failed

    def _advance_transfer(self, transfer_id):
        with self._lock:
            transfer = self._tables["transfer"].get(transfer_id)
            if transfer is None or transfer["status"] not in _PENDING_TRANSFER:
                return
            transfer["updated"] = iso(self._now())
            again = transfer["status"] == "created"
            if again:
                transfer["status"] = "processing"
                transfer["transactionIds"] = transfer["transactionIds"] + [self._new_id()]
                events = [self._log("transfer", transfer, "processing")]
            elif transfer_id in self._doomed:
                events = [self._fail_locked(transfer, self._doomed.pop(transfer_id))]
            else:
                transfer["status"] = "success"
                events = [self._log("transfer", transfer, "success")]
        self._publish(events)
        if again:
            self._timers.call_later(self._knobs.transfer_delay_s, self._advance_transfer, transfer_id)

    def _fail_locked(self, transfer, errors):
        self._doomed.pop(transfer["id"], None)
        transfer.update(status="failed", updated=iso(self._now()))
        if transfer["transactionIds"]:  # the debit is reversed by a second transaction
            transfer["transactionIds"] = transfer["transactionIds"] + [self._new_id()]
        self._balance += transfer["amount"]
        return self._log("transfer", transfer, "failed", errors)

    # -- events and webhooks --------------------------------------------------------

    def mark_delivered(self, event_id):
        """Set an event's isDelivered; return its copy, or None if there is no such event."""
        with self._lock:
            event = self._tables["event"].get(event_id)
            if event is not None:
                event["isDelivered"] = True
            return copy.deepcopy(event)

    def delete(self, kind, row_id):
        """Remove an event or a webhook; return the removed row, or None if there was none."""
        with self._lock:
            return self._tables[kind].remove(row_id)

    def add_webhook(self, url, subscriptions):
        """Register a webhook; return its copy. Raise Rejected for a bad url or subscription list."""
        errors = []
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            errors.append({"code": "invalidUrl", "message": "url must be an absolute http(s) URL"})
        if (not isinstance(subscriptions, list) or not subscriptions
                or not all(subscription in SUBSCRIPTIONS for subscription in subscriptions)):
            errors.append({"code": "invalidSubscriptions",
                           "message": "subscriptions must be a non-empty list of: %s" % ", ".join(SUBSCRIPTIONS)})
        if errors:
            raise Rejected(errors)
        with self._lock:
            webhook = {"id": self._new_id(), "url": url, "subscriptions": list(subscriptions)}
            self._tables["webhook"].add(webhook)
            return copy.deepcopy(webhook)

    # -- helpers (lock held) --------------------------------------------------------

    def _new_id(self):
        return self._ids.new()

    def _log(self, kind, entity, log_type, errors=()):
        if kind in _LAGGED:  # every change of an invoice or transfer is logged: keep the version read_lag_s reads
            self._history.setdefault((kind, entity["id"]), []).append((self._now(), copy.deepcopy(entity)))
        now = iso(self._now())
        log = {"id": self._new_id(), "type": log_type, "created": now, "errors": list(errors),
               kind: copy.deepcopy(entity)}
        self._tables[kind + "-log"].add(log)
        event = {"id": self._new_id(), "created": now, "isDelivered": False, "subscription": kind,
                 "workspaceId": self.workspace_id, "log": copy.deepcopy(log)}
        self._tables["event"].add(event)
        return copy.deepcopy(event)

    def _publish(self, events):
        if events:
            self._publish_events(events)
