"""The control channel: a person's command line acting on a running emulator.

A running `control.Emulator` answers, on its proxy port, plain-HTTP POSTs under a secret
path, its `control_url` (``http://127.0.0.1:PORT/emulator/<random token>``): the token
keeps other local processes from paying or failing things by guessing the port. Each
action is ``POST <control_url>/<action>`` with a JSON object, answered 200 with
``{"result": ...}`` or 400 with ``{"error": "..."}``; they act on the emulator's first
workspace, as Stark Bank's side would:

- ``pay`` {"invoice", "amount"?}: pay an invoice now;
- ``reverse`` {"invoice", "amount"?}: reverse a paid invoice down to amount (default 0);
- ``fail-transfer`` {"transfer", "error"?}: fail a pending transfer;
- ``set-balance`` {"cents"}: set the balance;
- ``resend`` {"event"}: deliver an event again to its webhooks.

`Remote.handle` is the server side (thread-safe: it only calls the workspace's
thread-safe methods); `call` is the client the command line uses, with a timeout.
"""

import hmac
import http.client
import json
from urllib.parse import urlsplit

__all__ = ["Remote", "RemoteError", "call", "ACTIONS"]

# action -> (required field, optional field or None)
ACTIONS = {
    "pay": ("invoice", "amount"),
    "reverse": ("invoice", "amount"),
    "fail-transfer": ("transfer", "error"),
    "set-balance": ("cents", None),
    "resend": ("event", None),
}
_TIMEOUT_S = 10.0


class RemoteError(Exception):
    """The emulator refused an action, or could not be reached; the message says which."""


class Remote:
    """Serves the actions for one workspace view (`workspaces.LedgerView`) under /emulator/<token>."""

    def __init__(self, view, token):
        self._view = view
        self.prefix = "/emulator/%s/" % token

    def owns(self, path):
        """Return True if path is under the secret prefix (compared in constant time)."""
        return hmac.compare_digest(path[:len(self.prefix)].encode(), self.prefix.encode())

    def handle(self, path, body):
        """Perform one action; return (HTTP status, JSON-able answer)."""
        action = path[len(self.prefix):]
        if action not in ACTIONS:
            return 404, {"error": "unknown action %r; known: %s" % (action, ", ".join(ACTIONS))}
        try:
            fields = json.loads(body or b"{}")
            if not isinstance(fields, dict):
                raise ValueError("the body must be a JSON object")
            return 200, {"result": self._perform(action, fields)}
        except (ValueError, TypeError) as error:
            return 400, {"error": str(error)}

    def _perform(self, action, fields):
        required, optional = ACTIONS[action]
        if required not in fields or set(fields) - {required, optional}:
            raise ValueError("%s takes %s%s" % (action, required, " and optionally " + optional if optional else ""))
        value, extra = fields[required], fields.get(optional)
        if action == "pay":
            return self._view.pay(value, extra)
        if action == "reverse":
            return self._view.reverse(value, 0 if extra is None else extra)
        if action == "fail-transfer":
            return self._view.fail_transfer(value, None if extra is None else [extra])
        if action == "set-balance":
            self._view.set_balance(value)
            return {"balance": self._view.balance()}
        return self._view.resend(value)


def call(control_url, action, fields):
    """POST one action to a running emulator; return its result. Raise RemoteError."""
    parts = urlsplit(control_url)
    if parts.scheme != "http" or not parts.hostname or not parts.path.startswith("/emulator/"):
        raise RemoteError("not an emulator control URL: %r (see the emulator's STARK_EMULATOR_CONTROL line)"
                          % control_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=_TIMEOUT_S)
    try:
        connection.request("POST", parts.path.rstrip("/") + "/" + action, body=json.dumps(fields),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise RemoteError("cannot reach the emulator at %s: %s" % (parts.netloc, error)) from None
    finally:
        connection.close()
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if response.status != 200 or not isinstance(answer, dict) or "result" not in answer:
        if isinstance(answer, dict) and answer.get("error"):
            raise RemoteError(answer["error"])
        raise RemoteError("the emulator at %s answered HTTP %d: is the control URL (with its token) the one "
                          "it printed?" % (parts.netloc, response.status))
    return answer["result"]
