"""server: answers leave on non-blocking sockets (``wire.send_all``): whole when the
client reads, given up after the request timeout when it does not, and never holding a
handler thread past that bound; handler threads start as requests need them, up to
``max_connections``."""

import functools
import logging
import socket
import threading
from http import HTTPStatus

import pytest

from stark_challenge.server import Server, _Connection
from stark_challenge.wire import read_head, request, send_all

from support import make_config, make_gate, wait_for

BIG = bytes(range(256)) * 16 * 1024  # 4 MiB: more than a socket pair's buffers hold, so the send must wait


@pytest.fixture
def pair():
    sender, receiver = socket.socketpair()
    sender.setblocking(False)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_data_larger_than_the_socket_buffers_is_sent_whole_while_the_client_reads(pair):
    sender, receiver = pair
    received = bytearray()

    def read_all():
        while len(received) < len(BIG):
            chunk = receiver.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        assert send_all(sender, BIG, timeout_s=30) is True
    finally:
        reader.join(30)
    assert bytes(received) == BIG


def test_a_client_that_does_not_read_is_given_up_after_the_timeout(pair):
    sender, receiver = pair
    assert send_all(sender, BIG, timeout_s=0.2) is False
    receiver.setblocking(False)
    assert 0 < len(receiver.recv(len(BIG))) < len(BIG)  # some of it went, not all


def test_a_connection_the_client_closed_raises_for_the_caller_to_close(pair):
    sender, receiver = pair
    receiver.close()
    with pytest.raises(OSError):
        send_all(sender, b"HTTP/1.1 200 OK\r\n\r\n", timeout_s=5)


def test_an_answer_to_a_client_that_has_gone_is_dropped_quietly_and_its_connection_closed(store, clock, caplog):
    config = make_config()
    gate = make_gate(store, config, clock, health=lambda: (HTTPStatus.OK, {"status": "ok"}))
    server = Server(("127.0.0.1", 0), gate)  # not started: a handler needs only its gate and bounds
    ours, client = socket.socketpair()
    ours.setblocking(False)
    client.close()
    caplog.set_level(logging.DEBUG, logger="stark_challenge.server")
    try:
        head = read_head(b"GET /health HTTP/1.1\r\nHost: x")
        decide = functools.partial(gate.admit, request(head, b"", "127.0.0.1"))
        server._serve((_Connection(ours, ("127.0.0.1", 1), 0.0), head, decide))  # as a handler thread does
        assert ours.fileno() == -1  # a keep-alive request, but nothing more can come: closed
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        ours.close()
        server.stop(timeout=2)


def read_until_closed(sock):
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:  # closed with requests of ours unread: a reset
        pass
    return bytes(received)


def test_a_client_that_stops_reading_its_answers_does_not_hold_the_only_handler(store, clock, caplog):
    # Pipelined requests whose large answers are never read fill the socket's buffers; the
    # one handler gives up on that connection after the request timeout, says so, and
    # answers the next client.
    config = make_config()
    large = {"status": "x" * 60_000}
    gate = make_gate(store, config, clock, health=lambda: (HTTPStatus.OK, large))
    server = Server(("127.0.0.1", 0), gate, max_connections=1, request_timeout_s=0.5).start()
    caplog.set_level(logging.WARNING, logger="stark_challenge.server")
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as stuck:
            stuck.sendall(request * 1000)  # 33 kB: taken whole by the buffers; 60 MB of answers are not
            wait_for(lambda: "not read within 0.5 s; connection closed" in caplog.text,
                     message="the handler giving up on the unread answers")
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as other:
                other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = read_until_closed(other)
            assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b'"}\n')
            assert read_until_closed(stuck).count(b"HTTP/1.1 200 OK") < 1000  # cut, not answered in full
    finally:
        server.stop(timeout=2)


def test_handler_threads_start_as_requests_need_them_and_never_beyond_max_connections(store, clock):
    config = make_config()
    release = threading.Event()

    def held_health():
        release.wait(30)
        return HTTPStatus.OK, {"status": "ok"}

    gate = make_gate(store, config, clock, health=held_health)
    server = Server(("127.0.0.1", 0), gate, max_connections=3).start()
    handlers = lambda: [t for t in server._pool.threads if t.is_alive()]  # noqa: E731
    clients = []
    try:
        assert handlers() == []  # idle: only the selector thread
        for _ in range(5):  # three are answered at once, two wait for a free handler
            client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            clients.append(client)
        wait_for(lambda: len(handlers()) == 3, message="three handler threads")
        release.set()
        answers = [read_until_closed(client) for client in clients]
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert len(server._pool.threads) == 3  # none started beyond max_connections
    finally:
        release.set()
        for client in clients:
            client.close()
        server.stop(timeout=2)

