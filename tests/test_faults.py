"""Faults: each one injected into the real service process, run as a user runs it
(``python -m stark_challenge``), against the emulator and through the real SDK.

Every test asserts the outcome from the emulator's own records (transfers, invoices, the
API calls it answered) and from the service's SQLite file, opened read-only: each credited
invoice forwarded exactly once, each round issued exactly once, nothing lost.

Waits poll with a deadline (``wait_for``); wide windows for a crash come from the
emulator's ``answer_late`` (a call held until released: a kill lands while
``requests_in_flight`` shows it held at Stark Bank), its ``latency_s`` knob and injected
faults, never from sleeping.
"""

import base64
import concurrent.futures
import http.client
import json
import os
import random
import signal
import socket
import threading
import time

from stark_challenge.bank import Bank
from stark_challenge.invoicer import Invoicer
from stark_challenge.worker import Worker

from support import messages_matching, query, sdk_config, service_settled, signed_event, status_json, wait_for

FEE = 50  # the emulator's default invoice_fee, in cents


# -- reading the outcome ---------------------------------------------------------


def transfers_by_invoice(emulator):
    """Return {invoice id: [transfers]} from the emulator (a transfer's 2nd tag names its invoice)."""
    found = {}
    for transfer in emulator.transfers():
        found.setdefault(transfer["tags"][1].removeprefix("invoice-"), []).append(transfer)
    return found


def calls(emulator, method, path, query_part=""):
    """Return the API calls the emulator answered for ``method path`` whose query contains ``query_part``."""
    return [c for c in emulator.requests if c["method"] == method and c["path"] == path and query_part in c["query"]]


def in_flight(emulator, method, path):
    """Return True while the emulator holds a ``method path`` call it has not answered yet."""
    return any(c["method"] == method and c["path"] == path for c in emulator.requests_in_flight)


def invoices_of_round_0(emulator, count):
    """Wait until the service's first round is at the emulator; return its invoices."""
    return wait_for(lambda: len(emulator.invoices()) == count and emulator.invoices(), message="round 0")


def settled_after_start(service, emulator, count):
    """Wait until the ``created`` events of ``count`` invoices were acknowledged (the key is
    cached) and the worker's first pass is over (the start-up pull, and marking what it found
    delivered): nothing calls Stark Bank now until a credit arrives."""
    wait_for(lambda: len([d for d in emulator.deliveries() if d["status"] == 200]) >= count,
             message="created events acknowledged")
    # /health says "starting" until the worker's first pass is over, "ok" after it.
    wait_for(lambda: service.request("GET", "/health")[1] == {"status": "ok"}, message="first pass")


def assert_each_forwarded_once(emulator, credited, fee=FEE):
    """Every invoice in ``credited`` has exactly one transfer, of its amount minus the fee, and no other exists."""
    by_invoice = transfers_by_invoice(emulator)
    assert set(by_invoice) == set(credited)
    for invoice in credited.values():
        (transfer,) = by_invoice[invoice["id"]]
        assert transfer["amount"] == invoice["amount"] - fee
        assert transfer["externalId"] == f"stark-challenge-inv-{invoice['id']}"


def transfer_rows(service):
    return query(service, "select invoice_id, attempt, state, amount from transfer order by invoice_id, attempt")


def refused(port):
    """Return True if nothing accepts connections on ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def threads_of(pid):
    """Return the number of threads of process ``pid`` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


# -- 1. crash at any point -------------------------------------------------------


def test_the_database_runs_in_wal_mode(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    invoices_of_round_0(emulator, 1)
    assert query(service, "pragma journal_mode") == [("wal",)]


def test_kill_during_a_transfer_call_with_an_event_unprocessed_loses_and_repeats_nothing(emulator, service_factory):
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3, BANK_TIMEOUT="60s")
    service.start()
    a, b, c = invoices_of_round_0(emulator, 3)
    settled_after_start(service, emulator, 3)

    # A's transfer call is held at Stark Bank (until released, well past the kill); meanwhile
    # B's credit is stored and acknowledged, but the worker is busy with A, so B's event is
    # left unprocessed.
    emulator.answer_late("POST", "/v2/transfer", 600)
    emulator.pay(a["id"])
    wait_for(lambda: in_flight(emulator, "POST", "/v2/transfer"), message="A's transfer call at Stark Bank")
    assert query(service, "select state from transfer where invoice_id = ?", (a["id"],)) == [("sending",)]
    emulator.pay(b["id"])
    wait_for(lambda: query(service, "select processed_at from event where entity_id = ? and log_type = 'credited'",
                           (b["id"],)) == [(None,)], message="B's credit stored, not processed")
    service.kill()
    emulator.pay(c["id"])  # credited while the service is down

    # Restarted at once, while A's call is still held at Stark Bank, then carried out: settled
    # by its external id whichever comes first (found by lookup, or the duplicate refused).
    service.start()
    emulator.answer_held_calls()
    credited = {i["id"]: i for i in emulator.invoices() if i["status"] == "paid"}
    assert len(credited) == 3
    wait_for(lambda: set(transfers_by_invoice(emulator)) == set(credited), message="three transfers")
    wait_for(lambda: [r[2] for r in transfer_rows(service)] == ["success"] * 3, message="transfers succeed")
    wait_for(lambda: not emulator.requests_in_flight, message="the interrupted call carried out")

    assert_each_forwarded_once(emulator, credited)
    assert [(r[0], r[1]) for r in transfer_rows(service)] == sorted((i, 1) for i in credited)
    assert query(service, "select count(*) from event where processed_at is null") == [(0,)]
    assert query(service, "select count(*) from credit") == [(3,)]
    assert messages_matching(service, "the service stopped during its create call")


def test_kill_while_a_round_create_call_is_in_flight_issues_the_round_once(emulator, service_factory):
    emulator.set(latency_s=2.0)  # every call waits 2 s at Stark Bank before it acts
    # BANK_TIMEOUT well above the restart's time, also on a loaded machine: the restarted service
    # must find the interrupted call still possibly out.
    service = service_factory(INVOICE_MIN=4, INVOICE_MAX=4, BANK_TIMEOUT="6s")
    service.start()
    wait_for(lambda: in_flight(emulator, "POST", "/v2/invoice"), message="round 0's create call at Stark Bank")
    service.kill()
    emulator.set(latency_s=0.0)

    # Restarted (in about a second) before the interrupted call is carried out: a lookup
    # by tag now would find nothing and create the round again. It waits until
    # BANK_TIMEOUT after the call began, then finds the batch.
    service.start()
    wait_for(lambda: query(service, "select state from round where n = 0") == [("issued",)],
             message="round 0 issued", timeout=20)
    wait_for(lambda: not emulator.requests_in_flight, message="the interrupted call carried out")
    invoices = emulator.invoices()
    assert len(invoices) == 4
    assert len({next(t for t in i["tags"] if t.startswith("batch-")) for i in invoices}) == 1
    assert sorted(r[0] for r in query(service, "select id from invoice")) == sorted(i["id"] for i in invoices)
    assert len(calls(emulator, "POST", "/v2/invoice")) == 1
    assert messages_matching(service, "round 0: a create call was out when the service stopped")


def test_kill_after_a_round_create_call_went_unanswered_issues_the_round_once(emulator, service_factory):
    # The create call is performed but its answer lost; the service waits to retry (3-6 s
    # with a 60 s interval) and is killed meanwhile.
    emulator.fail_next_after("POST", "/v2/invoice")
    service = service_factory(INVOICE_MIN=4, INVOICE_MAX=4)
    service.start()
    wait_for(lambda: query(service, "select state, error is not null from round where n = 0") == [("issuing", 1)],
             message="round 0 waiting to retry")
    service.kill()
    assert len(emulator.invoices()) == 4  # the unanswered call did create them

    service.start()
    wait_for(lambda: query(service, "select state, count from round where n = 0") == [("issued", 4)],
             message="round 0 reconciled")
    assert len(emulator.invoices()) == 4
    assert len(calls(emulator, "POST", "/v2/invoice")) == 1  # found by its tag, never created again
    assert calls(emulator, "GET", "/v2/invoice", "tags=batch-")


# -- 2. missed webhooks ------------------------------------------------------------


def test_credits_made_while_the_service_was_down_are_pulled_at_start_and_forwarded_once(emulator, service_factory):
    service = service_factory(INVOICE_MIN=4, INVOICE_MAX=4)
    service.start()
    invoices = invoices_of_round_0(emulator, 4)
    assert service.stop() == 0

    emulator.set(delivery_backoff_s=0.01)  # the tries are given up soon
    for invoice in invoices:
        emulator.pay(invoice["id"])
    # Every delivery fails (nothing listens) until the emulator gives up on it.
    wait_for(lambda: not emulator.deliveries_pending(), message="deliveries given up")
    credited_events = [e for e in emulator.events() if e["log"]["type"] == "credited"]
    assert len(credited_events) == 4 and not any(e["isDelivered"] for e in credited_events)

    service.start()
    credited = {i["id"]: i for i in emulator.invoices()}
    wait_for(lambda: len(emulator.transfers()) == 4, message="four transfers")
    wait_for(lambda: all(e["isDelivered"] for e in emulator.events() if e["log"]["type"] == "credited"),
             message="pulled events marked delivered")
    # A pulled event pushed again later is the same event: nothing more happens.
    body = json.dumps({"event": credited_events[0]}, separators=(",", ":")).encode()
    status, reply = service.request("POST", "/webhook", body, {"Digital-Signature": emulator.sign(body)})
    assert (status, reply["status"]) == (200, "duplicate")
    wait_for(lambda: [r[2] for r in transfer_rows(service)] == ["success"] * 4, message="transfers succeed")

    assert_each_forwarded_once(emulator, credited)
    assert query(service, "select count(*) from event where source = 'pull' and log_type = 'credited'") == [(4,)]
    assert calls(emulator, "GET", "/v2/event", "isDelivered=False")


def test_undelivered_events_are_pulled_periodically_while_webhooks_never_arrive(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=3, INVOICE_MAX=3, EVENT_POLL_INTERVAL="1s")
    service.start()
    invoices = invoices_of_round_0(emulator, 3)
    for invoice in invoices:
        emulator.pay(invoice["id"])

    wait_for(lambda: len(emulator.transfers()) == 3, message="three transfers")
    wait_for(lambda: [r[2] for r in transfer_rows(service)] == ["success"] * 3, message="success pulled too")
    assert_each_forwarded_once(emulator, {i["id"]: i for i in emulator.invoices()})
    assert query(service, "select distinct source from event") == [("pull",)]


# -- 3. Stark Bank API failures ----------------------------------------------------


def test_invoice_create_5xx_is_retried_and_the_round_issued_once(emulator, service_factory):
    emulator.fail_next("POST", "/v2/invoice", count=2, status=500)
    # A 5 s interval retries after 0.25-0.5 s, then 0.5-1 s; one round only.
    service = service_factory(INVOICE_MIN=5, INVOICE_MAX=5, INVOICE_INTERVAL="5s", INVOICE_DURATION="5s")
    service.start()
    wait_for(lambda: query(service, "select state, attempts, count from round") == [("issued", 3, 5)],
             message="round 0 issued on the third attempt")

    assert len(emulator.invoices()) == 5
    creates = calls(emulator, "POST", "/v2/invoice")
    assert [c["status"] for c in creates] == [500, 500, 200]
    # Each retry asked Stark Bank for the batch's tag before creating anything.
    sequence = [(c["method"], c["status"]) for c in emulator.requests if c["path"] == "/v2/invoice"]
    assert sequence == [("POST", 500), ("GET", 200), ("POST", 500), ("GET", 200), ("POST", 200)]
    assert messages_matching(service, r"round 0 attempt 1 failed, retrying")


def test_invoice_create_answer_lost_is_reconciled_by_tag_before_any_retry(emulator, service_factory):
    emulator.fail_next_after("POST", "/v2/invoice")
    service = service_factory(INVOICE_MIN=6, INVOICE_MAX=6, INVOICE_INTERVAL="5s", INVOICE_DURATION="5s")
    service.start()
    wait_for(lambda: query(service, "select state, count from round") == [("issued", 6)], message="round 0 issued")

    invoices = emulator.invoices()
    assert len(invoices) == 6
    sequence = [(c["method"], c.get("dropped", False)) for c in emulator.requests if c["path"] == "/v2/invoice"]
    assert sequence == [("POST", True), ("GET", False)]  # looked up by tag, found, not created again
    assert sorted(r[0] for r in query(service, "select id from invoice")) == sorted(i["id"] for i in invoices)


def test_transfer_5xx_lost_answers_and_failed_lookups_end_in_exactly_one_transfer_each(emulator, service_factory):
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3)
    service.start()
    a, b, c = invoices_of_round_0(emulator, 3)
    settled_after_start(service, emulator, 3)

    # A: 500 without effect; the lookup finds nothing, the same external id is sent again.
    emulator.fail_next("POST", "/v2/transfer", status=500)
    emulator.pay(a["id"])
    wait_for(lambda: a["id"] in transfers_by_invoice(emulator), message="A's transfer")
    # B: performed, answer lost; the lookup by external id finds it.
    emulator.fail_next_after("POST", "/v2/transfer")
    emulator.pay(b["id"])
    wait_for(lambda: query(service, "select transfer_id is not null from transfer where invoice_id = ?",
                           (b["id"],)) == [(1,)], message="B's transfer found")
    # C: performed, answer lost, and the lookup fails too. Stark Bank's events are held, so
    # only the retry can settle it: the same external id is refused as a duplicate, and
    # the lookup after that finds it.
    emulator.set(hold_deliveries=True)
    emulator.fail_next_after("POST", "/v2/transfer")
    emulator.fail_next("GET", "/v2/transfer", status=503)
    emulator.pay(c["id"])
    credited_c = next(e for e in emulator.events()
                      if e["log"]["type"] == "credited" and e["log"]["invoice"]["id"] == c["id"])
    body = json.dumps({"event": credited_c}, separators=(",", ":")).encode()
    assert service.request("POST", "/webhook", body, {"Digital-Signature": emulator.sign(body)})[0] == 200
    wait_for(lambda: query(service, "select state, tries from transfer where invoice_id = ?",
                           (c["id"],)) == [("pending", 1)], message="C waiting to be sent again")
    wait_for(lambda: query(service, "select transfer_id is not null from transfer where invoice_id = ?",
                           (c["id"],)) == [(1,)], message="C's transfer settled")
    emulator.set(hold_deliveries=False)
    emulator.release_deliveries()
    wait_for(lambda: [r[2] for r in transfer_rows(service)] == ["success"] * 3, message="transfers succeed")

    credited = {i["id"]: i for i in emulator.invoices() if i["status"] == "paid"}
    assert_each_forwarded_once(emulator, credited)
    posts = [call["status"] for call in calls(emulator, "POST", "/v2/transfer")]
    assert posts == [500, 200, 200, 200, 400]  # A twice, B once, C once and its refused duplicate
    assert messages_matching(service, "found at Stark Bank")


def test_transfer_refused_with_4xx_is_recorded_with_its_codes_and_not_retried(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    (invoice,) = invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    emulator.fail_next("POST", "/v2/transfer", status=400)
    emulator.pay(invoice["id"])

    wait_for(lambda: query(service, "select state from transfer") == [("rejected",)], message="rejected")
    ((errors,),) = query(service, "select errors from transfer")
    assert ["injectedFault", "injected by the emulator"] in json.loads(errors)
    assert emulator.transfers() == []
    assert len(calls(emulator, "POST", "/v2/transfer")) == 1
    # Logged just after the commit the query above saw: waited for, not raced.
    wait_for(lambda: messages_matching(service, r"TRANSFER REJECTED: .*injectedFault"), message="the log line")
    report = status_json(service)
    assert report["transfers_failed"] == {"count": 1, "amount": invoice["amount"] - FEE}


def test_a_failed_event_pull_at_start_up_is_retried_without_waiting_for_the_next_poll(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=2, INVOICE_MAX=2)  # polls every hour
    service.start()
    invoices = invoices_of_round_0(emulator, 2)
    assert service.stop() == 0
    for invoice in invoices:
        emulator.pay(invoice["id"])

    emulator.fail_next("GET", "/v2/event", status=500)
    earlier = len(calls(emulator, "GET", "/v2/event", "isDelivered=False"))
    service.start()
    wait_for(lambda: len(emulator.transfers()) == 2, message="two transfers")
    pulls = calls(emulator, "GET", "/v2/event", "isDelivered=False")[earlier:]
    assert [p["status"] for p in pulls] == [500, 200]
    assert messages_matching(service, "pull of undelivered events failed")
    assert_each_forwarded_once(emulator, {i["id"]: i for i in emulator.invoices()})


# -- 4. graceful shutdown ------------------------------------------------------------


def test_a_signal_during_a_transfer_call_finishes_it_closes_the_database_and_exits_0(emulator, service_factory):
    # SIGTERM; SIGINT has the same handler, and Ctrl-C's exit 0 is test_try_it's.
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    (invoice,) = invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    emulator.set(latency_s=1.5)
    emulator.pay(invoice["id"])
    wait_for(lambda: query(service, "select state from transfer") == [("sending",)], message="transfer in flight")

    service.proc.send_signal(signal.SIGTERM)
    # It stops accepting at once, while the transfer call is still under way.
    wait_for(lambda: refused(service.port), message="the port closed")
    assert service.proc.poll() is None
    assert service.proc.wait(10) == 0

    # The unit of work in flight was finished: Stark Bank's answer is recorded.
    assert query(service, "select state from transfer") == [("created",)]
    assert len(emulator.transfers()) == 1
    assert not os.path.exists(service.env["DATABASE_PATH"] + "-wal")  # closed: checkpointed
    assert messages_matching(service, "^stopped; ")


def test_sigterm_during_a_round_create_call_waits_for_the_round_and_exits_0(emulator, service_factory):
    emulator.set(latency_s=1.5)
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3)
    service.start()
    wait_for(lambda: in_flight(emulator, "POST", "/v2/invoice"), message="round 0's create call at Stark Bank")

    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(10) == 0
    assert query(service, "select state, count from round") == [("issued", 3)]  # recorded before exit
    assert len(emulator.invoices()) == 3


def test_sigterm_lets_an_in_flight_webhook_finish_and_its_event_is_kept(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    (invoice,) = invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    paid = dict(invoice, status="paid", fee=FEE)
    body, headers = signed_event(emulator, "4000000000000001", paid, "credited")

    conn = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    conn.sendall(f"POST /webhook HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{head}"
                 f"Content-Length: {len(body)}\r\n\r\n".encode())
    assert conn.recv(100).startswith(b"HTTP/1.1 100")  # the request is in flight
    service.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: messages_matching(service, "^stopping"), message="shutdown started")
    conn.sendall(body)
    reply = conn.recv(4096)
    conn.close()
    assert reply.startswith(b"HTTP/1.1 200")
    assert service.proc.wait(10) == 0
    assert query(service, "select id from event where id = '4000000000000001'") == [("4000000000000001",)]

    service.start()  # what was acknowledged is processed after the restart
    wait_for(lambda: len(emulator.transfers()) == 1, message="the transfer")
    assert emulator.transfers()[0]["amount"] == invoice["amount"] - FEE


def test_a_second_signal_forces_exit(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, BANK_TIMEOUT="30s")
    service.start()
    (invoice,) = invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    emulator.set(latency_s=20.0)  # a transfer call that would hold the shutdown for long
    emulator.pay(invoice["id"])
    wait_for(lambda: in_flight(emulator, "POST", "/v2/transfer"), message="the transfer call held at Stark Bank")

    service.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: messages_matching(service, "^stopping"), message="shutdown started")
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(5) == 1  # the held call would have kept it 20 s
    assert in_flight(emulator, "POST", "/v2/transfer")  # it did not wait for the call
    assert messages_matching(service, "second signal")


# -- 5. forged floods and slow clients -------------------------------------------------


def _post(conn, body, headers):
    conn.request("POST", "/webhook", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("Connection", "")


def test_a_flood_of_forged_webhooks_is_refused_cheaply_and_valid_ones_are_still_accepted(emulator, service_factory):
    max_connections, flooders, per_flooder = 8, 3, 700
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, MAX_CONNECTIONS=max_connections,
                              WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="correct-horse")
    service.start()
    invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    pid = service.proc.pid
    auth = "Basic " + base64.b64encode(b"stark:correct-horse").decode()
    fetches = emulator.public_key_fetches
    rss_before = rss_kib(pid)

    valid_ids = []

    def post_valid(n):
        event_id = str(5000000000000000 + n)
        valid_ids.append(event_id)
        body, headers = signed_event(emulator, event_id, {"id": str(6000000000000000 + n), "tags": []}, "created")
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        status, _ = _post(conn, body, dict(headers, Authorization=auth))
        conn.close()
        return status

    assert [post_valid(n) for n in range(5)] == [200] * 5

    genuine, _ = signed_event(emulator, "5100000000000000", {"id": "5100000000000001", "tags": []}, "created")
    forged = genuine.replace(b"created", b"credited")
    other_signature = emulator.sign(b"another body")
    kinds = [
        ("bad signature", forged, {"Digital-Signature": other_signature, "Authorization": auth}, 401),
        ("bad auth", genuine, {"Digital-Signature": emulator.sign(genuine),
                               "Authorization": "Basic " + base64.b64encode(b"stark:guess").decode()}, 401),
        ("oversized", None, {"Content-Length": "70000", "Authorization": auth}, 413),
        ("malformed signature", genuine, {"Digital-Signature": "bm90IGEgc2lnbmF0dXJl", "Authorization": auth}, 401),
        ("malformed body", b"{not json", {"Digital-Signature": emulator.sign(b"{not json"), "Authorization": auth},
         400),
    ]
    answers, done = [], threading.Event()

    def flood(offset):
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        for i in range(per_flooder):
            _, body, headers, _ = kinds[(i + offset) % len(kinds)]
            if body is None:  # announced as too large, never sent: refused from Content-Length
                conn.putrequest("POST", "/webhook")
                for name, value in headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                response = conn.getresponse()
                response.read()
                status, connection = response.status, response.getheader("Connection", "")
            else:
                status, connection = _post(conn, body, headers)
            answers.append(((i + offset) % len(kinds), status))
            if connection.lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
        conn.close()

    peak = [0]

    def sample_threads():
        while not done.is_set():
            peak[0] = max(peak[0], threads_of(pid))
            done.wait(0.01)

    sampler = threading.Thread(target=sample_threads)
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(flooders) as pool:
        futures = [pool.submit(flood, k) for k in range(flooders)]
        during = []
        while not all(f.done() for f in futures) and len(during) < 15:
            during.append(post_valid(100 + len(during)))
        for f in futures:
            f.result()
    done.set()
    sampler.join()

    assert len(answers) == flooders * per_flooder
    for index, status in answers:
        assert status == kinds[index][3], kinds[index][0]
    assert len(during) >= 5 and set(during) == {200}  # valid webhooks accepted while the flood lasted
    assert emulator.public_key_fetches - fetches <= 1
    assert peak[0] <= max_connections + 6
    assert rss_kib(pid) - rss_before < 50 * 1024
    stored = {r[0] for r in query(service, "select id from event where source = 'webhook'")}
    assert set(valid_ids) <= stored and "5100000000000000" not in stored
    assert query(service, "select count(*) from event where log_type = 'credited'") == [(0,)]


def test_slow_and_stalled_clients_are_cut_off_and_connections_stay_bounded(emulator, service_factory):
    max_connections = 4
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, MAX_CONNECTIONS=max_connections, REQUEST_TIMEOUT="1s")
    service.start()
    pid = service.proc.pid

    def cut_off(sock, timeout=15.0):
        """Return seconds until the server closed ``sock`` (reading whatever it answered)."""
        started = time.monotonic()
        sock.settimeout(timeout)
        while sock.recv(4096):
            pass
        return time.monotonic() - started

    half = socket.create_connection(("127.0.0.1", service.port))
    half.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\": ")
    stalled = socket.create_connection(("127.0.0.1", service.port))
    stalled.sendall(b"POST /webh")
    assert cut_off(half) > 0.5  # after REQUEST_TIMEOUT (1 s), not at once; cut_off fails after 15 s
    cut_off(stalled)
    half.close()
    stalled.close()

    # More idle connections than handler threads: they hold no thread, a genuine request is
    # answered meanwhile, and each idle one is cut off, unanswered, after the timeout.
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(max_connections + 3)]
    assert service.request("GET", "/health")[0] == 200
    peak = max(threads_of(pid) for _ in range(20))
    answers = []
    for sock in idle:
        sock.settimeout(5)
        answers.append(sock.recv(100))
        sock.close()
    assert peak <= max_connections + 6
    assert answers == [b""] * len(idle)


# -- 6. transfers that fail later --------------------------------------------------------


def test_a_transfer_failed_after_creation_is_sent_once_more_under_a_derived_external_id(emulator, service_factory):
    service = service_factory(INVOICE_MIN=2, INVOICE_MAX=2)
    service.start()
    a, b = invoices_of_round_0(emulator, 2)
    settled_after_start(service, emulator, 2)
    emulator.set(transfer_delay_s=60.0)  # transfers stay "created" until failed by hand
    emulator.pay(a["id"])
    emulator.pay(b["id"])
    wait_for(lambda: len(emulator.transfers()) == 2, message="two transfers")
    first = transfers_by_invoice(emulator)[a["id"]][0]

    emulator.fail_transfer(first["id"], ["receiver account closed"])
    wait_for(lambda: len(transfers_by_invoice(emulator)[a["id"]]) == 2, message="A sent again")
    second = transfers_by_invoice(emulator)[a["id"]][1]
    assert second["externalId"] == f"stark-challenge-inv-{a['id']}-2"
    assert second["amount"] == first["amount"] == a["amount"] - FEE
    row = query(service, "select state, errors from transfer where external_id = ?", (first["externalId"],))
    assert row[0][0] == "failed" and "receiver account closed" in row[0][1]
    assert messages_matching(service, r"TRANSFER FAILED: .*receiver account closed.*queued once more")

    # The second attempt fails too: recorded, logged, and not sent a third time.
    emulator.fail_transfer(second["id"])
    wait_for(lambda: query(service, "select state from transfer where external_id = ?",
                           (second["externalId"],)) == [("failed",)], message="second attempt failed")
    assert query(service, "select attempt, state from transfer where invoice_id = ? order by attempt",
                 (a["id"],)) == [(1, "failed"), (2, "failed")]
    assert messages_matching(service, r"TRANSFER FAILED: .*no attempt left")
    assert len(transfers_by_invoice(emulator)[a["id"]]) == 2

    # B was never confirmed: it shows as pending.
    report = status_json(service)
    assert report["transfers_pending"] == {"count": 1, "amount": b["amount"] - FEE}
    assert report["transfers_failed"]["count"] == 2
    assert len(transfers_by_invoice(emulator)[b["id"]]) == 1


# -- 7. bad data from the bank side ----------------------------------------------------


def test_events_with_bad_data_are_stored_acknowledged_and_never_stop_the_worker(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    (invoice,) = invoices_of_round_0(emulator, 1)
    settled_after_start(service, emulator, 1)
    # Credits of the invoice round 0 issued, with bad numbers: none of them may block its genuine credit.
    ours = {"id": invoice["id"], "tags": ["stark-challenge"], "status": "paid"}
    stored = {  # event id: (entity, log type, subscription)
        "7100000000000001": ({"id": "1"}, "created", "deposit"),  # unknown subscription
        "7100000000000002": (dict(ours, id="7000000000000001"), "teleported", "invoice"),  # unknown log type
        "7100000000000003": (dict(ours), "credited", "invoice"),  # no amount
        "7100000000000004": (dict(ours, amount=40, fee=50), "credited", "invoice"),  # fee not covered
        "7100000000000005": (dict(ours, amount="12.34", fee=0), "credited", "invoice"),
        "7100000000000006": (dict(ours, id="7000000000000003", amount=900, fee=0, tags="stark-challenge"),
                             "credited", "invoice"),  # not issued here (and a substring of tags must not match)
        "7100000000000007": (dict(ours, amount=10 ** 20, fee=0), "credited", "invoice"),
        "7100000000000010": (dict(ours, amount=900), "credited", "invoice"),  # no fee: never taken as 0
        "7100000000000008": ({"id": "7000000000000005", "externalId": {"a": 1}}, "failed", "transfer"),
        "7100000000000009": ({"id": "7000000000000006"}, "failed", "transfer"),  # no external id
    }
    for event_id, (entity, log_type, subscription) in stored.items():
        body, headers = signed_event(emulator, event_id, entity, log_type, subscription)
        assert service.request("POST", "/webhook", body, headers)[0] == 200, event_id
    # Without the fields an event is stored under (its id, its log's type, the entity's id)
    # it cannot be kept: 400, and nothing is stored.
    for document in ({"event": {"id": "7200000000000001", "subscription": "invoice"}},
                     {"event": {"id": "7200000000000002", "subscription": "invoice",
                                "log": {"type": "credited", "invoice": {"id": {"nested": True}}}}}):
        raw = json.dumps(document).encode()
        assert service.request("POST", "/webhook", raw, {"Digital-Signature": emulator.sign(raw)})[0] == 400

    # A genuine credit after them is still forwarded: the worker is alive and not held up.
    emulator.pay(invoice["id"])
    wait_for(lambda: len(emulator.transfers()) == 1, message="the genuine credit's transfer")
    # Its own transfer's events (created, processing, success) delivered and processed too.
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    assert emulator.transfers()[0]["amount"] == invoice["amount"] - FEE

    ids = sorted(stored)
    rows = dict(query(service, f"select id, outcome from event where id in ({','.join('?' * len(ids))})", ids))
    assert sorted(rows) == ids
    assert all(outcome for outcome in rows.values())  # each processed, with what was wrong
    assert rows["7100000000000003"].startswith("invalid")
    assert rows["7100000000000004"] == "invalid: fee 50 is not in 0..amount 40"
    assert rows["7100000000000005"].startswith("invalid")
    assert rows["7100000000000006"] == "not issued here: Stark Bank has no such invoice in our workspace"
    assert rows["7100000000000007"].startswith("invalid")
    assert rows["7100000000000010"] == "invalid: credited invoice without a fee"
    assert rows["7100000000000008"] == rows["7100000000000009"] == "transfer not ours"
    assert query(service, "select count(*) from event where id like '72%'") == [(0,)]
    assert query(service, "select invoice_id from credit") == [(invoice["id"],)]
    assert query(service, "select state from transfer") == [("success",)]
    assert query(service, "select count(*) from event where processed_at is null") == [(0,)]
    assert messages_matching(service, "fee 50 is not in 0..amount 40 .*not forwarded")
    status, page = service.operate("GET", "/status")
    assert page["service"]["worker"]["alive"] and page["service"]["worker"]["last_error"] is None


# -- the mechanisms, one step at a time (fake clock, real SDK and emulator) -------------------


def test_a_failed_pull_is_retried_with_backoff_even_when_polling_only_at_start_up(emulator, sdk, store, clock):
    bank = Bank(sdk_config(sdk))
    bank.configure()
    worker = Worker(store, bank, "stark-challenge", poll_interval_s=0, clock=clock, rng=random.Random(3))
    pulls = lambda: calls(emulator, "GET", "/v2/event", "isDelivered=False")  # noqa: E731
    emulator.fail_next("GET", "/v2/event", count=2, status=500)

    waits = [worker.run_once()]
    clock.advance(waits[0])
    waits.append(worker.run_once())
    clock.advance(waits[1])
    worker.run_once()
    assert [p["status"] for p in pulls()] == [500, 500, 200]
    assert 1.0 <= waits[0] <= 2.0 and 2.0 <= waits[1] <= 4.0  # exponential, with jitter
    clock.advance(86400)
    worker.run_once()
    assert len(pulls()) == 3  # EVENT_POLL_INTERVAL=0: after one pull succeeded, no more


def test_a_round_interrupted_mid_call_is_looked_up_only_once_that_call_is_over(emulator, sdk, store, clock):
    config = sdk_config(sdk, INVOICE_MIN=2, INVOICE_MAX=2, BANK_TIMEOUT="15s")
    bank = Bank(config)
    bank.configure()
    store.claim_round(0, clock(), 2, clock())  # the last process stopped during this call
    invoicer = Invoicer(bank, store, config, "s1", clock=clock, rng=random.Random(5))

    clock.advance(5)
    early = invoicer.issue_round(0, clock())
    assert early.state == "retry" and (early.retry_at - clock()).total_seconds() == 10
    assert emulator.requests == [] and store.round(0).attempts == 1  # nothing asked, nothing counted

    clock.advance(10)
    assert invoicer.issue_round(0, clock()).state == "issued"
    assert [(c["method"], "tags=batch-s1-0-0" in c["query"]) for c in emulator.requests
            if c["path"] == "/v2/invoice"] == [("GET", True), ("POST", False)]
    assert len(emulator.invoices()) == 2
