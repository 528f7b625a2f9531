"""PostgreSQL faults while credits arrive: the server stopped at once and started again, and the instances'
connections killed (pg_terminate_backend). Webhooks get 503 (Stark Bank delivers again), never a 500;
/health says degraded while the database is away; every instance stays up and reconnects on its own,
healthy within 30 s of the database's return; nothing acknowledged is lost and nothing is doubled. Three
instances share the database behind a round-robin balancer."""

from support import wait_for
from support.databases import rows

CREDITS = 6
INSTANCES = 3


def transfers_by_invoice(emulator):
    found = {}
    for transfer in emulator.transfers():
        found.setdefault(transfer["tags"][1].removeprefix("invoice-"), []).append(transfer)
    return found


def start_instances(emulator, postgres, instance_factory):
    """Start INSTANCES instances on a new schema, with the round of CREDITS invoices issued and their
    ``created`` events processed; return (url, instances, invoice ids)."""
    url = postgres.new_url()
    # A delivery refused while the database is away is left to the pull (every second here).
    emulator.set(delivery_attempts=2, delivery_backoff_s=0.05)
    instances = instance_factory(url, INSTANCES, INVOICE_MIN=CREDITS, INVOICE_MAX=CREDITS, EVENT_POLL_INTERVAL="1s")
    for service in instances:
        service.start()
    invoices = wait_for(lambda: len(emulator.invoices()) == CREDITS and emulator.invoices(), message="round 0")
    for service in instances:
        wait_for(lambda: service.request("GET", "/health")[1] == {"status": "ok"}, message="first pass")
    return url, instances, [i["id"] for i in invoices]


def assert_forwarded_once_and_up(emulator, url, instances):
    credited = {i["id"]: i for i in emulator.invoices() if i["status"] == "paid"}
    assert len(credited) == CREDITS
    wait_for(lambda: rows(url, "select state, count(*) from transfer group by state") == [("success", CREDITS)],
             message="every credit forwarded", timeout=40)
    by_invoice = transfers_by_invoice(emulator)
    assert set(by_invoice) == set(credited)
    for invoice_id, invoice in credited.items():
        (transfer,) = by_invoice[invoice_id]
        assert transfer["amount"] == invoice["amount"] - invoice["fee"]
    assert rows(url, "select count(*) from event where processed_at is null") == [(0,)]
    assert 500 not in {d["status"] for d in emulator.deliveries()}
    for service in instances:
        assert service.proc.poll() is None  # stayed up
        assert service.request("GET", "/health") == (200, {"status": "ok"})


def test_a_database_restart_while_credits_arrive_is_answered_503_and_every_credit_forwarded_once(
        emulator, postgres, instance_factory):
    url, instances, invoice_ids = start_instances(emulator, postgres, instance_factory)
    before = len(emulator.deliveries())

    postgres.stop_now()
    try:
        for invoice_id in invoice_ids[:3]:
            emulator.pay(invoice_id)
        wait_for(lambda: any(d["status"] == 503 for d in emulator.deliveries()[before:]),
                 message="a webhook answered 503 while the database is down")
        for service in instances:
            assert service.request("GET", "/health") == (503, {"status": "degraded"})
            assert service.operate("GET", "/metrics")[0] == 503
    finally:
        postgres.start_again()

    wait_for(lambda: all(s.request("GET", "/health")[1] == {"status": "ok"} for s in instances), timeout=30,
             message="every instance healthy within 30 s of the database's return")
    for invoice_id in invoice_ids[3:]:
        emulator.pay(invoice_id)
    assert_forwarded_once_and_up(emulator, url, instances)


def test_killed_connections_while_credits_arrive_lose_and_double_nothing(emulator, postgres, instance_factory):
    url, instances, invoice_ids = start_instances(emulator, postgres, instance_factory)
    assert postgres.connections() == 2 * INSTANCES  # each instance: its store's connection and its listener's
    for invoice_id in invoice_ids:
        emulator.pay(invoice_id)
        # Every connection of the instances, mid-work or idle, once one has connected again.
        wait_for(lambda: postgres.terminate(), message="an instance connected again")
    assert_forwarded_once_and_up(emulator, url, instances)
