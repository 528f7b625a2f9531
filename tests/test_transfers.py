"""transfers: the Sender against the emulator: one transfer per external id, whatever the failures."""

import random

import pytest

from stark_challenge.bank import Bank
from stark_challenge.store import LEASE_S
from stark_challenge.transfers import MAX_TRIES, Sender

from support import sdk_config

@pytest.fixture
def store(any_store):
    """Every test of this module runs on both backends."""
    return any_store


EXT = "stark-challenge-inv-77"


@pytest.fixture
def sender(sdk, store, clock):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    store.add_credit("77", "ev1", 10000, 50, EXT, clock())
    return Sender(store, bank, "stark-challenge", clock, rng=random.Random(1))


def test_a_due_transfer_is_sent_once_with_its_tags(emulator, sender, store):
    assert sender.send_due() == 1
    assert sender.send_due() == 0
    (t,) = emulator.transfers()
    assert (t["amount"], t["externalId"], t["tags"]) == (9950, EXT, ["stark-challenge", "invoice-77", EXT])
    stored = store.transfer(EXT)
    assert (stored.state, stored.transfer_id, stored.tries) == ("created", t["id"], 1)


def test_a_lost_answer_is_settled_by_lookup_not_sent_again(emulator, sender, store):
    emulator.fail_next_after("POST", "/v2/transfer")
    sender.send_due()
    (t,) = emulator.transfers()
    assert store.transfer(EXT).transfer_id == t["id"]
    assert store.transfer(EXT).state in ("created", "processing", "success")  # it moves on meanwhile
    assert [r["path"] for r in emulator.requests if r["method"] == "POST"].count("/v2/transfer") == 1


def test_a_lost_answer_and_a_failed_lookup_retry_with_the_same_external_id(emulator, sender, store, clock):
    emulator.fail_next_after("POST", "/v2/transfer")
    emulator.fail_next("GET", "/v2/transfer", status=500)
    sender.send_due()
    assert store.transfer(EXT).state == "pending"  # unknown: retry later
    clock.advance(3600)
    sender.send_due()  # Stark Bank refuses the duplicate external id; the lookup then finds it
    (t,) = emulator.transfers()
    assert store.transfer(EXT).transfer_id == t["id"]
    assert store.transfer(EXT).state in ("created", "processing", "success")


def test_server_errors_back_off_then_succeed(emulator, sender, store, clock):
    emulator.fail_next("POST", "/v2/transfer", count=2, status=500)
    sender.send_due()
    assert store.transfer(EXT).state == "pending" and sender.send_due() == 0  # backing off
    clock.advance(3600)
    sender.send_due()
    clock.advance(3600)
    sender.send_due()
    assert store.transfer(EXT).state == "created" and len(emulator.transfers()) == 1


def test_a_refusal_is_recorded_with_its_codes_and_not_retried(emulator, sender, store, clock):
    emulator.fail_next("POST", "/v2/transfer", status=400)
    sender.send_due()
    t = store.transfer(EXT)
    assert t.state == "rejected" and t.errors == (("injectedFault", "injected by the emulator"),)
    clock.advance(86400)
    assert sender.send_due() == 0 and emulator.transfers() == []


def test_unanswered_tries_are_bounded_then_resumed_at_start_up(emulator, sender, store, clock):
    emulator.fail_next("POST", "/v2/transfer", count=MAX_TRIES, status=500)
    for _ in range(MAX_TRIES + 2):
        sender.send_due()
        clock.advance(3600)
    assert store.transfer(EXT).state == "stalled"
    assert store.transfer(EXT).tries == MAX_TRIES
    assert sender.recover() == 1  # a restart tries again
    sender.send_due()
    assert store.transfer(EXT).state == "created" and len(emulator.transfers()) == 1


def test_a_crash_mid_call_is_settled_at_start_up(emulator, sender, store, clock):
    store.claim_transfer(EXT, clock())  # the process died after claiming, before or during the call
    # On a shared database the claim is left alone until its lease ends (its holder may be alive).
    assert sender.recover() == (0 if store.backend == "postgres" else 1)
    clock.advance(LEASE_S)
    assert sender.recover() == (1 if store.backend == "postgres" else 0)
    assert store.transfer(EXT).state == "pending"  # nothing at Stark Bank: send it (after the backoff)
    clock.advance(60)
    sender.send_due()
    assert len(emulator.transfers()) == 1
