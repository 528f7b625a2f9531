"""transfers: the Sender against the emulator: one transfer per external id, whatever the failures."""

import random

import pytest

from stark_challenge.bank import Bank
from stark_challenge.transfers import MAX_BACKOFF_S, Sender

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


def test_unanswered_tries_go_on_under_the_same_external_id_with_a_capped_backoff(emulator, sender, store, clock):
    emulator.fail_next("POST", "/v2/transfer", count=12, status=500)
    emulator.fail_next("GET", "/v2/transfer", count=12, status=400)  # and every lookup refused
    for _ in range(12):
        assert sender.send_due() == 1
        t = store.transfer(EXT)
        assert t.state == "pending" and (t.next_try_at - clock()).total_seconds() <= MAX_BACKOFF_S
        clock.advance(MAX_BACKOFF_S)
    sender.send_due()
    assert store.transfer(EXT).state == "created" and len(emulator.transfers()) == 1
    sent = [c for c in emulator.requests if (c["method"], c["path"]) == ("POST", "/v2/transfer")]
    assert len(sent) == 13 and store.transfer(EXT).tries == 13


def test_a_refusal_after_unanswered_tries_is_not_final(emulator, sender, store, clock):
    # An earlier create may still land: only the external id's one create call can prove nothing was made.
    emulator.fail_next("POST", "/v2/transfer", status=500)
    sender.send_due()
    emulator.fail_next("POST", "/v2/transfer", status=400)
    clock.advance(3600)
    sender.send_due()
    assert store.transfer(EXT).state == "pending"
    clock.advance(3600)
    sender.send_due()
    assert store.transfer(EXT).state == "created" and len(emulator.transfers()) == 1


def test_a_crash_mid_call_is_settled_at_start_up(emulator, sender, store, clock):
    store.claim_transfer(EXT, clock())  # the process died after claiming, before or during the call
    assert sender.recover() == 1
    assert store.transfer(EXT).state == "pending"  # nothing at Stark Bank: sent again under its external id
    sender.send_due()
    assert len(emulator.transfers()) == 1


def test_a_duplicate_refusal_whose_lookup_gets_a_5xx_is_looked_up_until_found_never_sent_again(
        emulator, sender, store, clock):
    emulator.fail_next_after("POST", "/v2/transfer")  # made at Stark Bank, the answer lost
    emulator.fail_next("GET", "/v2/transfer", status=503)  # and the lookup after it unanswered
    sender.send_due()
    assert store.transfer(EXT).state == "pending"
    clock.advance(3600)
    emulator.fail_next("GET", "/v2/transfer", status=502)
    sender.send_due()  # refused: the external id exists; its lookup unanswered again
    assert store.transfer(EXT).state == "exists"
    clock.advance(86400)
    assert sender.send_due() == 0  # never sent again
    assert sender.check_due() == 1  # looked up: found
    (t,) = emulator.transfers()
    assert store.transfer(EXT).transfer_id == t["id"] and store.transfer(EXT).state in ("created", "processing",
                                                                                          "success")
    sent = [c for c in emulator.requests if (c["method"], c["path"]) == ("POST", "/v2/transfer")]
    assert [c["external_ids"] for c in sent] == [[EXT], [EXT]] and [c["status"] for c in sent] == [200, 400]


def test_recovery_while_lookups_fail_sends_nothing_blind_and_settles_once_they_answer(emulator, sender, store, clock):
    assert store.claim_transfer(EXT, clock(), "gone", clock())  # the process died during the create call
    emulator.fail_next("GET", "/v2/transfer", count=2, status=500)
    assert sender.recover() == 1
    assert store.transfer(EXT).state == "sending" and sender.send_due() == 0  # unsettled: held, not sent
    clock.advance(3600)  # past the lease taken at recovery
    assert sender.check_due() == 1 and store.transfer(EXT).state == "sending"  # the lookup fails again
    clock.advance(3600)
    assert sender.check_due() == 1  # answered: nothing there, so it is sent again under its external id
    assert store.transfer(EXT).state == "pending"
    assert sender.send_due() == 1 and store.transfer(EXT).state == "created"
    assert [c["external_ids"] for c in emulator.requests if c["method"] == "POST"] == [[EXT]]
