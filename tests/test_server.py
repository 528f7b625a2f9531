"""server: routes, limits and bounds of the HTTP front door, on a real socket (port 0)."""

import http.client
import json
import select
import socket
import threading
from http import HTTPStatus

import pytest

from stark_challenge.bank import Bank
from stark_challenge.gate import Gate
from stark_challenge.server import Server
from stark_challenge.verify import Signatures

from support import make_gate, sdk_config, signed_event


@pytest.fixture
def server_for(sdk, store, clock):
    started = []

    def make(max_connections=8, **values):
        config = sdk_config(sdk, **values)
        bank = Bank(config)
        bank.configure()
        gate = Gate(store, Signatures(bank.fetch_public_key), config, clock, health=lambda: (HTTPStatus.OK, {"status": "ok"}),
                    report=lambda: {"report": True})
        server = Server(("127.0.0.1", 0), gate, max_connections).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(timeout=2)


def call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        conn.close()


def test_health_answers_json(server_for):
    status, headers, body = call(server_for(), "GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["Content-Type"] == "application/json"


def test_unknown_paths_are_404_and_wrong_methods_405(server_for):
    server = server_for()
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "POST", "/health", b"{}")[0] == 405
    status, headers, body = call(server, "GET", "/webhook")
    assert (status, headers["Allow"], body) == (405, "POST", {"error": "method not allowed"})
    assert call(server, "DELETE", "/webhook")[0] == 405


def test_a_genuine_webhook_is_stored_and_acknowledged(emulator, server_for, store):
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1", "amount": 1, "fee": 0, "tags": []})
    status, _, reply = call(server_for(), "POST", "/webhook", body, headers)
    assert (status, reply) == (200, {"status": "stored", "event": "ev-1"})
    assert [e.id for e in store.pending_events()] == ["ev-1"]


def test_an_oversized_body_is_refused_from_its_length_without_reading_it(server_for, store):
    server = server_for()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        answer = sock.recv(4096)  # answered without sending a single byte of the body
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in answer
    assert store.pending_events() == []


def test_a_body_without_length_is_refused(server_for):
    server = server_for()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")  # a chunked body is refused as framing
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 411")
    assert call(server, "POST", "/webhook", None, {"Content-Length": "abc"})[0] == 400


def test_basic_auth_guards_the_webhook_and_the_status(emulator, server_for):
    server = server_for(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="s3cret", OPERATOR_USERNAME="ops",
                        OPERATOR_PASSWORD="0p3r")
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"})
    status, answer_headers, reply = call(server, "POST", "/webhook", body, headers)
    assert status == 401 and "Basic" in answer_headers["WWW-Authenticate"] and reply == {"error": "authentication required"}
    assert call(server, "GET", "/status")[0] == 401
    auth = {"Authorization": "Basic c3Rhcms6czNjcmV0"}  # stark:s3cret, the webhook's
    operator = {"Authorization": "Basic b3BzOjBwM3I="}  # ops:0p3r
    assert call(server, "GET", "/status", None, auth)[0] == 401  # the webhook's credentials open no operator door
    assert call(server, "GET", "/metrics", None, auth)[0] == 401
    assert call(server, "GET", "/status", None, operator)[2] == {"report": True}
    assert call(server, "POST", "/webhook", body, {**headers, **operator})[0] == 401  # nor the operator's the webhook
    assert call(server, "POST", "/webhook", body, {**headers, **auth})[0] == 200
    assert call(server, "GET", "/health")[0] == 200  # health stays open for probes


def test_an_operator_endpoint_the_service_did_not_wire_does_not_exist(server_for):
    server = server_for(OPERATOR_USERNAME="ops", OPERATOR_PASSWORD="0p3r")  # no retry, no replay given
    operator = {"Authorization": "Basic b3BzOjBwM3I="}  # ops:0p3r
    for path in ("/transfers/retry", "/events/replay"):
        assert call(server, "POST", path, b'{"invoice_id": "1", "event_id": "1"}', operator)[:3:2] == (
            404, {"error": "not found"}), path


def test_without_operator_credentials_the_operator_endpoints_do_not_exist(server_for):
    server = server_for(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="s3cret")
    auth = {"Authorization": "Basic c3Rhcms6czNjcmV0"}  # stark:s3cret, the webhook's
    for method, path in (("GET", "/status"), ("GET", "/metrics"), ("POST", "/transfers/retry")):
        assert call(server, method, path, b"{}", auth)[:3:2] == (404, {"error": "not found"}), path


def test_a_malformed_request_line_gets_a_json_400(server_for):
    server = server_for()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(4096), b""))  # until the server closes
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400")
    assert b'{"error"' in answer


def test_an_idle_keep_alive_connection_does_not_hold_a_handler(server_for):
    server = server_for(max_connections=1)
    holder = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    holder.request("GET", "/health")
    holder.getresponse().read()  # keep-alive: the connection stays open, waiting
    try:
        assert call(server, "GET", "/health")[0] == 200  # served by the only handler all the same
        holder.request("GET", "/health")
        assert holder.getresponse().status == 200  # and the held connection still works
    finally:
        holder.close()


def test_requests_beyond_the_handlers_and_their_queue_get_503_instead_of_a_thread(sdk, store, clock):
    config = sdk_config(sdk)
    release, entered = threading.Event(), threading.Semaphore(0)

    def stuck_health():  # a stand-in that holds its handler until released
        entered.release()
        release.wait(10)
        return HTTPStatus.OK, {"status": "ok"}

    server = Server(("127.0.0.1", 0), make_gate(store, config, clock, health=stuck_health, report=dict), 1).start()
    socks = []
    try:
        def send():
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
            return sock

        send()
        assert entered.acquire(timeout=5)  # the only handler is busy
        send(), send()  # one waits in the queue (one place per handler), the other finds it full
        answered, _, _ = select.select(socks[1:], [], [], 5)  # the refusal comes at once
        assert len(answered) == 1 and answered[0].recv(4096).startswith(b"HTTP/1.1 503")
        release.set()
        waiting = [sock for sock in socks if sock is not answered[0]]
        assert [sock.recv(4096)[:12] for sock in waiting] == [b"HTTP/1.1 200", b"HTTP/1.1 200"]
    finally:
        release.set()
        for sock in socks:
            sock.close()
        server.stop(timeout=2)


def test_keep_alive_serves_several_requests_on_one_connection(server_for):
    server = server_for()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.connect()
    sock = conn.sock
    for _ in range(5):
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        # http.client would reconnect silently after a close: the socket must be the first one.
        assert conn.sock is sock
    conn.close()


def test_stop_closes_idle_keep_alive_connections_promptly(server_for):
    server = server_for()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/health")
    conn.getresponse().read()
    server.stop(timeout=2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    conn.close()
