"""Creating transfers raw (``starkbank.request.post``, JSON in and out) against the emulator: the
fields sent and read back, Stark Bank's refusals kept as (code, message) pairs, every other
answer (no answer, another status, a 200 that lists no transfers) unavailable; and a batch
answer recorded at once in the store, one log line per transfer."""

import logging
import random

import pytest
import starkbank
from ellipticcurve import PrivateKey

from stark_challenge import bank as bank_module
from stark_challenge.bank import Bank
from stark_challenge.errors import BankRejected, BankUnavailable
from stark_challenge.report import reais
from stark_challenge.vocabulary import external_id
from stark_challenge.transfers import Sender
from stark_challenge.vocabulary import transfer_tags

from support import sdk_config, wait_for

TAG = "stark-challenge"


@pytest.fixture
def bank(sdk):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    return bank


def items(*numbers):
    """(amount, external id, tags) of one transfer per number: amount 1000 + number cents."""
    return [(1000 + n, f"{TAG}-t-{n}", [TAG, f"invoice-{n}", f"{TAG}-t-{n}"]) for n in numbers]


def test_each_transfer_of_the_answer_is_the_one_made_at_its_place(emulator, bank):
    sent = bank.create_transfers(items(3, 1, 2))
    made = {t["externalId"]: t for t in emulator.transfers()}
    assert [t["external_id"] for t in sent] == [f"{TAG}-t-3", f"{TAG}-t-1", f"{TAG}-t-2"]
    for answer in sent:
        t = made[answer["external_id"]]
        assert answer == {"id": t["id"], "amount": t["amount"], "status": "created",
                          "external_id": t["externalId"], "tags": t["tags"]}
        assert type(answer["amount"]) is int
        assert (t["bankCode"], t["branchCode"], t["accountNumber"], t["taxId"], t["name"], t["accountType"]) == (
            "20018183", "0001", "6341320293482496", "20.018.183/0001-80", "Stark Bank S.A.", "payment")
    assert sorted(t["amount"] for t in made.values()) == [1001, 1002, 1003]


def test_a_refused_batch_keeps_stark_banks_errors_and_makes_nothing(emulator, bank):
    bank.create_transfers(items(2))
    with pytest.raises(BankRejected) as refused:
        bank.create_transfers(items(1, 2, 3))  # the second repeats an external id
    ((code, message),) = refused.value.errors
    assert code == "invalidExternalId" and message.startswith("Element 1:")
    assert "invalidExternalId" in str(refused.value)
    assert sorted(t["externalId"] for t in emulator.transfers()) == [f"{TAG}-t-2"]


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500, 502, 503])
def test_any_other_refusal_is_unavailable_and_nothing_is_made(emulator, bank, status):
    emulator.fail_next("POST", "/v2/transfer", status=status)
    with pytest.raises(BankUnavailable, match=f"answered {status}"):
        bank.create_transfers(items(1, 2))
    assert emulator.transfers() == []


def test_an_answer_that_lists_no_transfers_is_unavailable(emulator, bank):
    emulator.fail_next("POST", "/v2/transfer", status=200)  # a 200 whose body holds only "errors"
    with pytest.raises(BankUnavailable, match="unreadable answer"):
        bank.create_transfers(items(1))


def test_a_call_without_an_answer_is_unavailable_though_it_may_have_been_made(emulator, bank):
    emulator.fail_next_after("POST", "/v2/transfer")
    with pytest.raises(BankUnavailable, match="no answer"):
        bank.create_transfers(items(1, 2))
    assert sorted(t["externalId"] for t in emulator.transfers()) == [f"{TAG}-t-1", f"{TAG}-t-2"]


def test_a_call_answered_after_the_bank_timeout_is_unavailable(emulator, sdk):
    bank = Bank(sdk_config(sdk, BANK_TIMEOUT="1s"))
    bank.configure()
    emulator.answer_late("POST", "/v2/transfer", delay_s=30)
    with pytest.raises(BankUnavailable, match="no answer"):
        bank.create_transfers(items(1))
    emulator.answer_held_calls()
    wait_for(lambda: [t["externalId"] for t in emulator.transfers()] == [f"{TAG}-t-1"],
             message="the held call carried out")


def test_the_call_is_signed_with_our_key(emulator, sdk):
    stranger = Bank(sdk_config(sdk, STARK_PRIVATE_KEY=bank_module.new_key_pair()[0]))
    stranger.configure()
    with pytest.raises(BankUnavailable, match="answered 401"):
        stranger.create_transfers(items(1))
    assert emulator.transfers() == []


@pytest.mark.parametrize("made", [
    None,
    "transfer",
    {"externalId": f"{TAG}-t-1"},  # no id
    {"id": 5, "externalId": f"{TAG}-t-1"},
    {"id": "", "externalId": f"{TAG}-t-1"},
    {"id": "5", "externalId": f"{TAG}-t-2"},  # another transfer's place
    {"id": "5"},
])
def test_an_answered_transfer_that_is_not_the_one_sent_there_is_unavailable(made):
    with pytest.raises(BankUnavailable, match=f"{TAG}-t-1"):
        bank_module._created_transfer(made, f"{TAG}-t-1", "create 2 transfers")


def credit(store, clock, invoices):
    for invoice in invoices:
        store.add_credit(invoice, f"ev-{invoice}", 10000 + int(invoice), 50, external_id(TAG, invoice, 1), clock())
    return [external_id(TAG, invoice, 1) for invoice in invoices]


def test_a_batch_answer_is_recorded_with_one_log_line_per_transfer(emulator, bank, store, clock, caplog):
    ids = credit(store, clock, ["81", "82", "83"])
    sender = Sender(store, bank, TAG, clock, rng=random.Random(1))
    with caplog.at_level(logging.INFO, logger="stark_challenge.transfers"):
        assert sender.send_due() == 3
    made = {t["externalId"]: t for t in emulator.transfers()}
    assert [(store.transfer(ext).state, store.transfer(ext).transfer_id) for ext in ids] == [
        ("created", made[ext]["id"]) for ext in ids]
    sent = [r for r in caplog.records if " fee = " in r.getMessage()]
    assert [r.getMessage() for r in sent] == [
        f"invoice {i}: {reais(10000 + int(i))} - R$ 0.50 fee = {reais(10000 + int(i) - 50)}, transfer {made[ext]['id']}"
        for i, ext in zip(["81", "82", "83"], ids)
    ]
    assert [r.fields for r in sent] == [  # the ids and cents, as journald and JSON fields
        {"invoice_id": i, "transfer_id": made[ext]["id"], "external_id": ext, "amount_cents": 10000 + int(i),
         "fee_cents": 50, "net_cents": 10000 + int(i) - 50} for i, ext in zip(["81", "82", "83"], ids)]
    assert all(made[ext]["tags"] == transfer_tags(TAG, i, ext) for i, ext in zip(["81", "82", "83"], ids))


def test_a_refused_element_is_isolated_and_the_others_recorded(emulator, bank, store, clock):
    ids = credit(store, clock, ["91", "92", "93"])
    bank.create_transfers([(1, ids[2], ["someone-else"])])  # the third's external id is taken
    sender = Sender(store, bank, TAG, clock, rng=random.Random(1))
    assert sender.send_due() == 3
    made = {t["externalId"]: t for t in emulator.transfers() if TAG in t["tags"]}
    assert sorted(made) == ids[:2]
    assert [store.transfer(ext).transfer_id for ext in ids[:2]] == [made[ext]["id"] for ext in ids[:2]]
    refused = store.transfer(ids[2])  # the external id exists: looked up until found, never sent again
    assert refused.state == "exists" and refused.errors[0][0] == "invalidExternalId"


def test_transfers_created_keeps_a_higher_state_and_skips_unknown_ids(store, clock):
    ids = credit(store, clock, ["61", "62"])
    store.claim_transfers(ids, clock(), "me", clock())
    store.transfer_created(ids[1], "9001", "success", clock())  # its event beat the answer
    store.transfers_created([(ids[0], "8001", "created"), (ids[1], "9001", "created"),
                             ("not-ours", "7001", "created")], clock())
    assert [(store.transfer(e).state, store.transfer(e).transfer_id) for e in ids] == [
        ("created", "8001"), ("success", "9001")]
    assert store.transfer("not-ours") is None


def test_credits_are_read_for_several_invoices_at_once(store, clock):
    credit(store, clock, ["51", "52"])
    assert store.credits(["51", "52", "53"]) == {"51": store.credit("51"), "52": store.credit("52")}
    assert store.credits([]) == {}


def test_the_private_key_is_parsed_once_and_signs_every_call(emulator, bank, sdk):
    key = starkbank.user.private_key()
    assert starkbank.user.private_key() is key
    assert key.toPem().strip() == PrivateKey.fromPem(sdk["private_key"]).toPem().strip()
    bank.create_transfers(items(1))
    bank.create_transfers(items(2))
    assert [c["status"] for c in emulator.requests if c["path"] == "/v2/transfer"] == [200, 200]
