"""Bank: every call to Stark Bank, through the official SDK; the only module that imports starkbank.

It sets the SDK's ``starkbank.user`` and timeout once (``configure``), turns SDK
objects (or, for the calls made raw through ``starkbank.request``: transfer creation,
single gets, the credentials check) their JSON into plain dicts, and turns SDK and
network errors into our own:
``BankRejected`` for a 4xx answer (Stark Bank's error codes kept), ``BankUnavailable``
for everything transient (timeout, connection error, 5xx, an unreadable answer).
Every call has the configured timeout; retrying is the caller's decision.
Webhook signatures are checked in ``verify``; this module only fetches Stark Bank's
public key for it (``fetch_public_key``).

Threads: calls may come from any thread. The SDK's module globals are set only by
``configure``.
"""

import logging

import starkbank
from ellipticcurve import PrivateKey
from starkcore.utils.api import api_json

from . import transfer_states
from .errors import BankRejected, BankUnavailable, ConfigError

__all__ = ["Bank"]

logger = logging.getLogger(__name__)

# Stark Bank takes at most 100 entities per create call; the SDK does not split.
MAX_PER_CALL = 100


def _translate(call, what):
    """Run ``call()``; return its result, or raise BankRejected / BankUnavailable naming ``what``."""
    try:
        return call()
    except starkbank.error.InputErrors as e:
        errors = [(err.code, err.message) for err in e.errors]
        raise BankRejected(f"{what}: Stark Bank refused it: " + "; ".join(c for c, _ in errors), errors) from None
    except starkbank.error.InternalServerError:
        raise BankUnavailable(f"{what}: Stark Bank answered 500") from None
    except starkbank.error.UnknownError as e:
        # The SDK answers a timeout or connection error as UnknownError too (status 0).
        raise BankUnavailable(f"{what}: {_short(e)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BankUnavailable(f"{what}: unreadable answer from Stark Bank ({type(e).__name__})") from None


def _short(error, limit=200):
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


# Error codes of a 400 that mean "no such entity for our credentials" (``get`` sees our workspace only).
_NOT_FOUND_CODES = {"invoice": frozenset({"invalidInvoice", "invalidInvoiceId"}),
                    "transfer": frozenset({"invalidTransfer", "invalidTransferId"}),
                    "event": frozenset({"invalidEvent", "invalidEventId"})}
# The fields ``get`` returns, by resource: {our name: Stark Bank's JSON name}.
_FIELDS = {
    "invoice": {"id": "id", "amount": "amount", "fee": "fee", "status": "status", "tags": "tags"},
    "transfer": {"id": "id", "amount": "amount", "status": "status", "external_id": "externalId", "tags": "tags"},
}


def _get_one(resource, entity_id):
    """GET ``/v2/<resource>/<id>`` with our credentials; return the entity's JSON (camelCase dict), or None.

    Read raw (``starkbank.request.get``), because the SDK's typed ``get`` reports a 404
    like a timeout (``UnknownError``), and here "no such entity for us" is a definite
    answer while no answer is not. None only for a 404 or a 400 whose every error code
    says the id is unknown (``_NOT_FOUND_CODES``); any other 400 is BankRejected with its
    codes. Stark Bank's ids are digits: any other id is not ours and never becomes part
    of a URL path.
    """
    if not (isinstance(entity_id, str) and entity_id.isdigit()):
        return None
    what = f"get {resource} {entity_id}"
    response = _translate(lambda: starkbank.request.get(f"{resource}/{entity_id}"), what)
    if response.status == 404:
        return None
    if response.status == 400:
        errors = _errors_of(response, what)
        if errors and all(code in _NOT_FOUND_CODES[resource] for code, _ in errors):
            return None
        raise BankRejected(f"{what}: Stark Bank refused it: " + "; ".join(str(c) for c, _ in errors), errors)
    if response.status == 0:  # the SDK's status for "no answer": timeout, refused, proxy
        raise BankUnavailable(f"{what}: no answer from Stark Bank ({_short(response.content, 120)})")
    if response.status != 200:
        raise BankUnavailable(f"{what}: Stark Bank answered {response.status}")
    found = _translate(lambda: response.json()[resource], what)
    if not isinstance(found, dict):
        raise BankUnavailable(f"{what}: unreadable answer from Stark Bank")
    return found


def _errors_of(response, what):
    """Return the [(code, message)] of a 400 answer; raise BankUnavailable if it does not list them."""
    try:
        return [(e["code"], e["message"]) for e in response.json()["errors"]]
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise BankUnavailable(f"{what}: unreadable answer from Stark Bank ({type(e).__name__})") from None


def _post(resource, body, what):
    """POST ``body`` to ``/v2/<resource>`` with our credentials; return the answer's JSON (a dict).

    Raw (``starkbank.request.post``), which returns the answer whatever its status:
    translated here as the SDK's typed calls are by ``_translate``. Raise BankRejected
    for a 400 listing Stark Bank's errors, BankUnavailable for no answer (the SDK's
    status 0: timeout, refused, proxy), any other status, or an unreadable answer.
    """
    response = _translate(lambda: starkbank.request.post(resource, body=body), what)
    if response.status == 0:
        raise BankUnavailable(f"{what}: no answer from Stark Bank ({_short(response.content, 120)})")
    if response.status == 400:
        errors = _errors_of(response, what)
        raise BankRejected(f"{what}: Stark Bank refused it: " + "; ".join(str(c) for c, _ in errors), errors)
    if response.status != 200:
        raise BankUnavailable(f"{what}: Stark Bank answered {response.status}")
    answer = _translate(response.json, what)
    if not isinstance(answer, dict):
        raise BankUnavailable(f"{what}: unreadable answer from Stark Bank")
    return answer


def _created_transfer(made, external_id, what):
    """Return one transfer of a create answer (JSON) as a dict; raise BankUnavailable if it is not the one sent.

    Each must carry an id and the external id sent at its place in the list, so an
    answer cannot attach Stark Bank's ids to the wrong transfers.
    """
    if not (isinstance(made, dict) and isinstance(made.get("id"), str) and made["id"]
            and made.get("externalId") == external_id):
        raise BankUnavailable(f"{what}: Stark Bank's answer does not list transfer {external_id} in its place")
    return {"id": made["id"], "amount": made.get("amount"), "status": made.get("status"),
            "external_id": external_id, "tags": list(made.get("tags") or [])}


def _invoice_dict(invoice):
    return {
        "id": invoice.id,
        "amount": invoice.amount,
        "name": invoice.name,
        "tax_id": invoice.tax_id,
        "status": invoice.status,
        "tags": list(invoice.tags or []),
    }


def _transfer_dict(transfer):
    return {
        "id": transfer.id,
        "amount": transfer.amount,
        "status": transfer.status,
        "external_id": transfer.external_id,
        "tags": list(transfer.tags or []),
    }


class _Project(starkbank.Project):
    """A ``starkbank.Project`` whose private key is parsed once, here (a bad PEM raises now).

    The SDK's ``private_key()`` parses the PEM again, deriving the public key from it in
    pure-Python curve arithmetic, for every request it signs. A parsed key is never
    modified, so one serves every call and thread.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._private_key = PrivateKey.fromPem(self.pem)

    def private_key(self):
        return self._private_key


class Bank:
    """The service's view of Stark Bank. Build one in ``__main__``, call ``configure()`` once."""

    def __init__(self, config):
        self._config = config

    def configure(self):
        """Set the SDK's user and timeout from the config; raise ConfigError if the key is unusable."""
        try:
            user = _Project(
                environment=self._config.environment,
                id=self._config.project_id,
                private_key=self._config.private_key,
            )
        except Exception:  # the SDK raises bare Exceptions for a bad PEM
            raise ConfigError("STARK_PRIVATE_KEY: not a valid secp256k1 private key in PEM format") from None
        starkbank.user = user
        starkbank.timeout = self._config.bank_timeout_s
        starkbank.language = "en-US"

    # -- invoices ---------------------------------------------------------------

    def create_invoices(self, invoices):
        """Create up to 100 invoices in one call; return them as dicts (id, amount, name, tax_id, status, tags).

        ``invoices`` are dicts with amount (cents), name, tax_id, due (aware datetime),
        expiration_s, tags. Raise BankRejected / BankUnavailable.
        """
        if len(invoices) > MAX_PER_CALL:
            raise ValueError(f"at most {MAX_PER_CALL} invoices per call")
        objects = [
            starkbank.Invoice(
                amount=inv["amount"],
                name=inv["name"],
                tax_id=inv["tax_id"],
                due=inv["due"],
                expiration=inv["expiration_s"],
                tags=inv["tags"],
                descriptions=inv.get("descriptions"),
            )
            for inv in invoices
        ]
        created = _translate(lambda: starkbank.invoice.create(objects), "create invoices")
        return [_invoice_dict(i) for i in created]

    def get(self, resource, entity_id):
        """Return our workspace's ``resource`` ('invoice' or 'transfer') ``entity_id`` as a dict, or None.

        Invoice: id, amount, fee, status, tags; transfer: id, amount, status,
        external_id, tags. None is Stark Bank's definite answer that our credentials
        see no such entity (``get`` sees only our own workspace; see ``_get_one``).
        Raise BankUnavailable if there is no answer (timeout, 5xx) or no usable one,
        BankRejected for any other refusal.
        """
        found = _get_one(resource, entity_id)
        if found is None:
            return None
        return {ours: found.get(theirs) for ours, theirs in _FIELDS[resource].items()}

    def find_invoices(self, tag):
        """Return every invoice carrying ``tag``, as dicts. Raise BankUnavailable on failure."""
        return _translate(lambda: [_invoice_dict(i) for i in starkbank.invoice.query(tags=[tag])], "query invoices")

    # -- transfers --------------------------------------------------------------

    def create_transfer(self, amount, external_id, tags):
        """Send ``amount`` cents to the configured account in one call; return the transfer as a dict.

        ``external_id`` makes the call idempotent: Stark Bank refuses a second
        transfer with it (BankRejected). Raise BankRejected / BankUnavailable.
        """
        return self.create_transfers([(amount, external_id, tags)])[0]

    def create_transfers(self, transfers):
        """Send up to 100 transfers to the configured account in one call; return them as dicts.

        ``transfers`` are (amount in cents, external id, tags) tuples; the answer lists
        them in the same order, as dicts (id, amount, status, external_id, tags). Stark
        Bank creates all of them or none: one it refuses (a duplicate external id, say)
        makes the whole call a BankRejected whose errors name the element ("Element 3:
        ..."). Raise BankRejected for a 400 with Stark Bank's errors, BankUnavailable for
        no answer, a timeout, another status or an answer that does not list exactly the
        transfers sent.

        Sent raw (``starkbank.request.post``: the SDK still signs it and applies its
        timeout), with the JSON built here and the answer read as JSON: building SDK
        ``Transfer`` objects, converting each field's case both ways and parsing every
        datetime of the answer took about two thirds of the call's CPU for a batch
        (``bench/transfer_create_cpu.py``).
        """
        if not 1 <= len(transfers) <= MAX_PER_CALL:
            raise ValueError(f"1 to {MAX_PER_CALL} transfers per call")
        receiver = self._receiver()
        sent = [
            {"amount": amount, **receiver, "externalId": external_id, "tags": list(tags)}
            for amount, external_id, tags in transfers
        ]
        what = "create transfer" if len(sent) == 1 else f"create {len(sent)} transfers"
        answer = _post("transfer", {"transfers": sent}, what)
        created = _translate(lambda: answer["transfers"], what)
        if not isinstance(created, list) or len(created) != len(sent):
            # All or none: an answer listing other transfers than those sent cannot be read.
            count = len(created) if isinstance(created, list) else "no"
            raise BankUnavailable(f"{what}: Stark Bank's answer lists {count} transfers")
        return [_created_transfer(made, item["externalId"], what) for made, item in zip(created, sent)]

    def _receiver(self):
        """Return the configured receiving account as the camelCase fields of a transfer."""
        c = self._config
        return {
            "name": c.transfer_name,
            "taxId": c.transfer_tax_id,
            "bankCode": c.transfer_bank_code,
            "branchCode": c.transfer_branch,
            "accountNumber": c.transfer_account,
            "accountType": c.transfer_account_type,
        }

    def find_transfer(self, external_id):
        """Return our transfer with ``external_id`` as a dict, or None if Stark Bank lists none (yet).

        Found by the tag every transfer of ours carries (its external id), keeping only
        those whose external id is exactly ours; if Stark Bank made more than one (a
        repeated external id can be created and failed later), the one that moves money
        (``transfer_states.MOVING``), else the first. Raise BankUnavailable or BankRejected
        if the query fails: that is no answer, never "not found".
        """
        found = [t for t in self.find_transfers(external_id) if t["external_id"] == external_id]
        moving = [t for t in found if t["status"] in transfer_states.MOVING]
        return (moving or found or [None])[0]

    def find_transfers(self, tag, limit=100):
        """Return every transfer carrying ``tag`` (up to ``limit``) as dicts. Raise BankUnavailable on failure."""
        found = _translate(lambda: list(starkbank.transfer.query(tags=[tag], limit=limit)), "query transfers")
        return [_transfer_dict(t) for t in found]

    # -- events -----------------------------------------------------------------

    def undelivered_events(self, limit=500):
        """Return up to ``limit`` events Stark Bank could not deliver, as webhook-shaped dicts."""
        events = _translate(
            lambda: list(starkbank.event.query(is_delivered=False, limit=limit)), "query undelivered events"
        )
        return [api_json(e) for e in events]

    def get_event(self, event_id):
        """Return the event ``event_id`` of our workspace as Stark Bank has it (a webhook-shaped dict), or None
        if Stark Bank has no such event for us. Raise BankUnavailable if it does not answer."""
        return _get_one("event", event_id)

    def mark_delivered(self, event_id):
        """Tell Stark Bank an event was received, so it is not offered again."""
        _translate(lambda: starkbank.event.update(event_id, is_delivered=True), "mark event delivered")

    def fetch_public_key(self):
        """Return the PEM of Stark Bank's current public key (it signs webhooks). Raise BankUnavailable on failure."""
        response = _translate(
            lambda: starkbank.request.get("public-key", query={"limit": 1}), "fetch public key"
        )
        if response.status != 200:
            raise BankUnavailable(f"fetch public key: Stark Bank answered {response.status}")
        return _translate(lambda: response.json()["publicKeys"][0]["content"], "fetch public key")

    # -- account ----------------------------------------------------------------

    def check_credentials(self):
        """Make one authenticated call (list one invoice); return None if Stark Bank accepts the credentials.

        Raise BankRejected with Stark Bank's error codes if it refuses them (any 4xx:
        the SDK reports a 401 such as ``invalidAccessId`` as an UnknownError wrapping
        the body, so the raw answer is read here instead), BankUnavailable if there is
        no answer or a 5xx.
        """
        # starkbank.request.get returns the answer whatever its status (raiseException=False).
        response = _translate(lambda: starkbank.request.get("invoice", query={"limit": 1}), "check credentials")
        if response.status == 200:
            return
        if response.status == 0:  # the SDK's status for "no answer": timeout, refused, proxy
            raise BankUnavailable(f"check credentials: no answer from Stark Bank ({_short(response.content, 120)})")
        if response.status >= 500:
            raise BankUnavailable(f"check credentials: Stark Bank answered {response.status}")
        try:
            errors = [(e["code"], e["message"]) for e in response.json()["errors"]]
        except (ValueError, KeyError, TypeError, UnicodeError):
            errors = [("", f"HTTP {response.status}")]
        raise BankRejected(
            "check credentials: Stark Bank refused them: " + "; ".join(f"{c}: {m}" if c else m for c, m in errors),
            errors,
        )

    def create_webhook(self, url, subscriptions):
        """Subscribe ``url`` to events; return the webhook as a dict (id, url, subscriptions)."""
        hook = _translate(lambda: starkbank.webhook.create(url=url, subscriptions=list(subscriptions)), "create webhook")
        return {"id": hook.id, "url": hook.url, "subscriptions": list(hook.subscriptions)}

    def webhooks(self):
        """Return every webhook subscription as dicts."""
        hooks = _translate(lambda: list(starkbank.webhook.query()), "list webhooks")
        return [{"id": h.id, "url": h.url, "subscriptions": list(h.subscriptions)} for h in hooks]

    def delete_webhook(self, webhook_id):
        """Delete a webhook subscription; return it as a dict."""
        hook = _translate(lambda: starkbank.webhook.delete(webhook_id), "delete webhook")
        return {"id": hook.id, "url": hook.url, "subscriptions": list(hook.subscriptions)}


def new_key_pair():
    """Return a new (private PEM, public PEM) secp256k1 pair, as Stark Bank projects use."""
    private_pem, public_pem = starkbank.key.create()
    # The SDK's PEMs start with a blank line; a PEM file starts with its BEGIN line.
    return private_pem.strip() + "\n", public_pem.strip() + "\n"

