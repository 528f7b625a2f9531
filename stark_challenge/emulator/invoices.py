"""The invoice rules of a workspace's ledger: payment, updates, reversal, due dates.

`InvoiceRules` is mixed into `ledger.Ledger` and acts on its state under its lock (see
Ledger for the attributes it uses). An invoice's life, as Stark Bank documents it:

- created -> paid, by the simulated payer (probability pay_ratio, pay_delay_s after
  creation) or by `pay`: one "paid" and one "credited" log (order set by the
  credited_first knob); the invoice then carries the paid `amount` and the `fee`, and the
  balance grows by amount minus fee. Its payer (`payment`) is then known.
- created -> overdue once its due moment passes (a due date lasts until the end of that
  day in São Paulo), then overdue -> expired once `expiration` seconds more have passed:
  each with its log, for unpaid invoices only. An overdue invoice can still be paid, an
  expired one cannot. The checks run on quiet timers (`timers.Timers`).
- created/overdue -> canceled, or amount, due and expiration changed ("updated" log;
  the due-date checks follow the new dates).
- paid -> reversed: lowering a paid invoice's amount gives money back to the payer
  (`update_invoice(amount=...)`, 0 for all of it): a "reversed" log, a new transaction
  id, the balance lowered by the difference (refused if it cannot cover it). The status
  stays "paid" after a partial reversal and becomes "reversed" at 0.
"""

import copy
import datetime

from . import dates
from .validate import Rejected, iso

__all__ = ["InvoiceRules"]

_PAYABLE = ("created", "overdue")
_CHANGEABLE = ("created", "overdue")
# The simulated payer's bank: an ISPB (8 digits), as Pix payments carry.
_PAYER_BANK = "18236120"


class InvoiceRules:
    """Invoice creation and transitions; mixed into `ledger.Ledger`."""

    def _init_invoice_rules(self):
        self._payments = {}  # invoice id -> its Invoice.Payment JSON, once paid
        self._deadline_tokens = {}  # invoice id -> the token of its live due-date check

    def create_invoices(self, invoices):
        """Create validated invoices (see validate.check_invoices); return their copies.

        Each is drawn for simulated payment with probability pay_ratio, paid
        pay_delay_s later; each is watched for its due date and expiration.
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
        for invoice in created:
            self._watch_deadlines(invoice["id"])
        return created

    def pay(self, invoice_id, amount=None):
        """Pay an invoice now: status "paid" and the "paid" and "credited" logs; return its copy.

        amount defaults to the invoice's amount. Raise ValueError if the invoice is
        unknown or not payable (paid, canceled, expired).
        """
        if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
            raise ValueError("amount must be a positive integer number of cents")
        with self._lock:
            invoice = self._invoice_locked(invoice_id)
            events = self._pass_deadlines_locked(invoice)
            payable = invoice["status"] in _PAYABLE
            if payable:
                events += self._pay_locked(invoice, amount)
            paid = copy.deepcopy(invoice)
        self._publish(events)
        if not payable:
            raise ValueError("invoice %s is %s, not payable" % (invoice_id, paid["status"]))
        return paid

    def update_invoice(self, invoice_id, status=None, amount=None, due=None, expiration=None):
        """Change an invoice as PATCH /v2/invoice/{id} does; return its copy.

        Unpaid (created or overdue): cancel it (status="canceled"), or change its amount,
        due (ISO text) and expiration (seconds). Paid: only a lower amount, which reverses
        the difference. Raise ValueError if unknown, Rejected if the change is not allowed.
        """
        with self._lock:
            invoice = self._invoice_locked(invoice_id)
            events = self._pass_deadlines_locked(invoice)
            refused = None
            try:
                if invoice["status"] == "paid":
                    if amount is None or (status, due, expiration) != (None, None, None):
                        raise Rejected.one("invalidOperation", "invoice %s is paid: only a lower amount (a "
                                                               "reversal) can be set" % invoice_id)
                    events.append(self._reverse_locked(invoice, amount))
                elif invoice["status"] in _CHANGEABLE:
                    events += self._change_locked(invoice, status, amount, due, expiration)
                else:
                    raise Rejected.one("invalidOperation",
                                       "invoice %s is %s and cannot change" % (invoice_id, invoice["status"]))
            except Rejected as rejected:
                refused = rejected
            updated = copy.deepcopy(invoice)
        self._publish(events)
        if refused is not None:
            raise refused
        if due is not None or expiration is not None:
            self._watch_deadlines(invoice_id)
        return updated

    def reverse(self, invoice_id, amount=0):
        """Reverse a paid invoice down to amount (cents; 0: all of it); return its copy.

        Raise ValueError if unknown, Rejected if it is not paid, amount is not lower than
        its amount, or the balance cannot cover the difference.
        """
        return self.update_invoice(invoice_id, amount=amount)

    def payment(self, invoice_id):
        """Return the Invoice.Payment JSON of a paid invoice; raise ValueError if unknown or never paid."""
        with self._lock:
            self._invoice_locked(invoice_id)
            found = self._payments.get(invoice_id)
            if found is None:
                raise ValueError("invoice %s has not been paid" % invoice_id)
            return copy.deepcopy(found)

    # -- helpers (lock held unless said otherwise) ----------------------------------

    def _invoice_locked(self, invoice_id):
        invoice = self._tables["invoice"].get(invoice_id)
        if invoice is None:
            raise ValueError("no invoice %s" % invoice_id)
        return invoice

    def _pay_if_payable(self, invoice_id):
        with self._lock:
            invoice = self._tables["invoice"].get(invoice_id)
            if invoice is None:
                return
            events = self._pass_deadlines_locked(invoice)
            if invoice["status"] in _PAYABLE:
                events += self._pay_locked(invoice, None)
        self._publish(events)

    def _pay_locked(self, invoice, amount):
        fee = self._knobs.invoice_fee
        invoice.update(
            status="paid", fee=fee, updated=iso(self._now()),
            amount=invoice["amount"] if amount is None else amount,
            transactionIds=invoice["transactionIds"] + [self._new_id()],
        )
        self._balance += invoice["amount"] - fee
        self._payments[invoice["id"]] = {
            "amount": invoice["amount"], "name": invoice["name"], "taxId": invoice["taxId"],
            "bankCode": _PAYER_BANK, "branchCode": "0001", "accountNumber": "%s-%s" % (invoice["id"][:8], 0),
            "accountType": "checking", "method": "pix",
            "endToEndId": "E%s%s%s" % (_PAYER_BANK, self._now().strftime("%Y%m%d%H%M"), invoice["id"][:11]),
        }
        order = ("credited", "paid") if self._knobs.credited_first else ("paid", "credited")
        return [self._log("invoice", invoice, log_type) for log_type in order]

    def _change_locked(self, invoice, status, amount, due, expiration):
        events = []
        if (amount, due, expiration) != (None, None, None):
            if amount is not None:
                invoice["amount"] = invoice["nominalAmount"] = amount
            if due is not None:
                invoice["due"] = due
            if expiration is not None:
                invoice["expiration"] = expiration
            invoice["updated"] = iso(self._now())
            events.append(self._log("invoice", invoice, "updated"))
        if status == "canceled":
            invoice.update(status="canceled", updated=iso(self._now()))
            events.append(self._log("invoice", invoice, "canceled"))
        return events

    def _reverse_locked(self, invoice, amount):
        returned = invoice["amount"] - amount
        if returned <= 0:
            raise Rejected.one("invalidAmount", "a paid invoice's amount can only be lowered (it is %d)"
                               % invoice["amount"])
        if returned > self._balance:
            raise Rejected.one("insufficientBalance", "the balance cannot cover a reversal of %d cents" % returned)
        self._balance -= returned
        invoice.update(amount=amount, status="reversed" if amount == 0 else "paid", updated=iso(self._now()),
                       transactionIds=invoice["transactionIds"] + [self._new_id()])
        if invoice["id"] in self._payments:
            self._payments[invoice["id"]]["amount"] = amount
        return self._log("invoice", invoice, "reversed")

    def _next_deadline_locked(self, invoice):
        """Return the moment of an invoice's next due-date transition, or None."""
        due = dates.end_of(invoice["due"])
        if invoice["status"] == "created":
            return due
        if invoice["status"] == "overdue":
            return due + datetime.timedelta(seconds=invoice["expiration"])
        return None

    def _pass_deadlines_locked(self, invoice):
        """Move an unpaid invoice to overdue and expired as its dates have passed; return the events."""
        events = []
        now = self._now()
        for status, new_status in (("created", "overdue"), ("overdue", "expired")):
            if invoice["status"] == status and self._next_deadline_locked(invoice) <= now:
                invoice.update(status=new_status, updated=iso(now))
                events.append(self._log("invoice", invoice, new_status))
        return events

    def _watch_deadlines(self, invoice_id):
        """Schedule (lock not held) a check of the invoice's next due-date transition, if any."""
        with self._lock:
            invoice = self._tables["invoice"].get(invoice_id)
            moment = None if invoice is None else self._next_deadline_locked(invoice)
            if moment is None:
                return
            token = self._deadline_tokens[invoice_id] = object()  # an earlier check becomes stale
            delay_s = max(0.0, (moment - self._now()).total_seconds())
        self._timers.call_later(delay_s, self._check_deadlines, invoice_id, token, quiet=True)

    def _check_deadlines(self, invoice_id, token):
        with self._lock:
            if self._deadline_tokens.get(invoice_id) is not token:
                return
            del self._deadline_tokens[invoice_id]
            events = self._pass_deadlines_locked(self._tables["invoice"].get(invoice_id))
        self._publish(events)
        self._watch_deadlines(invoice_id)
