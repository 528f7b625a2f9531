"""Real timeouts: Stark Bank carries a call out after the service's client gave up on it
(``BANK_TIMEOUT``), the case where doubles are born. The emulator holds the call longer
than the timeout (``answer_late``), then performs it and answers a client that is gone.

Each test runs the service as a user runs it and asserts from the emulator's records:
one round of invoices, one transfer, whatever the order in which the late call and the
service's retry reach Stark Bank.
"""

import pytest
import starkbank

from support import query, service_settled, signed_event, wait_for

FEE = 50  # the emulator's default invoice_fee, in cents
LATE_S = 2.5  # how long Stark Bank holds the call: above BANK_TIMEOUT, so the client gives up


def posts(emulator, path):
    return [c for c in emulator.requests if c["method"] == "POST" and c["path"] == path]


def in_flight(emulator, method, path):
    return any(c["method"] == method and c["path"] == path for c in emulator.requests_in_flight)


def test_a_round_whose_create_call_times_out_but_is_carried_out_is_issued_once(emulator, service_factory):
    emulator.answer_late("POST", "/v2/invoice", LATE_S)
    # A 20 s interval retries a round 1-2 s after its failure (60 s: 3-6 s).
    service = service_factory(INVOICE_MIN=4, INVOICE_MAX=4, BANK_TIMEOUT="1s", INVOICE_INTERVAL="20s")
    service.start()
    wait_for(lambda: query(service, "select state, error is not null from round where n = 0") == [("issuing", 1)],
             message="round 0's create call timed out, retry planned")
    assert in_flight(emulator, "POST", "/v2/invoice")  # gave up while Stark Bank still holds it
    emulator.answer_held_calls()  # carried out now, after the service gave up, and before its retry is due

    wait_for(lambda: query(service, "select state, count from round where n = 0") == [("issued", 4)],
             message="round 0 issued", timeout=20)
    wait_for(lambda: not emulator.requests_in_flight, message="the late call answered")
    invoices = emulator.invoices()
    assert len(invoices) == 4
    assert len({next(t for t in i["tags"] if t.startswith("batch-")) for i in invoices}) == 1
    assert [c["status"] for c in posts(emulator, "/v2/invoice")] == [200]  # carried out, never sent again
    assert sorted(r[0] for r in query(service, "select id from invoice")) == sorted(i["id"] for i in invoices)
    assert query(service, "select count(*) from round") == [(1,)]


@pytest.mark.parametrize("duplicates", ["refuse", "fail_later"])
def test_a_transfer_whose_create_call_times_out_but_is_carried_out_is_made_once(emulator, service_factory, duplicates):
    # Both ways Stark Bank is reported to answer a repeated external id: refused at once, or created and failed later.
    emulator.set(duplicate_external_id=duplicates)
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, BANK_TIMEOUT="1s")
    service.start()
    (invoice,) = wait_for(lambda: len(emulator.invoices()) == 1 and emulator.invoices(), message="round 0")
    wait_for(lambda: service_settled(service, emulator), message="start-up settled")

    emulator.answer_late("POST", "/v2/transfer", LATE_S)
    emulator.pay(invoice["id"])
    wait_for(lambda: query(service, "select state, tries from transfer") == [("pending", 1)],
             message="the create call timed out, retry planned")
    assert in_flight(emulator, "POST", "/v2/transfer")  # gave up while Stark Bank still holds it
    emulator.answer_held_calls()  # carried out now, after the service gave up, rather than seconds later

    wait_for(lambda: query(service, "select state from transfer") == [("success",)], message="transfer succeeded",
             timeout=20)
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    ext = f"stark-challenge-inv-{invoice['id']}"
    made = emulator.transfers()
    (transfer,) = [t for t in made if t["status"] == "success"]  # one moved money; a duplicate, if made, failed
    assert all(t["status"] == "failed" for t in made if t is not transfer)
    assert transfer["amount"] == invoice["amount"] - FEE and transfer["externalId"] == ext
    # Every create call sent that one external id. A retry, if it went out before the transfer's
    # own events told the service about it, was refused as a duplicate (or made one that failed),
    # whichever of the two reached Stark Bank first.
    calls = posts(emulator, "/v2/transfer")
    assert {ext for c in calls for ext in c["external_ids"]} == {ext} and len(calls) <= 3
    if duplicates == "refuse":
        statuses = [c["status"] for c in calls]
        assert statuses.count(200) == 1 and set(statuses) <= {200, 400}, statuses
    assert query(service, "select attempt, transfer_id from transfer") == [(1, transfer["id"])]


def test_a_webhook_is_answered_while_a_transfer_call_is_held(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, BANK_TIMEOUT="30s")
    service.start()
    (invoice,) = wait_for(lambda: len(emulator.invoices()) == 1 and emulator.invoices(), message="round 0")
    wait_for(lambda: service_settled(service, emulator), message="start-up settled")

    emulator.answer_late("POST", "/v2/transfer", 20.0)
    emulator.pay(invoice["id"])
    wait_for(lambda: in_flight(emulator, "POST", "/v2/transfer"), message="the transfer call held")
    body, headers = signed_event(emulator, "3000000000000001", {"id": "3000000000000002", "tags": []}, "created")
    status, reply = service.request("POST", "/webhook", body, headers, timeout=10)
    assert (status, reply["status"]) == (200, "stored")
    assert in_flight(emulator, "POST", "/v2/transfer")  # answered without waiting for Stark Bank
    assert query(service, "select state from transfer") == [("sending",)]
    emulator.answer_held_calls()  # the call completes now, so the service stops without waiting it out


def test_the_emulator_carries_out_a_call_answered_after_the_clients_timeout(emulator, sdk):
    # The mechanism the tests above rely on, through the bare SDK.
    starkbank.timeout = 0.5
    emulator.answer_late("POST", "/v2/invoice", 1.5)
    invoice = starkbank.Invoice(amount=1000, name="Arya Stark", tax_id="012.345.678-90", tags=["late"])
    with pytest.raises(starkbank.error.UnknownError):  # the SDK's "no answer": it gave up
        starkbank.invoice.create([invoice])
    assert in_flight(emulator, "POST", "/v2/invoice")
    wait_for(lambda: emulator.invoices(), message="the invoice created after all")
    wait_for(lambda: not emulator.requests_in_flight, message="the late answer sent")
    assert [i["tags"] for i in emulator.invoices()] == [["late"]]
    assert len(list(starkbank.invoice.query(tags=["late"]))) == 1


def test_the_emulator_answers_a_held_call_at_once_when_told_to(emulator, sdk):
    # answer_held_calls, which the tests above use to end a hold they no longer need.
    starkbank.timeout = 0.5
    emulator.answer_late("POST", "/v2/invoice", 600.0)  # far beyond wait_for's deadline
    invoice = starkbank.Invoice(amount=1000, name="Arya Stark", tax_id="012.345.678-90", tags=["held"])
    with pytest.raises(starkbank.error.UnknownError):
        starkbank.invoice.create([invoice])
    assert in_flight(emulator, "POST", "/v2/invoice") and not emulator.invoices()
    emulator.answer_held_calls()
    wait_for(lambda: not emulator.requests_in_flight, message="the held call answered")
    assert [i["tags"] for i in emulator.invoices()] == [["held"]]
