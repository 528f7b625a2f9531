"""server: how answers leave the socket on keep-alive connections.

An answer written in two pieces (headers, then body) on a connection with Nagle's
algorithm waits for the client's delayed ACK: about 40 ms a request on Linux, which
capped the webhook at a few hundred a second whatever the CPU. Answers are now
buffered and sent in one write, with TCP_NODELAY; the interim ``100 Continue`` is
still sent at once.
"""

import http.client
import json
import socket

import pytest

from stark_challenge.gate import Gate
from stark_challenge.server import Server
from stark_challenge.verify import Signatures

from support import make_config


class _NoSignatures(Signatures):
    """Signatures never checked: these requests stop at basic auth."""

    def check(self, content, signature, may_wait=True):  # pragma: no cover - not reached
        raise AssertionError("no request here should get as far as the signature")


@pytest.fixture
def server(store, clock):
    config = make_config(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="secret")
    server = Server(("127.0.0.1", 0), Gate(store, _NoSignatures(lambda: ""), config, clock), 4).start()  # health "ok", an empty report
    yield server
    server.stop(timeout=2)


def test_a_refused_webhook_keeps_its_keep_alive_connection_and_answers_in_full(server):
    # How fast answers leave (no wait for delayed ACKs) is measured by `make bench`; here,
    # that each answer is whole and the connection stays the same one throughout.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.connect()
    sock = conn.sock
    for _ in range(21):
        conn.request("POST", "/webhook", body=b'{"event": {}}', headers={"Authorization": "Basic eDp5"})
        response = conn.getresponse()
        assert response.status == 401 and json.loads(response.read()) == {"error": "authentication required"}
        assert conn.sock is sock  # not closed and silently reopened by http.client
    conn.close()


def test_expect_100_continue_gets_the_interim_answer_before_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(2)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        received = b""
        while b"100 Continue" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
        sock.sendall(b"{}")
        while b"401" not in received.split(b"100 Continue", 1)[1]:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
