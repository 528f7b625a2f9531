"""The emulator's hooks for the crash enumeration, through the real SDK: the tripwire stops a client at
its n-th call before or after Stark Bank acts, held webhooks go one at a time, unused faults are forgotten,
and a call can be carried out yet answered 500."""

import pytest
import starkbank

from stark_challenge.emulator.tripwire import AFTER, BEFORE, call_kind

RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")


def transfer(external_id):
    return starkbank.Transfer(amount=950, external_id=external_id, tags=[external_id], **RECEIVER)


def test_calls_are_numbered_with_their_kind_and_paused_calls_are_not(emulator, sdk):
    starkbank.transfer.create([transfer("trip-1")])
    emulator.tripwire.pause()
    list(starkbank.transfer.query(tags=["trip-1"]))
    emulator.tripwire.resume()
    made = starkbank.transfer.query(tags=["trip-1"])
    starkbank.transfer.get(next(iter(made)).id)

    assert [kind for kind, _ in emulator.tripwire.calls()] == [
        "POST /v2/transfer", "GET /v2/transfer?tags", "GET /v2/transfer/:id"]
    assert call_kind("PATCH", "/v2/event/5012345678901234") == "PATCH /v2/event/:id"


def test_a_call_tripped_before_is_not_carried_out(emulator, sdk):
    stopped = []
    emulator.tripwire.arm(2, BEFORE, lambda: stopped.append(True))
    starkbank.transfer.create([transfer("trip-1")])

    with pytest.raises(starkbank.error.UnknownError):  # the connection is dropped, unanswered
        starkbank.transfer.create([transfer("trip-2")])

    assert stopped == [True]
    assert emulator.tripwire.tripped == (2, BEFORE, "POST /v2/transfer")
    assert [t["externalId"] for t in emulator.transfers()] == ["trip-1"]
    starkbank.transfer.create([transfer("trip-3")])  # used up: the next call goes through
    assert stopped == [True]


def test_a_call_tripped_after_is_carried_out_and_its_answer_dropped(emulator, sdk):
    stopped = []
    emulator.tripwire.arm(1, AFTER, lambda: stopped.append(len(emulator.transfers())))

    with pytest.raises(starkbank.error.UnknownError):
        starkbank.transfer.create([transfer("trip-1")])

    assert stopped == [1]  # the transfer existed when the client was stopped
    assert [t["externalId"] for t in emulator.transfers()] == ["trip-1"]
    assert emulator.requests[-1].get("dropped") is True


def test_held_webhooks_go_one_at_a_time_and_unused_faults_are_forgotten(emulator, sdk):
    emulator.add_webhook("http://127.0.0.1:9/webhook")  # nothing listens: each delivery fails at once
    emulator.set(hold_deliveries=True, delivery_attempts=1)
    starkbank.transfer.create([transfer("trip-1"), transfer("trip-2")])
    assert emulator.deliveries_held() == 2

    assert emulator.release_deliveries(1) == 1
    assert emulator.deliveries_held() == 1
    emulator.fail_next("POST", "/v2/transfer", status=500)
    emulator.clear_faults()
    starkbank.transfer.create([transfer("trip-3")])  # not refused: the rule was forgotten
    assert [t["externalId"] for t in emulator.transfers()] == ["trip-1", "trip-2", "trip-3"]


def test_a_call_failed_after_it_was_carried_out_is_answered_with_the_status(emulator, sdk):
    emulator.fail_next_after("POST", "/v2/transfer", status=500)

    with pytest.raises(starkbank.error.InternalServerError):
        starkbank.transfer.create([transfer("trip-1")])

    assert [t["externalId"] for t in emulator.transfers()] == ["trip-1"]
    assert [c["status"] for c in emulator.requests] == [500]
