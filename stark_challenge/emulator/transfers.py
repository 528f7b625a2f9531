"""The transfer rules of a workspace's ledger: uniqueness, schedule, balance, failure.

`TransferRules` is mixed into `ledger.Ledger` and acts on its state under its lock (see
Ledger for the attributes it uses). A transfer's life, as Stark Bank documents it:

- creation refuses, all or none, an externalId used before in the workspace (or twice in
  the request) and, without an externalId, a repeat of amount and receiver on the same
  UTC day; with the duplicate_external_id knob at "fail_later", a repeated externalId is
  created instead and fails at its processing step, as Stark Bank is also reported to do;
- created -> processing when its ``scheduled`` moment comes (at once, transfer_delay_s
  after creation, when not scheduled for later): the balance is debited then, and a
  transfer the balance cannot cover fails instead ("failed" log, nothing debited);
- processing -> success, or failed (fail_transfer, or the transfer_fail_ratio draw made
  at creation), transfer_delay_s later; a failure after the debit gives the money back
  with a second transaction id;
- a transfer scheduled for a later moment waits on a quiet timer and can be canceled
  (`cancel_transfer`, DELETE /v2/transfer/{id}) until then: "canceled" log.
"""

import copy

from . import dates, taxid
from .validate import Rejected, iso

__all__ = ["TransferRules", "INSUFFICIENT_BALANCE"]

_PENDING = ("created", "processing")
_DEFAULT_ERRORS = ["Simulated failure: the receiving institution refused the transfer"]
_DUPLICATE_ERRORS = ["externalId was already used by another transfer"]
INSUFFICIENT_BALANCE = "Insufficient balance: the workspace balance cannot cover this transfer"


class TransferRules:
    """Transfer creation and transitions; mixed into `ledger.Ledger`."""

    def _init_transfer_rules(self):
        self._external_ids = set()  # every externalId ever used in the workspace
        self._implicit_keys = set()  # (UTC day, amount, receiver) of transfers without externalId
        self._doomed = {}  # transfer id -> errors it will fail with instead of succeeding

    def create_transfers(self, transfers):
        """Create validated transfers (see validate.check_transfers) all or none; return copies.

        Raise Rejected, creating nothing, if an externalId was ever used before (or twice
        in this request), or if a transfer without externalId repeats the amount and
        receiver of another such transfer on the same UTC day. Each created transfer
        then steps to processing at its scheduled moment, and on to success or failed.
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
                if self._chance.random() < self._knobs.transfer_fail_ratio:
                    self._doomed[transfer["id"]] = list(_DEFAULT_ERRORS)
                if index in duplicates:
                    self._doomed[transfer["id"]] = list(_DUPLICATE_ERRORS)
                events.append(self._log("transfer", transfer, "created"))
                created.append(copy.deepcopy(transfer))
        self._publish(events)
        for transfer in created:
            wait_s = (dates.start_of(transfer["scheduled"]) - moment).total_seconds()
            if wait_s > 0:
                self._timers.call_later(wait_s, self._advance_transfer, transfer["id"], quiet=True)
            else:
                self._timers.call_later(self._knobs.transfer_delay_s, self._advance_transfer, transfer["id"])
        return created

    def fail_transfer(self, transfer_id, errors=None):
        """Fail a created or processing transfer now, with a "failed" log; return its copy.

        Raise ValueError if the transfer is unknown or already final.
        """
        with self._lock:
            transfer = self._transfer_locked(transfer_id)
            if transfer["status"] not in _PENDING:
                raise ValueError("transfer %s is already %s" % (transfer_id, transfer["status"]))
            events = [self._fail_locked(transfer, list(errors or _DEFAULT_ERRORS))]
            failed = copy.deepcopy(transfer)
        self._publish(events)
        return failed

    def cancel_transfer(self, transfer_id):
        """Cancel a transfer whose scheduled moment has not come, with a "canceled" log; return its copy.

        Raise ValueError if unknown, Rejected (invalidAction) if it is not waiting for a later moment.
        """
        with self._lock:
            transfer = self._transfer_locked(transfer_id)
            if transfer["status"] != "created" or dates.start_of(transfer["scheduled"]) <= self._now():
                raise Rejected.one("invalidAction", "transfer %s is %s and not scheduled for later: it cannot be "
                                                    "canceled" % (transfer_id, transfer["status"]))
            self._doomed.pop(transfer_id, None)
            transfer.update(status="canceled", updated=iso(self._now()))
            events = [self._log("transfer", transfer, "canceled")]
            canceled = copy.deepcopy(transfer)
        self._publish(events)
        return canceled

    # -- helpers (lock held unless said otherwise) ----------------------------------

    def _transfer_locked(self, transfer_id):
        transfer = self._tables["transfer"].get(transfer_id)
        if transfer is None:
            raise ValueError("no transfer %s" % transfer_id)
        return transfer

    def _advance_transfer(self, transfer_id):
        """One step (lock not held): created -> processing (or failed), processing -> success or failed."""
        with self._lock:
            transfer = self._tables["transfer"].get(transfer_id)
            if transfer is None or transfer["status"] not in _PENDING:
                return
            again = False
            if transfer["status"] == "created" and transfer["amount"] > self._balance:
                events = [self._fail_locked(transfer, [INSUFFICIENT_BALANCE])]
            elif transfer["status"] == "created":
                self._balance -= transfer["amount"]
                transfer.update(status="processing", updated=iso(self._now()),
                                transactionIds=transfer["transactionIds"] + [self._new_id()])
                events = [self._log("transfer", transfer, "processing")]
                again = True
            elif transfer_id in self._doomed:
                events = [self._fail_locked(transfer, self._doomed.pop(transfer_id))]
            else:
                transfer.update(status="success", updated=iso(self._now()))
                events = [self._log("transfer", transfer, "success")]
        self._publish(events)
        if again:
            self._timers.call_later(self._knobs.transfer_delay_s, self._advance_transfer, transfer_id)

    def _fail_locked(self, transfer, errors):
        self._doomed.pop(transfer["id"], None)
        transfer.update(status="failed", updated=iso(self._now()))
        if transfer["transactionIds"]:  # debited: the debit is reversed by a second transaction
            transfer["transactionIds"] = transfer["transactionIds"] + [self._new_id()]
            self._balance += transfer["amount"]
        return self._log("transfer", transfer, "failed", errors)
