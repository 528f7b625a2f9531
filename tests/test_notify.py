"""sd_notify: the messages systemd would read, on a real AF_UNIX datagram socket.

The service runs as a subprocess with NOTIFY_SOCKET pointing at a socket this test
bound, as systemd does for Type=notify; the Notifier itself is tested in-process for
the abstract-namespace form and the watchdog's health gate.
"""

import logging
import secrets
import signal
import socket
import threading
import time
import urllib.request

import pytest

from stark_challenge.notify import Notifier


class NotifySocket:
    """A bound datagram socket, as systemd's notify socket; ``receive`` waits with a deadline."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received = []  # every message so far, as {KEY: value} dicts in arrival order

    def receive(self, predicate, timeout=10.0, message="a notify message"):
        """Return the first message (new or already received) for which ``predicate`` holds."""
        for fields in self.received:
            if predicate(fields):
                return fields
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {message}; got {self.received}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.received.append(fields)
            if predicate(fields):
                return fields

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = NotifySocket(path)
    yield sock
    sock.close()


def _health_answers(url):
    with urllib.request.urlopen(url + "/health", timeout=2) as r:
        return r.status == 200


def test_service_notifies_ready_status_watchdog_and_stopping(notify_socket, service_factory):
    path = notify_socket.sock.getsockname()
    service = service_factory(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000", INVOICE_MIN=8, INVOICE_MAX=8)
    starting = threading.Thread(target=service.start)
    starting.start()
    try:
        ready = notify_socket.receive(lambda m: "READY" in m, message="READY=1")
        # READY=1 is sent only once the port is bound: /health answers at once.
        assert _health_answers(service.url)
    finally:
        starting.join()
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("rounds ")

    # WATCHDOG=1 every WATCHDOG_USEC / 2, each with a fresh one-line STATUS.
    beat = notify_socket.receive(lambda m: m.get("STATUS", "").startswith("rounds 1 issued"),
                                 message="STATUS after round 0")
    assert beat["WATCHDOG"] == "1"
    assert "0 transfers pending, 0 failed" in beat["STATUS"]

    service.proc.send_signal(signal.SIGTERM)
    notify_socket.receive(lambda m: m.get("STOPPING") == "1", message="STOPPING=1")
    assert service.proc.wait(15) == 0


def test_service_without_watchdog_usec_sends_no_watchdog_pings(notify_socket, service_factory):
    service = service_factory(NOTIFY_SOCKET=notify_socket.sock.getsockname())
    service.start()
    notify_socket.receive(lambda m: "READY" in m, message="READY=1")
    assert service.stop() == 0
    notify_socket.receive(lambda m: m.get("STOPPING") == "1", message="STOPPING=1")
    # Between READY and STOPPING (well under STATUS_EVERY_S): nothing else, no WATCHDOG.
    assert [sorted(m) for m in notify_socket.received] == [["READY", "STATUS"], ["STOPPING"]]


def test_abstract_namespace_socket_is_reached_with_the_at_sign():
    name = f"stark-challenge-test-{secrets.token_hex(6)}"
    sock = NotifySocket("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.send(READY=1, STATUS="two\nlines")
        # A value is made one line: systemd would read the newline as the next field.
        assert sock.receive(lambda m: True) == {"READY": "1", "STATUS": "two lines"}
    finally:
        sock.close()


def test_notifier_outside_systemd_does_nothing():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    notifier.start(healthy=lambda: True, status=lambda: "x")  # no thread, no error
    notifier.stop()


def test_unreachable_notify_socket_is_logged_not_raised(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="stark_challenge.notify"):
        assert notifier.send(READY=1) is False
    assert "sd_notify to NOTIFY_SOCKET failed" in caplog.text


def test_watchdog_is_not_pinged_while_unhealthy(notify_socket):
    checks = []

    def healthy():
        checks.append(time.monotonic())
        return len(checks) >= 3  # unhealthy for the first two checks

    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.sock.getsockname(), "WATCHDOG_USEC": "20000"})
    notifier.start(healthy, status=lambda: f"check {len(checks)}")
    try:
        first = notify_socket.receive(lambda m: "WATCHDOG" in m, message="WATCHDOG=1")
    finally:
        notifier.stop()
    assert first == {"WATCHDOG": "1", "STATUS": "check 3"}


def test_watchdog_meant_for_another_pid_is_ignored():
    environ = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000"}
    assert Notifier(environ, pid=42).watchdog_s == 1.0
    assert Notifier({**environ, "WATCHDOG_PID": "42"}, pid=42).watchdog_s == 1.0
    assert Notifier({**environ, "WATCHDOG_PID": "43"}, pid=42).watchdog_s is None
    assert Notifier({**environ, "WATCHDOG_USEC": "0"}, pid=42).watchdog_s is None


def test_status_is_refreshed_without_a_watchdog(notify_socket):
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.sock.getsockname()}, status_every_s=0.01)
    notifier.start(healthy=lambda: False, status=lambda: "serving")
    try:
        assert notify_socket.receive(lambda m: True) == {"STATUS": "serving"}
    finally:
        notifier.stop()
