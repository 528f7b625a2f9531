"""server: the edges of the HTTP front door on a raw socket: HEAD sends no body, a body the
server does not want and cannot skip ends the connection, a body cut short is not stored."""

import json
import socket

import pytest

from stark_challenge.bank import Bank
from stark_challenge.gate import Gate
from stark_challenge.logs import Throttle
from stark_challenge.server import Server
from stark_challenge.verify import Signatures
from stark_challenge.wire import Request

from support import make_config, make_gate, sdk_config


@pytest.fixture
def server(sdk, store, clock):
    config = sdk_config(sdk)
    bank = Bank(config)
    bank.configure()
    gate = Gate(store, Signatures(bank.fetch_public_key), config, clock, report=lambda: {"report": True})  # health: "ok"
    server = Server(("127.0.0.1", 0), gate, 4).start()
    yield server
    server.stop(timeout=2)


def read_until_closed(sock):
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_head_answers_the_headers_of_get_and_no_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = read_until_closed(sock)
    head, rest = received.split(b"\r\n\r\n", 1)
    # The bytes after HEAD's headers are the GET's answer: HEAD wrote no body.
    assert rest.startswith(b"HTTP/1.1 200")
    get_body = rest.split(b"\r\n\r\n", 1)[1]
    assert json.loads(get_body) == {"status": "ok"}
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(get_body)}".encode() in head


def test_a_body_of_unknown_length_is_refused_and_ends_the_connection_on_any_path(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        received = read_until_closed(sock)  # the server closes: it cannot tell where the next request starts
    assert received.startswith(b"HTTP/1.1 400") and received.count(b"HTTP/1.1") == 1


def test_a_body_shorter_than_its_length_is_dropped_and_nothing_is_stored(server, store):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\": ")
        sock.shutdown(socket.SHUT_WR)
        assert read_until_closed(sock) == b""
    assert store.pending_events() == []


def test_a_method_http_server_does_not_know_is_501_in_json_and_ends_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"BREW /webhook HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = read_until_closed(sock)  # closed after the 501: the GET behind it is not answered
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 501") and b"Connection: close" in head
    assert json.loads(body) == {"error": "Unsupported method ('BREW')"}


def test_unsupported_methods_of_any_name_share_one_throttled_refusal_line(store, clock, caplog):
    # A client chooses the method's name: one kind of line for all, so they cannot grow the throttle.
    gate = make_gate(store, make_config(), clock)
    gate.refusals = Throttle(interval_s=3600)
    for method in ("BREW", "SPAM", "X" * 100):
        reply = gate.admit(Request(method, "/", {}, None, "127.0.0.1"))
        assert (reply.status, reply.close) == (501, True)
    assert len([r for r in caplog.records if "refused (501)" in r.getMessage()]) == 1
