"""Batched transfers: the Sender against the emulator, several transfers per create call.

Every test reads the outcome from the emulator's records (its transfers and the calls it
answered) and the store: each transfer made exactly once, whatever the failure.
"""

import random

import pytest
import starkbank

from stark_challenge.bank import MAX_PER_CALL, Bank
from stark_challenge.errors import BankRejected
from stark_challenge.vocabulary import external_id
from stark_challenge.transfers import Sender

from support import sdk_config

TAG = "stark-challenge"
INVOICES = ("71", "72", "73")


@pytest.fixture
def bank(sdk):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    return bank


@pytest.fixture
def sender(bank, store, clock):
    return Sender(store, bank, TAG, clock, rng=random.Random(1))


def credit(store, clock, invoices=INVOICES):
    """Queue one transfer per invoice (net amount 10000 + its id - 50 cents); return their external ids."""
    for invoice in invoices:
        store.add_credit(invoice, f"ev-{invoice}", 10000 + int(invoice), 50, external_id(TAG, invoice, 1), clock())
    return [external_id(TAG, invoice, 1) for invoice in invoices]


def transfer_posts(emulator):
    return [c["status"] for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]


def made_once(emulator, external_ids):
    """Assert that the emulator holds exactly one transfer per external id, with its tags and amount."""
    made = [t for t in emulator.transfers() if t["externalId"] in external_ids]
    assert sorted(t["externalId"] for t in made) == sorted(external_ids)
    for t in made:
        invoice = t["tags"][1].removeprefix("invoice-")
        assert t["tags"] == [TAG, f"invoice-{invoice}", t["externalId"]]
        assert t["amount"] == 10000 + int(invoice) - 50
    return {t["externalId"]: t for t in made}


def test_due_transfers_go_in_one_call_each_with_its_own_external_id_and_tags(emulator, sender, store, clock):
    ids = credit(store, clock)
    assert sender.send_due() == 3
    assert transfer_posts(emulator) == [200]
    made = made_once(emulator, ids)
    for ext in ids:
        stored = store.transfer(ext)
        assert (stored.state, stored.transfer_id, stored.tries) == ("created", made[ext]["id"], 1)
    assert sender.send_due() == 0


def test_a_call_takes_at_most_a_hundred_and_the_rest_goes_in_the_next(emulator, sender, store, clock):
    ids = credit(store, clock, [str(n) for n in range(1000, 1000 + MAX_PER_CALL + 1)])
    assert sender.send_due() == MAX_PER_CALL
    assert sender.send_due() == 1
    assert transfer_posts(emulator) == [200, 200]
    made_once(emulator, ids)


def test_a_second_attempt_row_goes_in_the_batch_like_a_first(emulator, sender, store, clock):
    (first,) = credit(store, clock, ["70"])
    sender.send_due()
    made = made_once(emulator, [first])
    retry = external_id(TAG, "70", 2)
    store.apply_transfer_status(first, made[first]["id"], "failed", [], clock(), retry_external_id=retry,
                                confirmed_failed=True)
    ids = credit(store, clock)
    assert sender.send_due() == 4
    assert transfer_posts(emulator) == [200, 200]
    assert store.transfer(retry).state == "created"
    assert [t["externalId"] for t in emulator.transfers()].count(retry) == 1
    made_once(emulator, ids)


def test_a_refused_batch_is_sent_one_per_call_so_only_the_bad_transfer_is_rejected(emulator, sdk, sender, store,
                                                                                    clock):
    ids = credit(store, clock)
    # Someone else's transfer already uses the second external id (without our tags): Stark
    # Bank refuses the whole batch for it, and then only that transfer on its own.
    starkbank.transfer.create([starkbank.Transfer(
        amount=1, name="Other", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
        account_number="6341320293482496", account_type="payment", external_id=ids[1], tags=["other"])])
    sender.send_due()
    assert transfer_posts(emulator) == [200, 400, 200, 400, 200]  # theirs, the batch, then one per call
    made = made_once(emulator, [ids[0], ids[2]])
    assert store.transfer(ids[0]).transfer_id == made[ids[0]]["id"]
    assert store.transfer(ids[2]).transfer_id == made[ids[2]]["id"]
    exists = store.transfer(ids[1])  # Stark Bank says a transfer with its external id exists: never sent again
    assert exists.state == "exists" and exists.errors[0][0] == "invalidExternalId"
    clock.advance(86400)
    assert sender.send_due() == 0
    assert sender.check_due(states=("exists",)) == 1 and store.transfer(ids[1]).state == "exists"  # not ours to find: it stays open
    assert transfer_posts(emulator) == [200, 400, 200, 400, 200]


def test_a_call_takes_one_to_a_hundred_transfers(bank):
    with pytest.raises(ValueError):
        bank.create_transfers([])
    with pytest.raises(ValueError):
        bank.create_transfers([(100, f"x-{n}", []) for n in range(MAX_PER_CALL + 1)])


def test_the_emulator_refuses_a_batch_repeating_an_external_id_within_itself(emulator, bank):
    item = (100, "stark-challenge-inv-dup", ["x"])
    with pytest.raises(BankRejected) as refused:
        bank.create_transfers([item, item])
    assert [code for code, _ in refused.value.errors] == ["invalidExternalId"]
    assert "Element 1" in refused.value.errors[0][1] and emulator.transfers() == []


def test_a_lost_batch_answer_is_settled_by_looking_each_transfer_up(emulator, sender, store, clock):
    ids = credit(store, clock)
    emulator.fail_next_after("POST", "/v2/transfer")
    sender.send_due()
    made = made_once(emulator, ids)
    (post,) = [c for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]
    assert post["dropped"]  # performed, never answered
    for ext in ids:
        assert store.transfer(ext).transfer_id == made[ext]["id"]


def test_a_lost_batch_answer_with_lookups_failing_retries_the_same_external_ids(emulator, sender, store, clock):
    ids = credit(store, clock)
    emulator.fail_next_after("POST", "/v2/transfer")
    emulator.fail_next("GET", "/v2/transfer", status=503)
    sender.send_due()
    # One lookup went unanswered: the others were not even tried, all wait for a retry.
    assert [store.transfer(ext).state for ext in ids] == ["pending"] * 3
    assert len([c for c in emulator.requests if c["method"] == "GET" and c["path"] == "/v2/transfer"]) == 1
    clock.advance(3600)
    sender.send_due()  # the batch is refused (duplicates), then each is refused and found by lookup
    made = made_once(emulator, ids)
    for ext in ids:
        assert store.transfer(ext).transfer_id == made[ext]["id"]
    assert transfer_posts(emulator)[1:] == [400, 400, 400, 400]


def test_an_unanswered_batch_is_retried_as_a_batch_after_the_backoff(emulator, sender, store, clock):
    ids = credit(store, clock)
    emulator.fail_next("POST", "/v2/transfer", status=500)
    sender.send_due()
    assert [(store.transfer(ext).state, store.transfer(ext).tries) for ext in ids] == [("pending", 1)] * 3
    clock.advance(3600)
    assert sender.send_due() == 3
    made_once(emulator, ids)
    assert transfer_posts(emulator) == [500, 200]


def test_a_crash_during_a_batch_call_is_settled_at_start_up(emulator, bank, sender, store, clock):
    ids = credit(store, clock)
    assert store.claim_transfers(ids, clock(), "crashed", clock()) == ids  # claimed together, then the process died
    bank.create_transfers([(10000 + int(i) - 50, ext, [TAG, f"invoice-{i}", ext]) for i, ext in zip(INVOICES, ids)])
    restarted = Sender(store, bank, TAG, clock, rng=random.Random(2))
    assert restarted.recover() == 3
    made = made_once(emulator, ids)
    for ext in ids:
        assert store.transfer(ext).transfer_id == made[ext]["id"]
    assert restarted.send_due() == 0


def test_stopping_during_the_one_per_call_fallback_puts_the_rest_back_to_pending(emulator, sender, store, clock):
    ids = credit(store, clock)
    emulator.fail_next("POST", "/v2/transfer", status=400)
    asked = []
    sender.send_due(stopping=lambda: asked.append(1) or len(asked) > 1)  # stop after the first single call
    assert transfer_posts(emulator) == [400, 200]
    assert [store.transfer(ext).state for ext in ids] == ["created", "pending", "pending"]
    assert sender.send_due() == 2
    made_once(emulator, ids)


def test_stopping_while_settling_an_unanswered_batch_puts_the_rest_back_to_pending(emulator, sender, store, clock):
    ids = credit(store, clock)
    emulator.set(transfer_delay_s=3600)  # the lookup finds it 'created' however slow this machine is
    emulator.fail_next_after("POST", "/v2/transfer")
    asked = []
    sender.send_due(stopping=lambda: asked.append(1) or len(asked) > 1)  # stop after the first lookup
    assert store.transfer(ids[0]).state == "created"
    assert [store.transfer(ext).state for ext in ids[1:]] == ["pending", "pending"]
    sender.send_due()  # refused as duplicates, then found one by one
    made = made_once(emulator, ids)
    for ext in ids:
        assert store.transfer(ext).transfer_id == made[ext]["id"]
