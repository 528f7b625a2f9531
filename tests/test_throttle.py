"""logs.Throttle: a flood of refusals logs one line a second of each kind, with a count."""

import http.client
import logging

import pytest

from stark_challenge.logs import Throttle
from stark_challenge.server import Server

from support import make_config, make_gate

logger = logging.getLogger("stark_challenge.test_throttle")


class Clock:
    """Monotonic seconds that move only by ``advance``."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == logger.name]


def test_the_first_line_of_a_kind_is_logged_and_repeats_within_the_interval_are_counted(caplog):
    clock = Clock()
    throttle = Throttle(interval_s=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert throttle.log(logger, logging.WARNING, "refused from %s", "10.0.0.1") is True
        for _ in range(41):
            assert throttle.log(logger, logging.WARNING, "refused from %s", "10.0.0.2") is False
        clock.advance(1.0)
        assert throttle.log(logger, logging.WARNING, "refused from %s", "10.0.0.3") is True
        clock.advance(5.0)
        assert throttle.log(logger, logging.WARNING, "refused from %s", "10.0.0.4") is True
    assert messages(caplog) == [
        "refused from 10.0.0.1",
        "refused from 10.0.0.3 (41 more like it held back since the last one logged)",
        "refused from 10.0.0.4",
    ]


def test_kinds_are_throttled_apart(caplog):
    throttle = Throttle(interval_s=1.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger=logger.name):
        throttle.log(logger, logging.WARNING, "no signature")
        throttle.log(logger, logging.WARNING, "refused: %s", "malformed", kind="malformed")
        throttle.log(logger, logging.WARNING, "refused: %s", "does not match", kind="does not match")
        throttle.log(logger, logging.WARNING, "refused: %s", "does not match", kind="does not match")
        throttle.log(logger, logging.WARNING, "no signature")
    assert messages(caplog) == ["no signature", "refused: malformed", "refused: does not match"]


def test_lines_below_the_level_are_neither_logged_nor_counted(caplog):
    clock = Clock()
    throttle = Throttle(interval_s=1.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        assert throttle.log(logger, logging.WARNING, "quiet") is False
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert throttle.log(logger, logging.WARNING, "quiet") is True
    assert messages(caplog) == ["quiet"]


@pytest.fixture
def server(store, clock):
    config = make_config(WEBHOOK_USERNAME="stark", WEBHOOK_PASSWORD="secret")
    server = Server(("127.0.0.1", 0), make_gate(store, config, clock), 4).start()  # health "ok", an empty report
    yield server
    server.stop(timeout=2)


def test_a_flood_of_bad_basic_auth_is_answered_401_each_time_and_logged_once(server, caplog):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    with caplog.at_level(logging.WARNING, logger="stark_challenge.gate"):
        for _ in range(50):
            conn.request("POST", "/webhook", body=b"{}", headers={"Authorization": "Basic eDp5"})
            response = conn.getresponse()
            assert response.status == 401 and response.read()
    conn.close()
    refusals = [r.getMessage() for r in caplog.records if r.name == "stark_challenge.gate"]
    # 50 requests take well under the 1 s interval here; a slow machine may log a second line.
    assert refusals[0] == "webhook refused: bad or missing basic auth from 127.0.0.1"
    assert 1 <= len(refusals) <= 3
