"""Hostile clients against the running service: slow, silent, huge, malformed and smuggled requests.

Each test is one attack an attacker tried against a service with ``MAX_CONNECTIONS=8`` and
basic auth on; each asserts that the attack fails (the connection is cut, refused with a
4xx and closed, or leaves nothing behind) and that genuine signed webhooks are still
accepted meanwhile. ``REQUEST_TIMEOUT`` is 1 s here so that cuts come quickly; the
bounds asserted are several times that, far above scheduling noise.
"""

import base64
import http.client
import json
import os
import re
import select
import socket
import sqlite3
import stat
import threading
import time

import pytest

from support import messages_matching, signed_event, wait_for

MAX_CONNECTIONS = 8
TIMEOUT_S = 1.0
CUT_WITHIN_S = 6 * TIMEOUT_S  # a cut comes at the deadline; this is the bound a test allows
AUTH = "Basic " + base64.b64encode(b"stark:correct-horse").decode()


def _hostile_target(service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, MAX_CONNECTIONS=MAX_CONNECTIONS,
                              REQUEST_TIMEOUT=f"{TIMEOUT_S:g}s",
                              WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="correct-horse")
    return service.start()


@pytest.fixture
def service(service_factory):
    """A service of its own, for the crowds of attackers (they load it, and the memory test reads its RSS)."""
    return _hostile_target(service_factory)


@pytest.fixture(scope="module")
def shared_service(module_service_factory):
    """One service (on module_emulator) for the single-connection attacks: each leaves nothing
    behind but a closed connection, so they need no fresh process. Its log accumulates, so a
    test that counts log lines counts those of its own requests only."""
    return _hostile_target(module_service_factory)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def genuine(emulator, service, n):
    """Post one genuine signed webhook (with basic auth); return its status."""
    body, headers = signed_event(emulator, str(8000000000000000 + n), {"id": str(8100000000000000 + n), "tags": []},
                                 "created")
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        conn.request("POST", "/webhook", body=body, headers=dict(headers, Authorization=AUTH))
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def exchange(port, data, timeout=10.0):
    """Send ``data`` on a new connection; return everything answered until the server closed it.

    Fail if the server keeps the connection open longer than ``timeout``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # closed while we were still sending: read what was answered
            pass
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def answers(raw):
    """Return the status codes of the HTTP answers in ``raw`` (bytes), in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def trickle(port, data, pace_s=0.2, limit_s=30.0):
    """Send ``data`` a byte every ``pace_s`` (endlessly repeated); return seconds until the server closed.

    The pacing is the client's: it waits for the server's close (a recv with a
    timeout) between bytes, so the close is seen as soon as it comes.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(pace_s)
    started = time.monotonic()
    try:
        for sent in range(int(limit_s / pace_s)):
            try:
                sock.send(data[sent % len(data):sent % len(data) + 1])
                if not sock.recv(4096):
                    break
            except socket.timeout:
                continue
            except OSError:  # reset: closed with our last byte unread
                break
        return time.monotonic() - started
    finally:
        sock.close()


class Crowd:
    """``count`` clients that run ``attack(port)`` again and again (reconnecting when cut) until ``stop()``."""

    def __init__(self, port, count, attack):
        self.stopped = threading.Event()
        self.rounds = []  # what each finished attack returned
        self.threads = [threading.Thread(target=self._loop, args=(port, attack), daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _loop(self, port, attack):
        while not self.stopped.is_set():
            try:
                self.rounds.append(attack(port, self.stopped))
            except OSError as e:
                self.rounds.append(e)

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(30)


def silent(port, stopped):
    """Connect and send nothing; return seconds until the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        while not stopped.is_set():
            sock.settimeout(0.2)
            try:
                if not sock.recv(1):
                    break
            except socket.timeout:
                continue
        return time.monotonic() - started


def test_a_client_trickling_its_head_is_cut_at_the_deadline_and_holds_no_one_out(emulator, service):
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 1000
    cuts = []
    slowloris = [threading.Thread(target=lambda: cuts.append(trickle(service.port, head))) for _ in range(MAX_CONNECTIONS)]
    for thread in slowloris:
        thread.start()
    statuses = [genuine(emulator, service, n) for n in range(10)]
    for thread in slowloris:
        thread.join(60)
    assert statuses == [200] * 10
    # A byte every 0.2 s never stalls a read for 1 s: only a deadline cuts it.
    assert len(cuts) == MAX_CONNECTIONS and all(cut < CUT_WITHIN_S for cut in cuts), cuts


def test_a_trickling_body_is_cut_at_the_deadline_too(shared_service):
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", shared_service.port), timeout=10) as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.settimeout(0.2)
        while time.monotonic() - started < 30:
            try:
                sock.send(b"[")
                if not sock.recv(4096):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        assert time.monotonic() - started < CUT_WITHIN_S


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(shared_service):
    conn = http.client.HTTPConnection("127.0.0.1", shared_service.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read()
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # blocks until the server closes its side
    assert time.monotonic() - started < CUT_WITHIN_S
    conn.close()


def test_genuine_webhooks_are_answered_while_four_times_max_connections_silent_clients_hold_on(emulator, service):
    crowd = Crowd(service.port, 4 * MAX_CONNECTIONS, silent)
    try:
        wait_for(lambda: len(crowd.rounds) >= 4 * MAX_CONNECTIONS, message="the silent clients cut and back")
        statuses = [genuine(emulator, service, 100 + n) for n in range(20)]
    finally:
        crowd.stop()
    assert statuses == [200] * 20
    # Every silent client was cut by the server (none ran into its own 30 s timeout).
    assert all(isinstance(r, float) and r < CUT_WITHIN_S for r in crowd.rounds), crowd.rounds[:5]


def test_heads_over_16_kib_or_64_lines_are_refused_431_and_closed(shared_service):
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 65000 + b"\r\n" * 2
    assert answers(exchange(shared_service.port, huge)) == [431]
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(64)) + b"\r\n"
    assert answers(exchange(shared_service.port, many)) == [431]
    # The largest head allowed is served.
    largest = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-%02d: %s\r\n" % (i, b"a" * 240) for i in range(62)) + b"\r\n"
    assert len(largest) < 16 * 1024 and answers(exchange(shared_service.port, largest)) == [200]


def test_clients_sending_the_largest_heads_keep_memory_bounded(emulator, service):
    pid = service.proc.pid
    # Four times MAX_CONNECTIONS clients each send 16 KiB of headers, over and over, plus
    # the attack as first tried: 98 headers of 65 KB each, which is refused at 16 KiB.
    line = b"X-Big: " + b"a" * 250 + b"\r\n"
    almost = b"GET /health HTTP/1.1\r\nHost: x\r\n" + line * (16 * 1024 // len(line) - 1)

    def hold_largest_head(port, stopped):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(almost)  # never finished: held until the deadline
            return sock.recv(1)

    def flood_head(port, stopped):
        return answers(exchange(port, b"GET /health HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 65000 + b"\r\n") * 98))

    holders = Crowd(service.port, 4 * MAX_CONNECTIONS, hold_largest_head)
    flooders = Crowd(service.port, MAX_CONNECTIONS, flood_head)
    peak = 0
    try:
        wait_for(lambda: len(flooders.rounds) >= 4 * MAX_CONNECTIONS and len(holders.rounds) >= 4 * MAX_CONNECTIONS,
                 timeout=60, message="several rounds of each attack")
        statuses = []
        for n in range(10):
            peak = max(peak, rss_kib(pid))
            statuses.append(genuine(emulator, service, 200 + n))
    finally:
        holders.stop()
        flooders.stop()
    peak = max(peak, rss_kib(pid))
    assert statuses == [200] * 10
    assert peak < 120 * 1024, f"peak RSS {peak} KiB"
    assert all(r in ([431], []) for r in flooders.rounds if not isinstance(r, OSError))
    assert [431] in flooders.rounds


@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "+5", "5 5", "0x10", "1" * 5000])
def test_a_content_length_that_is_not_ascii_digits_is_400_closed_and_quiet(shared_service, length):
    request = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n").encode() + b"{}"
    earlier = len(messages_matching(shared_service, "refused"))  # logged by the tests before this one
    for _ in range(100):
        raw = exchange(shared_service.port, request + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers(raw) in ([400], [413])  # and the request behind it is not served
    text = shared_service.logs()
    assert "Traceback" not in text
    assert len(messages_matching(shared_service, "refused")) - earlier <= 10  # throttled: one a second at most


def test_a_deeply_nested_signed_body_is_400_without_a_traceback(module_emulator, shared_service):
    body = b"[" * 60000
    conn = http.client.HTTPConnection("127.0.0.1", shared_service.port, timeout=10)
    conn.request("POST", "/webhook", body=body,
                 headers={"Digital-Signature": module_emulator.sign(body), "Authorization": AUTH})
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())) == (400, {"error": "malformed event: nested too deeply"})
    conn.close()
    assert "Traceback" not in shared_service.logs() and "RecursionError" not in shared_service.logs()


def test_a_deeply_nested_forged_body_is_401_and_the_door_stays_open(module_emulator, shared_service):
    # The raw body does not verify, so its key-sorted form is tried: a body too deep to be
    # parsed has none. With the native verifier this check runs on the selector thread.
    body = b"[" * 30000 + b"]" * 30000
    conn = http.client.HTTPConnection("127.0.0.1", shared_service.port, timeout=10)
    for _ in range(2):
        conn.request("POST", "/webhook", body=body,
                     headers={"Digital-Signature": module_emulator.sign(b"[]"), "Authorization": AUTH})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (401, {"error": "invalid Digital-Signature"})
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert "Traceback" not in shared_service.logs() and "RecursionError" not in shared_service.logs()


SMUGGLED = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("framing", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Content-Length: 4\r\nContent-Length: 40\r\n",
    b"Content-Length: 4\r\nTransfer-Encoding : chunked\r\n",
    b"Content-Length: 4\r\n Transfer-Encoding: chunked\r\n",
])
@pytest.mark.parametrize("path", [b"/webhook", b"/nope", b"/health"])
def test_ambiguous_framing_is_400_and_closed_on_every_path_so_nothing_is_smuggled(shared_service, framing, path):
    # No Authorization: a refused path is refused as strictly as an accepted one.
    request = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n" + SMUGGLED
    assert answers(exchange(shared_service.port, request)) == [400]


def test_identical_duplicate_content_lengths_are_one_length(shared_service):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\ncontent-length: 02\r\n\r\n{}" + \
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert answers(exchange(shared_service.port, request)) == [200, 200]


def test_a_refused_request_with_an_unread_body_is_answered_and_closed(shared_service):
    # Announced too large: answered 413 at once, and what follows is never parsed as a request.
    request = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + SMUGGLED
    assert answers(exchange(shared_service.port, request)) == [413]


def test_a_refused_request_with_a_body_leaves_nothing_for_the_next_request(shared_service):
    # 401 (no auth) with a body that is itself a request: read and dropped, then the next one.
    body = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
               + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answers(exchange(shared_service.port, request)) == [401, 200]


def test_health_tells_strangers_the_status_only_and_status_the_details_behind_auth(shared_service):
    conn = http.client.HTTPConnection("127.0.0.1", shared_service.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200 and body in ({"status": "ok"}, {"status": "starting"})
    server = response.getheader("Server")
    assert server == "stark_challenge" and "Python" not in server
    conn.close()
    assert shared_service.request("GET", "/status")[0] == 401
    assert shared_service.request("GET", "/status", headers={"Authorization": AUTH})[0] == 401  # the webhook's
    status, page = shared_service.operate("GET", "/status")
    assert status == 200
    assert {"version", "store", "scheduler", "worker", "public_key_fetches"} <= set(page["service"])


def test_the_database_and_its_side_files_are_created_0600_whatever_the_umask(service_factory):
    old = os.umask(0o022)
    try:
        service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1).start()
    finally:
        os.umask(old)
    path = service.env["DATABASE_PATH"]
    files = [path + suffix for suffix in ("", "-wal", "-shm", ".lock")]
    wait_for(lambda: all(os.path.exists(f) for f in files), message="the database and its side files")
    modes = {os.path.basename(f): stat.S_IMODE(os.stat(f).st_mode) for f in files}
    assert set(modes.values()) == {0o600}, modes


@pytest.mark.parametrize("way", ["redelivered", "pulled"])
def test_a_webhook_refused_503_with_every_handler_busy_is_not_lost(emulator, service_factory, way):
    # One handler, held in the store's busy wait by a write lock this test takes; the
    # credited event's delivery then finds the handler and its queue taken and gets 503.
    # Stark Bank delivers it again ("redelivered"), or gives up and the worker's periodic
    # pull catches it up ("pulled"): either way its credit is forwarded exactly once.
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, MAX_CONNECTIONS=1, EVENT_POLL_INTERVAL="1s").start()
    (invoice,) = wait_for(lambda: len(emulator.invoices()) == 1 and emulator.invoices(), message="round 0")
    wait_for(lambda: service.request("GET", "/health")[1] == {"status": "ok"}, message="the worker's first pass")
    wait_for(lambda: [d["status"] for d in emulator.deliveries()] == [200] and not emulator.deliveries_pending(),
             message="the created event delivered, nothing else on its way")
    emulator.set(delivery_attempts=8 if way == "redelivered" else 1)
    lock = sqlite3.connect(service.env["DATABASE_PATH"], timeout=5, isolation_level=None)
    lock.execute("begin immediate")
    fillers = []
    try:
        for n in range(3):  # one in the handler, waiting on the lock; one in the queue; one refused
            body, headers = signed_event(emulator, str(8300000000000000 + n), {"id": str(8400000000000000 + n),
                                                                              "tags": []}, "created")
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
                len(body), b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()), body))
            fillers.append(sock)
        answered, _, _ = select.select(fillers, [], [], 10)  # the house is full once one is refused
        assert len(answered) == 1 and answered[0].recv(4096).startswith(b"HTTP/1.1 503")
        emulator.pay(invoice["id"])
        credited = wait_for(lambda: [e["id"] for e in emulator.events() if e["log"]["type"] == "credited"],
                            message="the credited event")
        # 503 as a rule; on a very slow machine the delivery may instead wait in the queue
        # past the emulator's delivery timeout: refused all the same.
        wait_for(lambda: any(d["eventId"] in credited and d["status"] in (503, None) for d in emulator.deliveries()),
                 timeout=30, message="the credited event's delivery refused")
    finally:
        lock.execute("rollback")
        lock.close()
        for sock in fillers:
            sock.close()
    wait_for(lambda: len(emulator.transfers()) == 1, timeout=30, message="the credit's transfer")
    (transfer,) = emulator.transfers()
    assert transfer["externalId"] == f"stark-challenge-inv-{invoice['id']}"
    assert transfer["amount"] == invoice["amount"] - 50  # the emulator's fee
    answered = [d["status"] for d in emulator.deliveries() if d["eventId"] in credited]
    assert (200 in answered) == (way == "redelivered")
