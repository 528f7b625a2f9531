"""webhook: the intake's checks in order, each failure's status, and storage before the 200.

No sockets: ``Gate.admit`` takes a request (headers and the raw body). The key is the emulator's, fetched
through the real SDK; the events are signed with ``ellipticcurve`` as Stark Bank signs them."""

import base64
import concurrent.futures
import json
from http import HTTPStatus

import pytest
from ellipticcurve import Ecdsa, PrivateKey

from stark_challenge.bank import Bank
from stark_challenge.gate import Gate, check_basic_auth
from stark_challenge.verify import Signatures
from stark_challenge.wire import Request

from support import sdk_config, signed_event


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("header, ok", [
    (basic("stark", "s3cret"), True),
    (basic("stark", "s3cret ").replace("Basic", "basic"), False),
    (basic("stark", "s3cre"), False),
    (basic("Stark", "s3cret"), False),
    (basic("stark", ""), False),
    ("Basic " + base64.b64encode(b"starks3cret").decode(), False),
    ("Basic !!!notbase64", False),
    ("Bearer abc", False),
    ("", False),
    (None, False),
])
def test_basic_auth_accepts_only_the_exact_credentials(header, ok):
    assert check_basic_auth(header, "stark", "s3cret") is ok


def test_basic_auth_header_scheme_is_case_insensitive():
    assert check_basic_auth(basic("stark", "s3cret").replace("Basic", "basic"), "stark", "s3cret")


@pytest.fixture
def intake_for(sdk, store, clock):
    woken = []

    def make(**values):
        config = sdk_config(sdk, **values)
        bank = Bank(config)
        bank.configure()
        intake = Gate(store, Signatures(bank.fetch_public_key), config, clock, on_event=lambda: woken.append(1))
        intake.woken = woken
        return intake

    return make


def post(gate, headers, body):
    """Return the Gate's Reply to ``POST /webhook`` with these headers (a dict) and body."""
    return gate.admit(Request("POST", "/webhook", headers, body, "127.0.0.1"))


def stored_events(store):
    return [(e.id, e.subscription, e.log_type) for e in store.pending_events()]


def test_a_genuine_event_is_stored_before_the_200(emulator, intake_for, store):
    intake = intake_for()
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1", "amount": 1000, "fee": 10, "tags": []})
    reply = post(intake, headers, body)
    assert (reply.status, reply.body) == (HTTPStatus.OK, {"status": "stored", "event": "ev-1"})
    assert stored_events(store) == [("ev-1", "invoice", "credited")]
    assert intake.woken == [1]


def test_a_redelivered_event_is_acknowledged_and_not_stored_again(emulator, intake_for, store):
    intake = intake_for()
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: post(intake, headers, body), range(8)))
    assert [r.status for r in replies] == [HTTPStatus.OK] * 8
    assert sorted(r.body["status"] for r in replies) == ["duplicate"] * 7 + ["stored"]
    assert stored_events(store) == [("ev-1", "invoice", "paid")]


@pytest.mark.parametrize("mangle, status", [
    (lambda b, h: (b, {}), HTTPStatus.UNAUTHORIZED),  # no signature
    (lambda b, h: (b.replace(b"1000", b"9000"), h), HTTPStatus.UNAUTHORIZED),  # altered body
    (lambda b, h: (b, {"Digital-Signature": Ecdsa.sign(b.decode(), PrivateKey()).toBase64()}),
     HTTPStatus.UNAUTHORIZED),  # someone else's key
    (lambda b, h: (b, {"Digital-Signature": "garbage"}), HTTPStatus.UNAUTHORIZED),
    (lambda b, h: (b"\xff\xfe" + b, h), HTTPStatus.BAD_REQUEST),  # not UTF-8
])
def test_forged_requests_are_refused_and_store_nothing(emulator, intake_for, store, mangle, status):
    intake = intake_for()
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1", "amount": 1000})
    mangled_body, mangled_headers = mangle(body, headers)
    reply = post(intake, mangled_headers, mangled_body)
    assert reply.status == status and "error" in reply.body
    assert stored_events(store) == []


@pytest.mark.parametrize("document, message", [
    ({"nope": 1}, "expected an object with an 'event' object"),
    ({"event": {"id": "", "subscription": "invoice", "log": {"type": "paid"}}}, "event.id"),
    ({"event": {"id": "e", "subscription": "invoice", "log": {"type": "paid"}}}, "event.log.invoice.id"),
    ({"event": {"id": "e", "subscription": "invoice", "log": []}}, "event.log.type"),
    ([1, 2], "expected an object"),
])
def test_signed_but_malformed_events_get_400(emulator, intake_for, store, document, message):
    intake = intake_for()
    body = json.dumps(document).encode()
    reply = post(intake, {"Digital-Signature": emulator.sign(body)}, body)
    assert reply.status == HTTPStatus.BAD_REQUEST and message in reply.body["error"]
    assert stored_events(store) == []


def test_signed_invalid_json_gets_400(emulator, intake_for, store):
    body = b'{"event": '
    reply = post(intake_for(), {"Digital-Signature": emulator.sign(body)}, body)
    assert reply.status == HTTPStatus.BAD_REQUEST
    assert stored_events(store) == []


def test_unknown_subscriptions_are_stored_and_acknowledged(emulator, intake_for, store):
    body = json.dumps({"event": {"id": "e9", "subscription": "boleto", "log": {"type": "paid", "boleto": {}}}}).encode()
    reply = post(intake_for(), {"Digital-Signature": emulator.sign(body)}, body)
    assert reply.status == HTTPStatus.OK
    assert stored_events(store) == [("e9", "boleto", "paid")]


def test_an_unreachable_key_gets_503_so_stark_bank_delivers_again(emulator, intake_for, store):
    intake = intake_for()
    emulator.fail_next("GET", "/v2/public-key", count=1, status=500)
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"})
    assert post(intake, headers, body).status == HTTPStatus.SERVICE_UNAVAILABLE
    assert stored_events(store) == []


def test_a_closed_store_gets_503(emulator, intake_for, store):
    intake = intake_for()
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"})
    store.close()
    reply = post(intake, headers, body)
    assert reply.status == HTTPStatus.SERVICE_UNAVAILABLE and "internal" not in json.dumps(reply.body)


def test_basic_auth_is_checked_when_configured(emulator, intake_for, store):
    intake = intake_for(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="s3cret")
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    denied = post(intake, {**headers, "Authorization": basic("stark", "wrong")}, body)
    assert denied.status == HTTPStatus.UNAUTHORIZED
    assert dict(denied.headers)["WWW-Authenticate"].startswith("Basic realm=")
    assert stored_events(store) == []
    assert post(intake, {**headers, "Authorization": basic("stark", "s3cret")}, body).status == HTTPStatus.OK
