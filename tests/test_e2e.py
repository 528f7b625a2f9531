"""End to end: the service as a user runs it (a subprocess configured by environment) against
the emulator, through the real SDK. Every assertion reads the emulator's own records."""

import concurrent.futures
import json
import re

from stark_challenge.taxid import is_valid_tax_id

from support import query, service_settled, signed_event, wait_for


def _settled(emulator, service):
    """Return True when every credited invoice has its transfer and no event is unprocessed."""
    credited = {i["id"] for i in emulator.invoices() if i["status"] == "paid"}
    transferred = {t["tags"][1].removeprefix("invoice-") for t in emulator.transfers()}
    return credited and credited <= transferred


def test_rounds_are_issued_on_schedule_with_valid_invoices(emulator, service_factory):
    service = service_factory(INVOICE_INTERVAL="1s", INVOICE_DURATION="3s", INVOICE_MIN=8, INVOICE_MAX=12)
    service.start()

    wait_for(lambda: len({tuple(i["tags"]) for i in emulator.invoices()}) >= 3, message="3 rounds")
    # The schedule is over once /status says so: counted after that, no round can follow.
    wait_for(lambda: service.operate("GET", "/status")[1]["service"]["scheduler"]["state"] == "finished",
             message="finished")

    invoices = emulator.invoices()
    rounds = {}
    for invoice in invoices:
        round_tag = next(t for t in invoice["tags"] if t.startswith("round-"))
        rounds.setdefault(round_tag, []).append(invoice)
    # 1 s over 3 s is exactly 3 rounds (n * interval < duration), then the schedule stops.
    assert sorted(rounds) == ["round-0", "round-1", "round-2"]
    for batch in rounds.values():
        assert 8 <= len(batch) <= 12
    for invoice in invoices:
        assert is_valid_tax_id(invoice["taxId"])
        assert isinstance(invoice["amount"], int) and invoice["amount"] >= 1000
        assert "stark-challenge" in invoice["tags"]
    # One API call per round.
    status, page = service.operate("GET", "/status")
    assert (page["service"]["scheduler"]["rounds_total"], page["service"]["scheduler"]["rounds_issued"]) == (3, 3)
    creates = [r for r in emulator.requests if r["method"] == "POST" and r["path"] == "/v2/invoice"]
    assert len(creates) == 3


def test_every_credited_invoice_is_forwarded_once_minus_fee(emulator, service_factory):
    emulator.set(pay_ratio=0.5, invoice_fee=37)
    service = service_factory(INVOICE_MIN=10, INVOICE_MAX=10)
    service.start()

    wait_for(lambda: len(emulator.invoices()) == 10, message="round 0")
    wait_for(lambda: _settled(emulator, service), message="every credit transferred")
    # Every payment made, delivered and processed, every transfer settled: only then count.
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    assert all(t["status"] == "success" for t in emulator.transfers())

    paid = {i["id"]: i for i in emulator.invoices() if i["status"] == "paid"}
    unpaid = {i["id"] for i in emulator.invoices() if i["status"] != "paid"}
    transfers = emulator.transfers()
    assert len(transfers) == len(paid)
    for t in transfers:
        invoice_id = t["tags"][1].removeprefix("invoice-")
        assert invoice_id in paid and invoice_id not in unpaid
        assert t["amount"] == paid[invoice_id]["amount"] - 37
        assert t["externalId"] == f"stark-challenge-inv-{invoice_id}"
        assert (t["bankCode"], t["branchCode"], t["accountNumber"], t["accountType"]) == (
            "20018183", "0001", "6341320293482496", "payment")
        assert (t["name"], t["taxId"]) == ("Stark Bank S.A.", "20.018.183/0001-80")
    assert service.stop() == 0


def test_duplicate_and_concurrent_redeliveries_change_nothing(emulator, service_factory):
    emulator.set(deliver_times=3, deliver_concurrently=True, pay_ratio=1.0)
    service = service_factory(INVOICE_MIN=8, INVOICE_MAX=8)
    service.start()

    wait_for(lambda: len([i for i in emulator.invoices() if i["status"] == "paid"]) == 8, message="all paid")
    wait_for(lambda: len(emulator.transfers()) == 8, message="8 transfers")
    # Deliver one credited event again by hand, ten times at once, on ten connections.
    credited = next(e for e in emulator.events() if e["log"]["type"] == "credited")
    body = json.dumps({"event": credited}, separators=(",", ":")).encode()
    headers = {"Digital-Signature": emulator.sign(body)}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: service.request("POST", "/webhook", body, headers), range(10)))
    assert {status for status, _ in answers} == {200}

    wait_for(lambda: service_settled(service, emulator), message="the redeliveries processed")
    assert query(service, "select count(*) from event where id = ?", (credited["id"],)) == [(1,)]
    transfers = emulator.transfers()
    assert len(transfers) == 8
    assert len({t["externalId"] for t in transfers}) == 8


def test_forged_webhooks_are_refused_and_move_no_money(emulator, service_factory):
    service = service_factory(INVOICE_MIN=8, INVOICE_MAX=8)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 8, message="round 0")
    invoice = dict(emulator.invoices()[0], amount=99999, fee=0, status="paid")
    body, headers = signed_event(emulator, "9000000000000001", invoice)

    forged = body.replace(b"99999", b"99998")  # signed body, altered after signing
    assert service.request("POST", "/webhook", forged, headers)[0] == 401
    assert service.request("POST", "/webhook", body, {})[0] == 401  # no signature
    assert service.request("POST", "/webhook", body, {"Digital-Signature": "not base64"})[0] == 401
    other_key = headers["Digital-Signature"][::-1]
    assert service.request("POST", "/webhook", body, {"Digital-Signature": other_key})[0] == 401

    # Nothing was stored: the genuine event is then new, and is forwarded once.
    status, reply = service.request("POST", "/webhook", body, headers)
    assert (status, reply["status"]) == (200, "stored")
    wait_for(lambda: len(emulator.transfers()) == 1, message="the genuine credit's transfer")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    (transfer,) = emulator.transfers()
    assert transfer["amount"] == 99999


def test_no_transfer_for_unpaid_invoices(emulator, service_factory):
    service = service_factory(INVOICE_MIN=9, INVOICE_MAX=9)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 9, message="round 0")
    # The nine "created" events delivered and processed: the service has acted on all it got.
    wait_for(lambda: len([d for d in emulator.deliveries() if d["status"] == 200]) == 9, message="created events")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    status, report = service.operate("GET", "/status")
    assert status == 200 and report["events"]["received"] == 9
    assert query(service, "select log_type, count(*), count(processed_at) from event group by log_type") == [
        ("created", 9, 9)]
    assert emulator.transfers() == []
    assert query(service, "select count(*) from transfer") == [(0,)]
    assert service.stop() == 0
