"""One emulated workspace's ledger: its balance, entities, logs, events, attempts and webhooks.

`Ledger` owns all of one workspace's business state in memory and every change to it.
The rules for invoices (`invoices.InvoiceRules`) and for transfers
(`transfers.TransferRules`) are mixed into it and act on the state kept here:

- the balance in cents (starting_balance knob; `set_balance`): paid invoices add their
  amount minus the fee, reversals take back, transfers take their amount when they start
  processing and give it back if they fail after that;
- every log makes one event ``{"id", "created", "isDelivered", "subscription",
  "workspaceId", "log"}``, handed to the `publish` callable (webhook delivery);
- each failed delivery try is kept as an event attempt (`record_attempt`);
- webhooks: url and subscriptions.

An emulator may hold several workspaces (`control.Emulator.add_workspace`), one `Ledger`
each, sharing one `Ids` so that ids are unique across them, as Stark Bank's are.

Entities are stored and returned in the API's JSON shape (camelCase). One lock guards all
state and is held only for in-memory work; `publish` is always called after the lock is
released. Random choices (payment, failure, ids) come from the injected `random.Random`
objects and are drawn at creation time, so a seeded run is repeatable whatever the
thread timing. Time comes from the injected `now` callable (aware UTC datetimes).
"""

import copy
import datetime
import threading
from urllib.parse import urlsplit

from .invoices import InvoiceRules
from .tables import Ids, Table
from .transfers import TransferRules
from .validate import Rejected, iso

__all__ = ["Ledger", "Ids", "Rejected", "SUBSCRIPTIONS"]

# Services a webhook may subscribe to (starkbank/event/__event.py); only invoice and
# transfer ever produce events here.
SUBSCRIPTIONS = (
    "transfer", "invoice", "deposit", "boleto", "brcode-payment", "boleto-payment",
    "utility-payment", "darf-payment", "tax-payment", "boleto-holmes",
)

_KINDS = ("invoice", "invoice-log", "transfer", "transfer-log", "event", "event-attempt", "webhook")
_LAGGED = ("invoice", "transfer")  # the kinds whose reads the read_lag_s knob delays


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


class Ledger(InvoiceRules, TransferRules):
    """The workspace state and its transitions; every public method is thread-safe.

    id_random is a random.Random for this workspace's ids, or an `Ids` shared with
    other workspaces. The rule mixins use ``_lock``, ``_tables``, ``_balance``,
    ``_knobs``, ``_timers``, ``_chance``, ``_now``, ``_new_id``, ``_log`` and ``_publish``.
    """

    def __init__(self, knobs, timers, id_random, chance_random, publish=None, now=_utc_now):
        self._knobs = knobs
        self._timers = timers
        self._ids = id_random if isinstance(id_random, Ids) else Ids(id_random)  # draws entity ids
        self._chance = chance_random  # draws payment and failure decisions
        self._publish_events = publish or (lambda events: None)
        self._now = now
        self._lock = threading.Lock()
        self._tables = {kind: Table() for kind in _KINDS}
        self._history = {}  # (kind, id) -> [(time, row copy)] of invoices and transfers, for read_lag_s
        self._balance = knobs.starting_balance  # cents
        self._init_invoice_rules()
        self._init_transfer_rules()
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

    def set_balance(self, cents):
        """Set the workspace balance in cents (an integer >= 0), as a deposit or withdrawal would."""
        if not isinstance(cents, int) or isinstance(cents, bool) or cents < 0:
            raise ValueError("the balance must be an integer number of cents >= 0")
        with self._lock:
            self._balance = cents

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

    # -- events, attempts and webhooks ----------------------------------------------

    def mark_delivered(self, event_id):
        """Set an event's isDelivered; return its copy, or None if there is no such event."""
        with self._lock:
            event = self._tables["event"].get(event_id)
            if event is not None:
                event["isDelivered"] = True
            return copy.deepcopy(event)

    def record_attempt(self, event_id, webhook_id, code, message):
        """Keep one failed delivery try as an event attempt; return its copy.

        code is Stark Bank's: "badHttpStatus", "badConnection" or "timeout".
        """
        with self._lock:
            attempt = {"id": self._new_id(), "code": code, "message": message, "eventId": event_id,
                       "webhookId": webhook_id, "created": iso(self._now())}
            self._tables["event-attempt"].add(attempt)
            return copy.deepcopy(attempt)

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
