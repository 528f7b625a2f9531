"""An operator's retry of a stuck transfer (``resend.retry``) and its door, ``POST /transfers/retry``:
the real store, the real SDK against the emulator."""

import base64
import datetime
import json
from http import HTTPStatus

import pytest

from stark_challenge import resend
from stark_challenge.bank import Bank
from stark_challenge.errors import BankUnavailable
from stark_challenge.vocabulary import external_id
from stark_challenge.gate import Gate
from stark_challenge.verify import Signatures
from stark_challenge.wire import Request

from support import sdk_config

@pytest.fixture
def store(any_store):
    """Every test of this module runs on both backends."""
    return any_store


TAG = "stark-challenge"
NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.timezone.utc)


@pytest.fixture
def bank(sdk):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    return bank


def credit(store, invoice_id="5000000000000001", amount=10_000, fee=50):
    store.add_credit(invoice_id, "ev-" + invoice_id, amount, fee, external_id(TAG, invoice_id, 1), NOW)
    return store.attempts(invoice_id)[0]


def rows(store, invoice_id="5000000000000001"):
    return [(t.attempt, t.external_id, t.state) for t in store.attempts(invoice_id)]


def test_the_automatic_second_attempt_and_an_operator_retry_cannot_both_queue_one(store, bank):
    first = credit(store)
    store.claim_transfer(first.external_id, NOW)
    store.transfer_created(first.external_id, "7000000000000001", "created", NOW)
    store.apply_transfer_status(first.external_id, "7000000000000001", "failed", [("", "closed")], NOW,
                                retry_external_id=external_id(TAG, first.invoice_id, 2), confirmed_failed=True)
    assert rows(store) == [(1, first.external_id, "failed"), (2, first.external_id + "-2", "pending")]

    outcome = resend.retry(store, bank, TAG, first.invoice_id, NOW)
    assert outcome.code == "resent" and "attempt 2" in outcome.message and "is pending" in outcome.message
    assert not store.queue_attempt(first.invoice_id, 1, first.external_id + "-2", NOW)
    assert rows(store) == [(1, first.external_id, "failed"), (2, first.external_id + "-2", "pending")]


def test_an_attempt_without_a_definite_answer_is_sent_again_under_its_own_external_id(store, bank, emulator):
    first = credit(store)
    store.claim_transfer(first.external_id, NOW)
    store.retry_transfer(first.external_id, [("", "no answer")], NOW + datetime.timedelta(minutes=5), NOW)

    outcome = resend.retry(store, bank, TAG, first.invoice_id, NOW)
    assert outcome.code == "resent" and "same external id" in outcome.message
    assert rows(store) == [(1, first.external_id, "pending")]  # no second attempt: the first may still land
    assert store.transfer(first.external_id).next_try_at == NOW  # due now
    assert emulator.requests == []  # nothing asked of Stark Bank, nothing sent


def test_an_attempt_stark_bank_said_exists_is_looked_up_never_replaced(store, bank):
    first = credit(store)
    store.claim_transfer(first.external_id, NOW)
    store.settle_transfer(first.external_id, "exists", [("invalidExternalId", "already used")], NOW,
                          next_try_at=NOW + datetime.timedelta(minutes=5))
    outcome = resend.retry(store, bank, TAG, first.invoice_id, NOW)
    assert outcome.code == "resent" and "never sent again" in outcome.message
    assert rows(store) == [(1, first.external_id, "exists")]
    assert store.transfer(first.external_id).next_try_at == NOW


def test_nothing_is_queued_while_stark_bank_does_not_answer(store, bank, emulator):
    first = credit(store)
    store.claim_transfer(first.external_id, NOW)
    store.settle_transfer(first.external_id, "rejected", [("invalidBranchCode", "bad")], NOW)
    emulator.fail_next("GET", "/v2/transfer", count=1, status=500)
    with pytest.raises(BankUnavailable):
        resend.retry(store, bank, TAG, first.invoice_id, NOW)
    assert rows(store) == [(1, first.external_id, "rejected")]


def _gate(store, bank, config, calls):
    def retry(invoice_id):
        calls.append(invoice_id)
        return resend.retry(store, bank, TAG, invoice_id, NOW)
    return Gate(store, Signatures(bank.fetch_public_key), config, lambda: NOW, retry=retry)


def _post(gate, body, user="ops", password="pw"):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return gate.admit(Request("POST", "/transfers/retry", {"Authorization": "Basic " + token}, body, "127.0.0.1"))


def test_the_retry_door_answers_each_case_with_its_status(store, bank, sdk, emulator):
    calls = []
    config = sdk_config(sdk, OPERATOR_USERNAME="ops", OPERATOR_PASSWORD="pw", WEBHOOK_USERNAME="stark",
                        WEBHOOK_PASSWORD="hook")
    gate = _gate(store, bank, config, calls)
    first = credit(store)

    assert _post(gate, b'{"invoice_id": "1"}', password="wrong").status == HTTPStatus.UNAUTHORIZED
    assert _post(gate, b'{"invoice_id": "1"}', "stark", "hook").status == HTTPStatus.UNAUTHORIZED  # the webhook's
    for body in (None, b"", b"[]", b'{"invoice_id": 5}', b'{"invoice_id": "../x"}', b"{" * 100_000):
        assert _post(gate, body).status == HTTPStatus.BAD_REQUEST, body
    assert calls == []
    answer = _post(gate, b'{"invoice_id": "999"}')
    assert (answer.status, answer.body["outcome"]) == (HTTPStatus.NOT_FOUND, "unknown")
    answer = _post(gate, json.dumps({"invoice_id": first.invoice_id}).encode())
    assert (answer.status, answer.body["outcome"]) == (HTTPStatus.OK, "resent")
    assert "is pending" in answer.body["message"] and "same external id" in answer.body["message"]
    store.claim_transfer(first.external_id, NOW)
    store.transfer_created(first.external_id, "7000000000000009", "success", NOW)
    answer = _post(gate, json.dumps({"invoice_id": first.invoice_id}).encode())
    assert (answer.status, answer.body["outcome"]) == (HTTPStatus.CONFLICT, "refused")
    assert "is success" in answer.body["message"]
    first = credit(store, "5000000000000002")

    store.claim_transfer(first.external_id, NOW)
    store.settle_transfer(first.external_id, "rejected", [("invalidBranchCode", "bad")], NOW)
    emulator.fail_next("GET", "/v2/transfer", count=1, status=500)
    answer = _post(gate, json.dumps({"invoice_id": first.invoice_id}).encode())
    assert answer.status == HTTPStatus.SERVICE_UNAVAILABLE and "nothing queued" in answer.body["error"]
    answer = _post(gate, json.dumps({"invoice_id": first.invoice_id}).encode())
    assert (answer.status, answer.body["outcome"]) == (HTTPStatus.OK, "queued")
    assert rows(store, first.invoice_id) == [(1, first.external_id, "rejected"),
                                             (2, first.external_id + "-2", "pending")]

    # Without the operator's credentials configured, there is no door: it would let anyone queue money.
    open_gate = _gate(store, bank, sdk_config(sdk, WEBHOOK_USERNAME="ops", WEBHOOK_PASSWORD="pw"), calls)
    before = list(calls)
    assert _post(open_gate, json.dumps({"invoice_id": first.invoice_id}).encode()).status == HTTPStatus.NOT_FOUND
    assert calls == before
