"""server: a request's head is read once (``wire.read_head``), and the request the gate
decides carries what ``http.server`` would read from it: method, path, headers, body;
the connection is kept or closed as ``http.server`` would."""

import email.utils
import re
import socket
from datetime import timezone
from http import HTTPStatus

import pytest

from stark_challenge.gate import Gate
from stark_challenge.server import Server
from stark_challenge.wire import Framing, Head, Headers, HttpDate, read_head

from support import make_config, make_gate


def test_a_head_gives_its_request_line_and_fields_in_one_reading():
    head = read_head(b"POST /webhook?x=1 HTTP/1.1\r\nHost: example\r\nContent-Length: 2\r\n"
                     b"digital-signature:  MEUCIQ== \t\r\nX-Name: caf\xe9")
    assert head[:4] == (Framing(body_bytes=2), "POST", "/webhook?x=1", "HTTP/1.1")
    assert head.headers.items() == [("Host", "example"), ("Content-Length", "2"),
                                    ("digital-signature", "MEUCIQ=="), ("X-Name", "café")]


def test_header_lookup_ignores_case_and_the_first_of_repeated_fields_wins():
    headers = read_head(b"GET / HTTP/1.0\nAuthorization: Basic first\nAUTHORIZATION: Basic second").headers
    assert headers.get("authorization") == headers["Authorization"] == "Basic first"
    assert "AuThOrIzAtIoN" in headers and len(headers) == 2
    assert headers.get("Digital-Signature") is None and headers["Digital-Signature"] is None
    assert headers.get("Connection", "") == ""


@pytest.mark.parametrize("raw", [
    b"POST /webhook HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"POST /webhook HTTP/1.1\r\nHost: x\r\n folded",
    b"GET / HTTP/2.0",
])
def test_a_refused_head_gives_its_framing_and_no_fields(raw):
    head = read_head(raw)
    assert head.framing.error == HTTPStatus.BAD_REQUEST
    assert head == Head(head.framing) and len(head.headers) == 0


class _RecordingGate(Gate):
    """A Gate that keeps each request the server brought to ``admit``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def admit(self, request, may_wait=True):
        self.seen.append((request.method, request.path, request.headers, request.body))
        return super().admit(request, may_wait)


@pytest.fixture
def server(store, clock):
    config = make_config()
    gate = make_gate(store, config, clock, _RecordingGate, health=lambda: (HTTPStatus.OK, {"status": "ok"}))
    server = Server(("127.0.0.1", 0), gate, max_connections=2).start()
    yield server
    server.stop(timeout=2)


def exchange(server, data):
    """Send ``data``, read until the server closes the connection; return the status codes answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def test_the_server_passes_the_gate_the_request_line_headers_and_body(server):
    assert exchange(server, b"POST /nope?a=b HTTP/1.1\r\nHost: x\r\nX-Token:  t1 \r\nContent-Length: 3\r\n"
                            b"Connection: close\r\n\r\nabc") == [404]
    ((method, path, headers, body),) = server.gate.seen
    assert (method, path, body) == ("POST", "/nope?a=b", b"abc")
    assert headers.get("x-token") == "t1" and headers.get("connection") == "close"


def test_a_path_beginning_with_two_slashes_is_read_as_one_as_http_server_does(server):
    assert exchange(server, b"GET //health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == [200]
    assert server.gate.seen[0][1] == "/health"


@pytest.mark.parametrize("first, answered", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", [200, 200]),  # 1.1 keeps the connection
    (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [200]),
    (b"GET /health HTTP/1.0\r\n\r\n", [200]),  # 1.0 closes
    (b"GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", [200, 200]),
])
def test_a_connection_is_kept_or_closed_after_an_answer_as_its_version_and_connection_header_say(
        server, first, answered):
    second = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert exchange(server, first + second) == answered


def test_every_answer_carries_the_server_and_a_utc_date(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    fields = dict(line.split(": ", 1) for line in received.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
    assert fields["Server"] == "stark_challenge" and fields["Cache-Control"] == "no-store"
    assert email.utils.parsedate_to_datetime(fields["Date"]).tzinfo == timezone.utc


def test_the_date_is_formatted_once_a_second():
    now = [1_700_000_000.25]
    calls = []

    def clock():
        calls.append(now[0])
        return now[0]

    date = HttpDate(clock)
    first = date()
    now[0] += 0.5
    assert date() is first  # the same second: the text made before
    now[0] += 0.5
    assert date() == email.utils.formatdate(1_700_000_001, usegmt=True) != first
    assert first == "Tue, 14 Nov 2023 22:13:20 GMT" and len(calls) == 3


def test_an_empty_headers_object_answers_none():
    assert Headers().get("Host") is None and Headers().items() == []
