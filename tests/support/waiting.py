"""Waiting for a condition with a deadline, free ports and a fake clock: tests never sleep
"long enough", they poll for what they wait for."""

import datetime
import socket
import time

__all__ = ["FakeClock", "free_port", "wait_for"]


def wait_for(predicate, timeout=15.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns something truthy; return that, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port():
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeClock:
    """A clock for tests: ``clock()`` returns an aware UTC datetime that moves only by ``advance``."""

    def __init__(self, start=datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.timezone.utc)):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += datetime.timedelta(seconds=seconds)
        return self.now
