"""The tests' handle on one workspace, and the extra workspaces an emulator may hold.

`LedgerView` is what `control.Emulator` (the first workspace) and `Workspace` (each one
added by `Emulator.add_workspace`, another Stark Bank customer) share: projects and
webhooks registered, snapshots of entities, the balance, webhook deliveries, and making
things happen as Stark Bank's side would (pay, reverse, fail a transfer, set the balance,
resend an event). Every method is thread-safe: the ledger and the courier lock their own
state.
"""

from .keys import new_project_key
from .validate import Rejected

__all__ = ["LedgerView", "Workspace"]


class LedgerView:
    """What the tests read, register and make happen in one workspace (``self._ledger``, its
    events delivered by ``self._courier``), shared by `control.Emulator` (its first workspace)
    and `Workspace` (the others). Projects are registered in ``self._projects`` under
    ``self._projects_key``: None for the first workspace, else its id."""

    @property
    def workspace_id(self):
        """The id events of this workspace carry as workspaceId."""
        return self._ledger.workspace_id

    def create_project(self):
        """Create a project of this workspace with a new secp256k1 key; return (project id, private key PEM)."""
        private_pem, public_pem = new_project_key()
        project_id = self._ledger.new_id()
        self._projects.register(project_id, public_pem, self._projects_key)
        return project_id, private_pem

    def add_webhook(self, url, subscriptions=("invoice", "transfer")):
        """Register a webhook as POST /v2/webhook would; return its id. Raise ValueError if invalid."""
        try:
            return self._ledger.add_webhook(url, list(subscriptions))["id"]
        except Rejected as rejected:
            raise ValueError(str(rejected)) from None

    def _rows(self, kind):
        return [row for _, row in self._ledger.rows(kind)]

    def invoices(self):
        """Return every invoice of the workspace (API JSON, camelCase), oldest first; copies."""
        return self._rows("invoice")

    def transfers(self):
        """Return every transfer of the workspace (API JSON, camelCase), oldest first; copies."""
        return self._rows("transfer")

    def events(self):
        """Return every event of the workspace (API JSON, camelCase), oldest first; copies."""
        return self._rows("event")

    def balance(self):
        """Return the workspace balance in cents."""
        return self._ledger.balance()

    def deliveries(self):
        """Return every webhook delivery try of this workspace's events, oldest first: dicts with
        eventId, webhookId, url (without credentials), status (int, or None if no answer), error
        (str or None), copy and attempt (1-based), at (ISO time)."""
        return self._courier.attempts()

    # -- making things happen -------------------------------------------------------

    def pay(self, invoice_id, amount=None):
        """Pay an invoice now (logs "paid" and "credited"); return the paid invoice.

        amount defaults to the invoice's. Raise ValueError if unknown or not payable.
        """
        return self._ledger.pay(invoice_id, amount)

    def reverse(self, invoice_id, amount=0):
        """Reverse a paid invoice down to amount cents (0: all of it), as lowering its amount
        through the API does: a "reversed" log; return the invoice. Raise ValueError if
        unknown, ValueError with Stark Bank's code if refused (not paid, amount not lower,
        balance too low)."""
        try:
            return self._ledger.reverse(invoice_id, amount)
        except Rejected as rejected:
            raise ValueError("%s: %s" % (rejected.errors[0]["code"], rejected)) from None

    def fail_transfer(self, transfer_id, errors=None):
        """Fail a created or processing transfer now (log "failed" with errors); return it.

        errors is a list of strings; a generic one by default. Raise ValueError if the
        transfer is unknown or already final.
        """
        return self._ledger.fail_transfer(transfer_id, errors)

    def set_balance(self, cents):
        """Set the workspace balance (cents >= 0): transfers it cannot cover fail. Raise ValueError if bad."""
        self._ledger.set_balance(cents)

    def resend(self, event_id):
        """Deliver an event again to every webhook subscribed to it, as Stark Bank's resend does;
        return the event. Raise ValueError if there is no such event."""
        event = self._ledger.get("event", event_id)
        if event is None:
            raise ValueError("no event %s" % event_id)
        self._courier.publish([event])
        return event


class Workspace(LedgerView):
    """Another workspace of the emulator: the tests' handle on its projects, entities and webhooks.

    Made by `Emulator.add_workspace`. Thread-safe, like the Emulator.
    """

    def __init__(self, emulator, ledger, courier):
        self._emulator = emulator
        self._ledger = ledger
        self._courier = courier
        self._projects = emulator._projects
        self._projects_key = ledger.workspace_id

    def env(self, project_id=None, private_key_pem=None):
        """Return the environment for a client of this workspace (see `Emulator.env`)."""
        if project_id is None:
            project_id, private_key_pem = self.create_project()
        return self._emulator.env(project_id, private_key_pem)

    def __repr__(self):
        return "<Workspace %s of %r>" % (self.workspace_id, self._emulator)
