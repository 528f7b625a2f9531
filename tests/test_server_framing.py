"""server: the head check (``wire.read_head``'s framing), the held-connection bound, and unexpected errors, on a real socket."""

import logging
import socket
from http import HTTPStatus

import pytest

from stark_challenge.bank import Bank
from stark_challenge.gate import Gate
from stark_challenge.server import Server
from stark_challenge.verify import Signatures
from stark_challenge.wire import MAX_BODY_BYTES, MAX_HEADER_LINES, Framing, read_head

from support import make_config, wait_for


def head(*lines, request_line=b"POST /webhook HTTP/1.1"):
    return b"\r\n".join((request_line,) + lines)


def check_head(raw):
    """Return the Framing ``read_head`` gives a head."""
    return read_head(raw).framing


@pytest.mark.parametrize("raw, expected", [
    (head(b"Host: x", b"Content-Length: 12"), Framing(body_bytes=12)),
    (head(b"Content-Length: 12", b"Content-Length: 012"), Framing(body_bytes=12)),
    (head(b"Host: x"), Framing(body_bytes=0)),
    (head(b"Content-Length: 2", b"Expect: 100-continue"), Framing(body_bytes=2, expect_continue=True)),
    (head(b"Expect: 100-continue", request_line=b"POST / HTTP/1.0"), Framing()),  # 1.0 has no interim answers
    (head(b"Host: x").replace(b"\r\n", b"\n"), Framing()),  # bare LF line ends, as http.server reads them
])
def test_a_well_framed_head_gives_its_body_length(raw, expected):
    assert check_head(raw) == expected


@pytest.mark.parametrize("raw, status, reason", [
    (head(b"Content-Length: \xc2\xb2"), 400, "Content-Length must be ASCII digits"),
    (head(b"Content-Length: -1"), 400, "Content-Length must be ASCII digits"),
    (head(b"Content-Length: 1,1"), 400, "Content-Length must be ASCII digits"),
    (head(b"Content-Length:"), 400, "Content-Length must be ASCII digits"),
    (head(b"Content-Length: 1", b"Content-Length: 2"), 400, "conflicting Content-Length headers"),
    (head(b"Transfer-Encoding: chunked"), 400, "Transfer-Encoding is not accepted; send a Content-Length"),
    (head(b"Content-Length: 3", b"transfer-encoding: identity"), 400,
     "Transfer-Encoding is not accepted; send a Content-Length"),
    (head(b"Host : x"), 400, "malformed header line"),
    (head(b"Host: x", b" folded"), 400, "malformed header line"),
    (head(b"no colon"), 400, "malformed header line"),
    (head(request_line=b"GET /"), 400, "malformed request line"),
    (head(request_line=b"GET  / HTTP/1.1"), 400, "malformed request line"),
    (head(request_line=b"GET / HTTP/2.0"), 400, "malformed request line"),
    (head(request_line=b"G(T / HTTP/1.1"), 400, "malformed request line"),
    (head(*[b"X: y"] * (MAX_HEADER_LINES + 1)), 431, f"more than {MAX_HEADER_LINES} header lines"),
    (head(b"Content-Length: %d" % (MAX_BODY_BYTES + 1)), 413, f"body over {MAX_BODY_BYTES} bytes"),
    (head(b"Content-Length: " + b"9" * 5000), 413, f"body over {MAX_BODY_BYTES} bytes"),
])
def test_an_ambiguous_or_oversized_head_is_refused_with_its_reason(raw, status, reason):
    assert check_head(raw) == Framing(HTTPStatus(status), reason)


def test_the_largest_head_allowed_passes():
    assert check_head(head(*[b"X: y"] * MAX_HEADER_LINES)) == Framing()


@pytest.fixture
def make_server(store, clock):
    started = []

    def make(health=lambda: (HTTPStatus.OK, {"status": "ok"}), **kwargs):
        config = make_config()
        signatures = Signatures(Bank(config).fetch_public_key)
        server = Server(("127.0.0.1", 0), Gate(store, signatures, config, clock, health=health, report=dict),
                        **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(timeout=2)


def test_a_new_connection_evicts_the_held_one_closest_to_its_deadline_instead_of_waiting(make_server):
    server = make_server(max_connections=1, max_open=2)
    first = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    second = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        # Both hold a place, silent; accepted in order, so the first one's deadline is the nearest.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert third.recv(4096).startswith(b"HTTP/1.1 200")
        assert first.recv(4096) == b""  # the oldest deadline: evicted
    finally:
        first.close()
        second.close()


def test_an_unexpected_error_is_500_and_its_traceback_is_logged_at_most_once_a_minute(make_server, caplog):
    def broken():
        raise KeyError("a bug")

    server = make_server(health=broken)
    caplog.set_level(logging.INFO, logger="stark_challenge.server")
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b"".join(iter(lambda: sock.recv(4096), b""))
        assert answer.startswith(b"HTTP/1.1 500") and answer.endswith(b'{"error":"internal error"}\n')
    wait_for(lambda: caplog.records, message="a log line")
    with_traceback = [r for r in caplog.records if r.exc_info]
    assert len(with_traceback) == 1 and "KeyError" in caplog.text
    assert len(caplog.records) < 20  # the rest are throttled too, with a count


def test_the_server_is_alive_while_its_selector_thread_runs(make_server):
    server = make_server()
    assert server.alive()
    server.stop(timeout=2)
    assert not server.alive()
