"""The emulator held to the API's documented shapes, route by route, for every route the service
uses: each entity's fields and their JSON types, and the error code of each documented case.

Where the shapes come from: the field lists of the SDK's entities (starkbank 2.36's
docstrings and constructors: what the SDK reads back), the real event Stark Bank signed
(tests/fixtures/stark-signed-event.json: an invoice and its log as Stark Bank sends them),
and, for error codes, the SDK's own tests run against Stark Bank (sdk-python tests/api).
Answers are read raw (``starkbank.request``), so a field the SDK would silently drop, or
one it would fill with None, shows here. A drift in the emulator fails this file.
"""

import datetime
import json
import os

import pytest
import starkbank

from stark_challenge.emulator import Emulator
from stark_challenge.emulator.delivery import body_of

from support import wait_for

NUMBER = (int, float)
TEXT_OR_NONE = (str, type(None))
TIME = "time"  # an ISO datetime with its offset

INVOICE = {
    "id": str, "amount": int, "nominalAmount": int, "fineAmount": int, "interestAmount": int, "discountAmount": int,
    "taxId": str, "name": str, "due": str, "expiration": int, "fine": NUMBER, "interest": NUMBER, "discounts": list,
    "descriptions": list, "tags": list, "rules": list, "splits": list, "pdf": str, "link": str, "brcode": str,
    "status": str, "fee": int, "transactionIds": list, "created": TIME, "updated": TIME,
}
TRANSFER = {
    "id": str, "amount": int, "name": str, "taxId": str, "bankCode": str, "branchCode": str, "accountNumber": str,
    "accountType": str, "externalId": TEXT_OR_NONE, "scheduled": str, "description": str,
    "displayDescription": TEXT_OR_NONE, "tags": list, "rules": list, "fee": int, "status": str,
    "transactionIds": list, "metadata": dict, "created": TIME, "updated": TIME,
}
LOG = {"id": str, "type": str, "created": TIME, "errors": list}
EVENT = {"id": str, "created": TIME, "isDelivered": bool, "subscription": str, "workspaceId": str, "log": dict}
WEBHOOK = {"id": str, "url": str, "subscriptions": list}
BALANCE = {"id": str, "amount": int, "currency": str, "updated": TIME}
ATTEMPT = {"id": str, "code": str, "message": str, "eventId": str, "webhookId": str, "created": TIME}
PAYMENT = {"amount": int, "name": str, "taxId": str, "bankCode": str, "branchCode": str, "accountNumber": str,
           "accountType": str, "endToEndId": str, "method": str}
PUBLIC_KEY = {"content": str, "id": str, "created": TIME}

RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")


def assert_shape(row, shape, what):
    assert set(row) == set(shape), "%s fields: extra %s, missing %s" % (
        what, sorted(set(row) - set(shape)), sorted(set(shape) - set(row)))
    for name, kind in shape.items():
        if kind == TIME:
            assert datetime.datetime.fromisoformat(row[name]).utcoffset() is not None, "%s.%s" % (what, name)
        else:
            assert isinstance(row[name], kind) and not (kind is int and isinstance(row[name], bool)), \
                "%s.%s is %r" % (what, name, row[name])


def get(path, **query):
    response = starkbank.request.get(path, query=query or None)
    assert response.status == 200, response.content
    return response.json()


def error_codes(call):
    """Return the error codes of a refused call: a typed SDK call raising, or a raw one answered 400."""
    try:
        answer = call()
    except starkbank.error.InputErrors as raised:
        return [error.code for error in raised.errors]
    assert answer.status == 400, answer.content
    return [error["code"] for error in answer.json()["errors"]]


@pytest.fixture(scope="module")
def world(emulator_certificates):
    """One emulator for the module (the tests only read, or refuse): a paid invoice, a
    transfer that succeeded, a webhook at a closed port (so attempts exist), an undelivered event."""
    emu = Emulator(pay_ratio=0.0, transfer_delay_s=0.01, delivery_attempts=1, seed=5,
                   certificates=emulator_certificates).start()
    project_id, private_key = emu.create_project()
    env = {name: value for name, value in emu.env(project_id, private_key).items() if not name.startswith("STARK_")}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    saved_user = starkbank.user
    starkbank.user = user = starkbank.Project(environment="sandbox", id=project_id, private_key=private_key)
    try:
        webhook = starkbank.webhook.create(url="http://127.0.0.1:9/webhook", subscriptions=["invoice", "transfer"])
        invoice = starkbank.invoice.create([starkbank.Invoice(amount=1000, tax_id="012.345.678-90", name="Arya Stark",
                                                              tags=["shape"])])[0]
        emu.pay(invoice.id)
        transfer = starkbank.transfer.create([starkbank.Transfer(amount=500, external_id="shape-1", tags=["shape"],
                                                                 **RECEIVER)])[0]
        wait_for(emu.idle, 10, message="the emulator to settle")
    finally:
        starkbank.user = saved_user
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    yield {"emulator": emu, "invoice": invoice.id, "transfer": transfer.id, "webhook": webhook.id, "env": env,
           "user": user}
    emu.stop()


@pytest.fixture(autouse=True)
def as_the_project(world, monkeypatch):
    """Each test speaks to the module's emulator as its project."""
    for name, value in world["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(starkbank, "user", world["user"])


def test_invoices_as_created_fetched_and_queried_have_the_documented_fields(world):
    created = starkbank.request.post("invoice", body={"invoices": [
        {"amount": 100, "taxId": "012.345.678-90", "name": "Arya Stark"}]}).json()["invoices"][0]
    assert_shape(created, INVOICE, "created invoice")
    paid = get("invoice/%s" % world["invoice"])["invoice"]
    assert_shape(paid, INVOICE, "invoice")
    assert (paid["status"], paid["amount"], paid["fee"]) == ("paid", 1000, 50)
    listed = get("invoice", tags="shape", limit=10)
    assert set(listed) == {"invoices", "cursor"}
    for row in listed["invoices"]:
        assert_shape(row, INVOICE, "listed invoice")


def test_invoice_events_carry_every_field_of_the_event_stark_bank_signed(world):
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "stark-signed-event.json")) as file:
        real = json.loads(json.load(file)["body"])["event"]
    event = next(e for e in world["emulator"].events() if e["subscription"] == "invoice")
    pushed = json.loads(body_of(event))["event"]
    assert set(pushed) == set(real) and set(pushed["log"]) == set(real["log"])
    assert set(event) == set(real) | {"isDelivered"}  # the API's event carries it, a pushed one does not
    for name, value in real["log"]["invoice"].items():
        assert type(pushed["log"]["invoice"][name]) is type(value), name


def test_transfers_as_created_fetched_and_queried_have_the_documented_fields(world):
    fetched = get("transfer/%s" % world["transfer"])["transfer"]
    assert_shape(fetched, TRANSFER, "transfer")
    assert fetched["status"] == "success" and len(fetched["transactionIds"]) == 1
    for row in get("transfer", tags="shape", limit=10)["transfers"]:
        assert_shape(row, TRANSFER, "listed transfer")


def test_logs_events_attempts_webhooks_balance_and_public_key_have_the_documented_fields(world):
    for path, entity, shape in (("invoice/log", "invoice", INVOICE), ("transfer/log", "transfer", TRANSFER)):
        for log in get(path)["logs"]:
            assert_shape({k: v for k, v in log.items() if k != entity}, LOG, path)
            assert_shape(log[entity], shape, path + " " + entity)
    events = get("event", isDelivered="false")["events"]
    assert events and all(not e["isDelivered"] for e in events)
    for event in events:
        assert_shape(event, EVENT, "event")
    for attempt in get("event/attempt")["attempts"]:
        assert_shape(attempt, ATTEMPT, "attempt")
        assert attempt["code"] == "badConnection" and attempt["webhookId"] == world["webhook"]
    assert_shape(get("webhook/%s" % world["webhook"])["webhook"], WEBHOOK, "webhook")
    balances = get("balance")["balances"]
    assert len(balances) == 1
    assert_shape(balances[0], BALANCE, "balance")
    assert_shape(get("invoice/%s/payment" % world["invoice"])["payment"], PAYMENT, "invoice payment")
    for key in get("public-key", limit=1)["publicKeys"]:
        assert_shape(key, PUBLIC_KEY, "public key")


def test_marking_an_event_delivered_answers_the_event(world):
    event = get("event", isDelivered="false", limit=1)["events"][0]
    answer = starkbank.request.patch("event/%s" % event["id"], body={"isDelivered": True}).json()["event"]
    assert_shape(answer, EVENT, "updated event")
    assert answer["isDelivered"] is True


def transfer_body(**fields):
    return dict({"amount": 100, "name": "Stark Bank S.A.", "taxId": "20.018.183/0001-80", "bankCode": "20018183",
                 "branchCode": "0001", "accountNumber": "6341320293482496", "accountType": "payment"}, **fields)


def invoice_body(**fields):
    return dict({"amount": 100, "taxId": "012.345.678-90", "name": "Arya Stark"}, **fields)


def post(resource, items):
    plural = resource + "s"
    return lambda: starkbank.request.post(resource, body={plural: items})


@pytest.mark.parametrize("call, expected", [
    # not found: the code names the entity (sdk-python tests/api)
    (lambda: starkbank.invoice.get("0"), ["invalidInvoice"]),
    (lambda: starkbank.transfer.get("0"), ["invalidTransfer"]),
    (lambda: starkbank.invoice.log.get("123"), ["invalidInvoiceLog"]),
    (lambda: starkbank.transfer.log.get("0"), ["invalidTransferLog"]),
    # the body: more than 100, not a list, unknown or missing fields are invalidJson
    (post("invoice", [invoice_body()] * 101), ["invalidJson"]),
    (lambda: starkbank.request.post("invoice", body={"invoices": {}}), ["invalidJson"]),
    (post("invoice", [invoice_body(invalidParameter="invalidValue")]), ["invalidJson"]),
    (post("transfer", [{k: v for k, v in transfer_body().items() if k != "bankCode"}]), ["invalidJson"]),
    # values
    (post("invoice", [invoice_body(taxId="000.000.000-00"), invoice_body(taxId="abc")]),
     ["invalidTaxId", "invalidTaxId"]),
    (post("invoice", [invoice_body(amount="123"), invoice_body(amount=-5), invoice_body(amount=10 ** 15)]),
     ["invalidAmount"] * 3),
    (post("transfer", [transfer_body(amount=0), transfer_body(amount=10 ** 15)]), ["invalidAmount"] * 2),
    (post("transfer", [transfer_body(scheduled="2020-01-01")]), ["invalidDate"]),
    (post("transfer", [transfer_body(scheduled="2020-01-01T10:00:00+00:00")]), ["invalidDateTime"]),
    (lambda: list(starkbank.transfer.log.query(types=["random"])), ["invalidTransferLog"]),
])
def test_documented_cases_get_the_documented_error_codes(world, call, expected):
    assert error_codes(call) == expected


def test_a_repeated_external_id_and_a_change_to_a_canceled_invoice_are_refused_with_their_codes(world):
    repeated = post("transfer", [transfer_body(externalId="shape-1")])
    assert error_codes(repeated) == ["invalidExternalId"]
    canceled = starkbank.invoice.create([starkbank.Invoice(amount=10, tax_id="012.345.678-90", name="A")])[0]
    starkbank.invoice.update(canceled.id, status="canceled")
    assert error_codes(lambda: starkbank.invoice.update(canceled.id, amount=4321)) == ["invalidOperation"]
