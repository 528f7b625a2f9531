"""Check invoice and transfer JSON as the SDK sends it, and fill Stark Bank's defaults.

Pure functions over decoded JSON (camelCase keys): `check_invoices` and
`check_transfers` take the list from a POST body and return the normalised entities or
the list of errors, each ``{"code", "message"}`` with a message starting
"Element <index>: ", as Stark Bank words them. A request is all-or-nothing: the caller
creates nothing if any element has an error. `check_invoice_update` and `check_fields`
check PATCH and other bodies. Rules that need the ledger (unique externalId, same-day
repeats, the balance) live in `ledger`, not here.

A field the API does not know, or a required one missing, is ``invalidJson``, as the
SDK's own tests against Stark Bank expect (tests/api in starkbank/sdk-python).
"""

import datetime
import re

from . import taxid
from .dates import iso, local_date, parse_datetime

__all__ = ["MAX_ENTITIES", "MAX_AMOUNT", "Rejected", "check_invoices", "check_transfers", "iso"]

# Stark Bank creates at most 100 entities per request.
MAX_ENTITIES = 100

# Defaults documented by the SDK (starkbank/invoice/__invoice.py).
_DEFAULT_EXPIRATION_S = 5097600  # 59 days
_DEFAULT_FINE = 2.0  # percent
_DEFAULT_INTEREST = 1.0  # percent per month
_DEFAULT_DUE = datetime.timedelta(days=2)

_ACCOUNT_TYPES = ("checking", "savings", "salary", "payment")
_BANK_CODE = re.compile(r"^(\d{3}|\d{8})$")  # COMPE code or ISPB
_BRANCH_CODE = re.compile(r"^\d{1,4}(-\d)?$")
_ACCOUNT_NUMBER = re.compile(r"^\d{1,20}(-[\dXx])?$")
# The largest amount accepted for one invoice or transfer: Stark Bank refuses 10^15 cents
# (the SDK's own tests) and publishes no bound; the emulator's is R$ 10 billion.
MAX_AMOUNT = 10 ** 12

_INVOICE_FIELDS = ("amount", "taxId", "name", "due", "expiration", "fine", "interest", "discounts", "rules",
                   "splits", "tags", "descriptions")
_INVOICE_REQUIRED = ("amount", "taxId", "name")
_TRANSFER_FIELDS = ("amount", "name", "taxId", "bankCode", "branchCode", "accountNumber", "accountType",
                    "externalId", "scheduled", "description", "displayDescription", "tags", "rules")
_TRANSFER_REQUIRED = ("amount", "name", "taxId", "bankCode", "branchCode", "accountNumber")
_INVOICE_UPDATE_FIELDS = ("status", "amount", "due", "expiration")

# "invoice-<id>" is reported to clash with Stark Bank's own external ids (shared README).
_RESERVED_EXTERNAL_ID = re.compile(r"^invoice-\d+$")


class Rejected(Exception):
    """A request refused with Stark Bank's list of errors, each {"code", "message"} (a 400)."""

    def __init__(self, errors):
        super().__init__("; ".join(error["message"] for error in errors))
        self.errors = errors

    @classmethod
    def one(cls, code, message):
        """Return a Rejected carrying a single error."""
        return cls([{"code": code, "message": message}])


class _Invalid(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _fields(item, known, required):
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise _Invalid("invalidJson", "unknown field %s" % ", ".join(unknown))
    missing = [key for key in required if item.get(key) is None]
    if missing:
        raise _Invalid("invalidJson", "missing field %s" % ", ".join(missing))


def _amount(item, least):
    amount = item.get("amount")
    if not _integer(amount) or not least <= amount <= MAX_AMOUNT:
        raise _Invalid("invalidAmount", "amount must be an integer number of cents from %d to %d" % (least, MAX_AMOUNT))
    return amount


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _text(item, key, code, required=True):
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(code, "%s must be a non-empty string" % key)
    return value


def _tags(item):
    tags = item.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        raise _Invalid("invalidTags", "tags must be a list of non-empty strings")
    # Stark Bank matches tags without regard to case; store them lowercased.
    return [tag.lower() for tag in tags]


def _tax_id(item):
    value = item.get("taxId")
    if not taxid.is_valid(value):
        raise _Invalid("invalidTaxId", "taxId %r is not a valid CPF or CNPJ" % (value,))
    return taxid.format_tax_id(value)


def _when(item, key, code, default):
    value = item.get(key)
    if value is None:
        return iso(default)
    try:
        parsed, is_date = parse_datetime(value)
    except ValueError:
        raise _Invalid(code, "%s must be an ISO date or datetime, got %r" % (key, value)) from None
    return parsed.isoformat() if is_date else iso(parsed)


def _list_of_dicts(item, key, code):
    value = item.get(key, [])
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise _Invalid(code, "%s must be a list of objects" % key)
    return value


def _invoice(item, now):
    _fields(item, _INVOICE_FIELDS, _INVOICE_REQUIRED)
    amount = _amount(item, 0)
    expiration = item.get("expiration", _DEFAULT_EXPIRATION_S)
    if not _integer(expiration) or expiration < 0:
        raise _Invalid("invalidExpiration", "expiration must be an integer number of seconds >= 0")
    fine = item.get("fine", _DEFAULT_FINE)
    if not _number(fine) or not 0 <= fine <= 20:
        raise _Invalid("invalidFine", "fine must be a percentage between 0 and 20")
    interest = item.get("interest", _DEFAULT_INTEREST)
    if not _number(interest) or not 0 <= interest <= 10:
        raise _Invalid("invalidInterest", "interest must be a monthly percentage between 0 and 10")
    descriptions = _list_of_dicts(item, "descriptions", "invalidDescriptions")
    for entry in descriptions:
        if not isinstance(entry.get("key"), str) or not isinstance(entry.get("value", ""), str):
            raise _Invalid("invalidDescriptions", "each description needs a string key and an optional string value")
    discounts = _list_of_dicts(item, "discounts", "invalidDiscounts")
    for entry in discounts:
        if not _number(entry.get("percentage")):
            raise _Invalid("invalidDiscounts", "each discount needs a numeric percentage")
    return {
        "amount": amount,
        "name": _text(item, "name", "invalidName"),
        "taxId": _tax_id(item),
        "due": _when(item, "due", "invalidDue", now + _DEFAULT_DUE),
        "expiration": expiration,
        "fine": fine,
        "interest": interest,
        "discounts": discounts,
        "descriptions": descriptions,
        "tags": _tags(item),
        "rules": _list_of_dicts(item, "rules", "invalidRules"),
        "splits": _list_of_dicts(item, "splits", "invalidSplits"),
    }


def _scheduled(item, now):
    """Return the scheduled date or datetime (ISO text), refusing one before today in São Paulo."""
    text = _when(item, "scheduled", "invalidScheduled", now)
    if local_date(text) < local_date(now):
        code = "invalidDate" if len(text) == 10 else "invalidDateTime"
        raise _Invalid(code, "scheduled %s is before today (%s in São Paulo)" % (text, local_date(now)))
    return text


def _transfer(item, now):
    _fields(item, _TRANSFER_FIELDS, _TRANSFER_REQUIRED)
    amount = _amount(item, 1)
    bank_code = item.get("bankCode")
    if not isinstance(bank_code, str) or not _BANK_CODE.match(bank_code):
        raise _Invalid("invalidBankCode", "bankCode must be a 3-digit bank code or an 8-digit ISPB")
    branch_code = item.get("branchCode")
    if not isinstance(branch_code, str) or not _BRANCH_CODE.match(branch_code):
        raise _Invalid("invalidBranchCode", "branchCode must be up to 4 digits, optionally with -digit")
    account_number = item.get("accountNumber")
    if not isinstance(account_number, str) or not _ACCOUNT_NUMBER.match(account_number):
        raise _Invalid("invalidAccountNumber", "accountNumber must be digits, optionally with -digit")
    account_type = item.get("accountType", "checking")
    if account_type not in _ACCOUNT_TYPES:
        raise _Invalid("invalidAccountType", "accountType must be one of %s" % ", ".join(_ACCOUNT_TYPES))
    external_id = _text(item, "externalId", "invalidExternalId", required=False)
    if external_id is not None and _RESERVED_EXTERNAL_ID.match(external_id):
        raise _Invalid("invalidExternalId", "externalId %r is reserved by Stark Bank" % external_id)
    return {
        "amount": amount,
        "name": _text(item, "name", "invalidName"),
        "taxId": _tax_id(item),
        "bankCode": bank_code,
        "branchCode": branch_code,
        "accountNumber": account_number,
        "accountType": account_type,
        "externalId": external_id,
        "scheduled": _scheduled(item, now),
        "description": _text(item, "description", "invalidDescription", required=False),
        "displayDescription": _text(item, "displayDescription", "invalidDisplayDescription", required=False),
        "tags": _tags(item),
        "rules": _list_of_dicts(item, "rules", "invalidRules"),
    }


def _check_all(items, noun, check, now):
    if not isinstance(items, list) or not items:
        return None, [{"code": "invalidJson", "message": "%s must be a non-empty list" % noun}]
    if len(items) > MAX_ENTITIES:
        return None, [{
            "code": "invalidJson",
            "message": "at most %d %s can be created per request, got %d" % (MAX_ENTITIES, noun, len(items)),
        }]
    entities, errors = [], []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise _Invalid("invalidJson", "each element must be an object")
            entities.append(check(item, now))
        except _Invalid as invalid:
            errors.append({"code": invalid.code, "message": "Element %d: %s" % (index, invalid.message)})
    return (None, errors) if errors else (entities, [])


def check_invoices(items, now):
    """Return (invoices, errors) for the "invoices" list of a POST body; now is an aware datetime.

    Exactly one of the two is useful: errors is empty when every element is valid.
    """
    return _check_all(items, "invoices", _invoice, now)


def check_transfers(items, now):
    """Return (transfers, errors) for the "transfers" list of a POST body; now is an aware datetime."""
    return _check_all(items, "transfers", _transfer, now)


def check_fields(payload, known):
    """Raise Rejected (invalidJson) if the body payload (a dict) has a field outside known."""
    try:
        _fields(payload, known, ())
    except _Invalid as invalid:
        raise Rejected.one(invalid.code, invalid.message) from None


def check_invoice_update(payload):
    """Return (status, amount, due, expiration) of a PATCH /v2/invoice body; raise Rejected if invalid.

    status may only be "canceled"; amount is 0..MAX_AMOUNT cents; due an ISO date or
    datetime (kept as sent, normalised); expiration whole seconds >= 0.
    """
    check_fields(payload, _INVOICE_UPDATE_FIELDS)
    try:
        if payload.get("status") not in (None, "canceled"):
            raise _Invalid("invalidStatus", "status can only be changed to canceled")
        amount = None if payload.get("amount") is None else _amount(payload, 0)
        due = None if payload.get("due") is None else _when(payload, "due", "invalidDue", None)
        expiration = payload.get("expiration")
        if expiration is not None and (not _integer(expiration) or expiration < 0):
            raise _Invalid("invalidExpiration", "expiration must be an integer number of seconds >= 0")
    except _Invalid as invalid:
        raise Rejected.one(invalid.code, invalid.message) from None
    return payload.get("status"), amount, due, expiration
