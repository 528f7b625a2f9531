"""End to end on PostgreSQL: three instances of one deployment share a database behind a round-robin
balancer (each delivery reaches one of them), and instances die by kill -9 after acknowledging credits and
in the middle of a transfer create call. One round per window, every credit forwarded exactly once, the dead one's claim taken over and looked
up at Stark Bank. Assertions read the emulator's own records and the shared database."""

from support import messages_matching, wait_for
from support.databases import rows


def in_flight(emulator, method, path):
    return any(c["method"] == method and c["path"] == path for c in emulator.requests_in_flight)


def transfers_by_invoice(emulator):
    found = {}
    for transfer in emulator.transfers():
        found.setdefault(transfer["tags"][1].removeprefix("invoice-"), []).append(transfer)
    return found


def holder_of(services, url, invoice_id):
    """Return the instance whose claim (lease_owner: host:pid:random) the invoice's transfer is under."""
    [(owner,)] = rows(url, "select lease_owner from transfer where invoice_id = ? and state = 'sending'", (invoice_id,))
    pid = int(owner.split(":")[1])
    return next(s for s in services if s.proc.pid == pid)


def test_three_instances_issue_one_round_and_forward_each_credit_once_through_kill_9(
        emulator, postgres, instance_factory):
    url = postgres.new_url()
    services = instance_factory(url, 3, INVOICE_MIN=5, INVOICE_MAX=5)
    for service in services:
        service.start()
    invoices = wait_for(lambda: len(emulator.invoices()) == 5 and emulator.invoices(), message="round 0")
    wait_for(lambda: rows(url, "select state from round") == [("issued",)], message="round 0 recorded")
    a, b, c, d, e = (i["id"] for i in invoices)

    # A's transfer call is held at Stark Bank; the instance making it dies mid-call.
    emulator.set(latency_s=1.5)
    emulator.pay(a)
    wait_for(lambda: in_flight(emulator, "POST", "/v2/transfer"), message="A's transfer call at Stark Bank")
    victim = holder_of(services, url, a)
    emulator.set(hold_deliveries=True)  # no transfer log can settle it: only a take-over can
    victim.kill()
    killed_at = len(emulator.requests)
    emulator.set(latency_s=0.0)
    taker = wait_for(lambda: next((s for s in services if s is not victim and messages_matching(
        s, f"transfer stark-challenge-inv-{a}: the service stopped during its create call")), None),
        message="A's claim taken over once its lease ended")
    emulator.set(hold_deliveries=False)

    # B's credit is acknowledged (stored), then another instance dies too.
    emulator.pay(b)
    wait_for(lambda: rows(url, "select count(*) from event where entity_id = ? and log_type = 'credited'", (b,))
             == [(1,)], message="B's credit stored")
    survivors = [s for s in services if s is not victim]
    survivors[0].kill()
    last = survivors[1]
    for invoice_id in (c, d, e):
        emulator.pay(invoice_id)

    credited = {i["id"]: i for i in emulator.invoices() if i["status"] == "paid"}
    assert set(credited) == {a, b, c, d, e}
    wait_for(lambda: rows(url, "select state, count(*) from transfer group by state") == [("success", 5)],
             message="every transfer sent and successful", timeout=40)
    by_invoice = transfers_by_invoice(emulator)
    assert set(by_invoice) == set(credited)
    for invoice_id, invoice in credited.items():
        (transfer,) = by_invoice[invoice_id]  # exactly one each, the one held mid-call included
        assert transfer["amount"] == invoice["amount"] - invoice["fee"]
    assert len([r for r in emulator.requests if r["method"] == "POST" and r["path"] == "/v2/invoice"]) == 1
    assert rows(url, "select n, state, count from round") == [(0, "issued", 5)]
    assert rows(url, "select count(*) from credit") == [(5,)]
    # The taker settled the dead instance's claim by a lookup at Stark Bank by its external id (one of its
    # tags): found and recorded, or not found yet and sent again under the same external id, never blind.
    assert [r for r in emulator.requests[killed_at:] if r["method"] == "GET" and r["path"] == "/v2/transfer"
            and f"stark-challenge-inv-{a}" in r["query"]]
    assert messages_matching(taker,
                             rf"transfer stark-challenge-inv-{a}: (found at Stark Bank|.*sending it again under the same external id)")
    assert last.request("GET", "/health")[1] == {"status": "ok"}
