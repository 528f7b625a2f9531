"""Screening: webhooks the HTTP selector thread decides itself, without a handler thread.

With the native verifier a signature check is cheap, so the selector thread has each
webhook checked as soon as it is whole (``Gate.admit(request, may_wait=False)``): a forged one is
refused there, on its keep-alive connection, and starts no handler thread; a genuine one
goes to a handler only to be stored, and is verified once. The pure verifier, a key not
yet fetched, or a failed check while a refetch of the key is due leave the webhook to a
handler, which decides it whole as before."""

import http.client
import json
import logging
import re
import socket
import threading
from http import HTTPStatus

import pytest
from ellipticcurve import Ecdsa, PrivateKey

from stark_challenge import verify
from stark_challenge.bank import Bank
from stark_challenge.gate import Gate
from stark_challenge.server import Server
from stark_challenge.verify import KEY_REFRESH_S, Signatures
from stark_challenge.wire import Request

from support import sdk_config, signed_event

pytestmark = pytest.mark.skipif(not verify.native_available(), reason="the [fast] extra (coincurve) is not installed")


class WatchedGate(Gate):
    """A Gate that records the thread of each request whose decision was left to a thread that may wait."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered_by = []

    def admit(self, request, may_wait=True):
        decided = super().admit(request, may_wait)
        if may_wait:
            self.answered_by.append(threading.current_thread().name)
        if not callable(decided):
            return decided

        def rest():
            self.answered_by.append(threading.current_thread().name)
            return decided()
        return rest


def screened(gate, method, path, headers, body):
    """Return what ``admit`` decides without waiting: a Reply, or None when it left the request to a handler."""
    decided = gate.admit(Request(method, path, headers, body, "127.0.0.1"), may_wait=False)
    return None if callable(decided) else decided


def forged(body, headers):
    """The same request signed by someone else's key: well-formed, only the check can tell."""
    return body, dict(headers, **{"Digital-Signature": Ecdsa.sign(body.decode(), PrivateKey()).toBase64()})


class Seconds:
    """A monotonic clock for the key cache that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def gate_for(sdk, store, clock):
    def make(verifier=None, seconds=None, **values):
        config = sdk_config(sdk, **values)
        bank = Bank(config)
        bank.configure()
        return WatchedGate(store, Signatures(bank.fetch_public_key, verifier, clock=seconds or Seconds()), config, clock)

    return make


@pytest.fixture
def server_for():
    servers = []

    def make(gate):
        servers.append(Server(("127.0.0.1", 0), gate, 4).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop(timeout=2)


def post(conn, body, headers):
    conn.request("POST", "/webhook", body=body, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_forged_webhooks_are_refused_on_the_selector_thread_and_reach_no_handler(emulator, gate_for, server_for,
                                                                                  store):
    gate = gate_for()
    server = server_for(gate)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1", "amount": 1000}, log_type="paid")
    assert post(conn, body, headers) == (200, {"status": "stored", "event": "ev-1"})  # the key is fetched here
    sock = conn.sock
    assert gate.answered_by == ["http-0"]

    for n in range(20):
        status, answer = post(conn, *forged(*signed_event(emulator, f"ev-x{n}", {"id": "inv-1"})))
        assert (status, answer) == (401, {"error": "invalid Digital-Signature"})
        assert conn.sock is sock  # answered on the same keep-alive connection
    conn.close()

    assert gate.answered_by == ["http-0"]  # no forged one reached a handler
    assert [e.id for e in store.pending_events()] == ["ev-1"]
    assert gate.counters.value("stark_challenge_signature_verifications_total", (("verdict", "invalid"),)) == 20
    assert gate.counters.value("stark_challenge_webhooks_total",
                               (("outcome", "refused"), ("reason", "bad_signature"))) == 20
    assert gate._signatures.keys.fetches == 1


def test_a_genuine_webhook_screened_is_verified_once_and_stored_before_its_200(emulator, gate_for, server_for, store):
    gate = gate_for()
    gate._signatures.keys.get()  # cached: every webhook can be screened
    server = server_for(gate)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for n in range(3):
        body, headers = signed_event(emulator, f"ev-{n}", {"id": f"inv-{n}"}, log_type="paid")
        assert post(conn, body, headers) == (200, {"status": "stored", "event": f"ev-{n}"})
        assert f"ev-{n}" in [e.id for e in store.pending_events()]
    assert post(conn, body, headers) == (200, {"status": "duplicate", "event": "ev-2"})
    conn.close()
    assert gate.counters.value("stark_challenge_signature_verifications_total", (("verdict", "valid"),)) == 4


def test_pipelined_requests_are_answered_in_order_and_close_when_asked(emulator, gate_for, server_for, store):
    gate = gate_for(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="s3cret")
    gate._signatures.keys.get()
    server = server_for(gate)
    auth = {"Authorization": "Basic c3Rhcms6czNjcmV0"}  # stark:s3cret

    def request(body, headers, close=False):
        fields = {**headers, "Content-Length": str(len(body)), **({"Connection": "close"} if close else {})}
        head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        return f"POST /webhook HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body

    genuine = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    bad = forged(*signed_event(emulator, "ev-2", {"id": "inv-2"}))
    stream = (request(bad[0], {**bad[1], **auth}) + request(genuine[0], genuine[1])  # no basic auth: 401
              + request(genuine[0], {**genuine[1], **auth}) + request(bad[0], {**bad[1], **auth}, close=True))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(stream)
        received = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)] == [401, 401, 200, 401]
    assert received.count(b"Connection: close") == 1
    assert [e.id for e in store.pending_events()] == ["ev-1"]


def test_with_the_pure_verifier_the_selector_decides_nothing(emulator, gate_for, server_for):
    gate = gate_for(verifier=verify.PureVerifier())
    gate._signatures.keys.get()
    body, headers = forged(*signed_event(emulator, "ev-1", {"id": "inv-1"}))
    assert screened(gate, "POST", "/webhook", headers, body) is None
    assert gate.counters.value("stark_challenge_webhooks_total", (("outcome", "refused"), ("reason", "bad_signature"))) == 0

    server = server_for(gate)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    assert post(conn, body, headers) == (401, {"error": "invalid Digital-Signature"})
    conn.close()
    assert gate.answered_by == ["http-0"]  # a handler checked it


def test_only_webhooks_are_screened(emulator, gate_for):
    gate = gate_for()
    gate._signatures.keys.get()
    body, headers = forged(*signed_event(emulator, "ev-1", {"id": "inv-1"}))
    for method, path in (("GET", "/health"), ("POST", "/transfers/retry"), ("PUT", "/webhook"), ("POST", "/nope")):
        assert screened(gate, method, path, headers, body) is None
    assert screened(gate, "POST", "/webhook?x=1", headers, body).status == HTTPStatus.UNAUTHORIZED


def test_without_a_cached_key_the_handler_decides(emulator, gate_for):
    gate = gate_for()
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    assert screened(gate, "POST", "/webhook", headers, body) is None
    assert gate._signatures.keys.fetches == 0  # the selector thread never fetches


def test_a_failed_check_while_a_refetch_is_due_is_left_to_the_handler_which_refetches(emulator, gate_for):
    seconds = Seconds()
    gate = gate_for(seconds=seconds)
    gate._signatures.keys.get()
    body, headers = forged(*signed_event(emulator, "ev-1", {"id": "inv-1"}))

    seconds.now += KEY_REFRESH_S - 1  # the key was fetched less than a minute ago: refused at once
    assert screened(gate, "POST", "/webhook", headers, body).status == HTTPStatus.UNAUTHORIZED

    seconds.now += 2  # a minute later the key may have been rotated: only the handler, which may fetch, decides
    assert screened(gate, "POST", "/webhook", headers, body) is None
    assert gate._signatures.keys.fetches == 1
    assert gate.admit(Request("POST", "/webhook", headers, body)).status == HTTPStatus.UNAUTHORIZED
    assert gate._signatures.keys.fetches == 2


class BrokenScreenGate(WatchedGate):
    """A Gate whose decisions without waiting fail as a bug would."""

    def admit(self, request, may_wait=True):
        if not may_wait:
            raise RuntimeError("a bug in a check")
        return super().admit(request, may_wait)


def test_a_screening_that_fails_leaves_the_request_to_a_handler_and_the_selector_reading(
        emulator, sdk, store, clock, server_for, caplog):
    config = sdk_config(sdk)
    bank = Bank(config)
    bank.configure()
    gate = BrokenScreenGate(store, Signatures(bank.fetch_public_key), config, clock)
    server = server_for(gate)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    assert post(conn, *forged(body, headers)) == (401, {"error": "invalid Digital-Signature"})
    assert post(conn, body, headers) == (200, {"status": "stored", "event": "ev-1"})
    conn.close()
    assert len(gate.answered_by) == 2 and "http" not in gate.answered_by  # handlers decided both, not the selector
    assert server.alive()
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]  # one traceback a minute


def test_access_lines_at_debug_read_the_same_from_the_selector_and_from_a_handler(emulator, gate_for, server_for,
                                                                                   caplog):
    caplog.set_level(logging.DEBUG, logger="stark_challenge.server")
    gate = gate_for()
    gate._signatures.keys.get()
    server = server_for(gate)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body, headers = signed_event(emulator, "ev-1", {"id": "inv-1"}, log_type="paid")
    assert post(conn, *forged(body, headers))[0] == 401  # answered by the selector thread
    assert post(conn, body, headers)[0] == 200  # stored by a handler
    conn.close()
    assert gate.answered_by == ["http-0"]  # the forged one never reached a handler
    access = [r.getMessage() for r in caplog.records if "/webhook" in r.getMessage()]
    assert access == ['127.0.0.1 "POST /webhook HTTP/1.1" 401 -', '127.0.0.1 "POST /webhook HTTP/1.1" 200 -']
