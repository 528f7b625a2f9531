"""Webhook: decide what to answer to a POST /webhook, and store the event if it is genuine.

No sockets here: ``Intake.receive`` takes the headers and the raw body and returns
a ``Reply`` (status, JSON body, extra headers), so it can be tested without a server.

The checks, cheapest first, and the answer each failure gets:

====================================================  ========================
check                                                 failure
====================================================  ========================
framing: head at most 16 KiB and 64 lines, one        400 / 431 / 413 and the
Content-Length of ASCII digits (at most 64 KiB), no   connection closed (in
Transfer-Encoding, a well-formed request line         ``server``, before reading
                                                      the body)
basic auth, when configured (constant-time compare)   401 + WWW-Authenticate
Content-Length present                                411 (in ``server``)
``Digital-Signature`` header present                  401
body is UTF-8                                         400
signature matches the exact raw body (``bank``)       401
Stark Bank's key cannot be fetched                    503 (Stark Bank retries)
body is JSON, nested less than the parser's depth,    400
and an event of the expected shape
the store cannot write                                503 (Stark Bank retries)
====================================================  ========================

Only then: 200. The event is committed to the store before the answer, so an
acknowledged event is never lost; a redelivered one is answered 200 and not stored
again. Processing happens later, from the store (``worker``). Thread-safe.

Refusals are logged through a ``logs.Throttle``: the first of each kind, then at
most one a second with the count held back, so a flood of forged requests is not
also a flood of log lines (issue #6).
"""

import base64
import binascii
import hmac
import json
import logging
from http import HTTPStatus
from typing import NamedTuple

from . import events
from .errors import BankUnavailable, SignatureError, StarkChallengeError
from .logs import Throttle

__all__ = ["Intake", "Reply", "check_basic_auth", "MAX_BODY_BYTES"]

logger = logging.getLogger(__name__)

# Stark Bank's events are a few KiB; anything larger is not one of them (issue #2).
MAX_BODY_BYTES = 64 * 1024


class Reply(NamedTuple):
    """What to answer: an HTTP status, a JSON-able body, and extra headers."""

    status: HTTPStatus
    body: dict
    headers: tuple = ()


def _error(status, message, headers=()):
    return Reply(status, {"error": message}, headers)


def check_basic_auth(header, username, password):
    """Return True if the Authorization ``header`` carries exactly these basic-auth credentials.

    Compares in constant time (both fields always compared), so the answer's timing
    does not tell how much of a guess was right.
    """
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_password = decoded.partition(b":")
    user_ok = hmac.compare_digest(given_user, username.encode("utf-8"))
    password_ok = hmac.compare_digest(given_password, password.encode("utf-8"))
    return bool(sep) & user_ok & password_ok


class Intake:
    """Checks webhooks and stores genuine events. Collaborators come in through the constructor."""

    # A hook: overridable to add a realm per deployment.
    realm = "stark_challenge"

    def __init__(self, store, bank, config, clock, on_event=None):
        self._store = store
        self._bank = bank
        self._username = config.webhook_username
        self._password = config.webhook_password
        self._clock = clock  # () -> aware UTC datetime
        self._on_event = on_event or (lambda: None)  # called after a new event is stored
        self._refusals = Throttle()  # refusal lines: the first of a kind, then at most one a second

    def authorize(self, headers):
        """Return None if the request may proceed, or the 401 Reply if basic auth fails."""
        if not (self._username and self._password):
            return None
        if check_basic_auth(headers.get("Authorization"), self._username, self._password):
            return None
        return _error(
            HTTPStatus.UNAUTHORIZED, "authentication required",
            (("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'),),
        )

    def receive(self, headers, body):
        """Check a webhook whose basic auth already passed; store its event; return the Reply."""
        signature = headers.get("Digital-Signature")
        if not signature:
            self._refusals.log(logger, logging.WARNING, "webhook refused: no Digital-Signature header")
            return _error(HTTPStatus.UNAUTHORIZED, "missing Digital-Signature header")
        try:
            content = body.decode("utf-8")
        except UnicodeDecodeError:
            self._refusals.log(logger, logging.WARNING, "webhook refused: body is not UTF-8")
            return _error(HTTPStatus.BAD_REQUEST, "body is not UTF-8")
        try:
            self._bank.verify_event(content, signature)
        except SignatureError as e:
            self._refusals.log(logger, logging.WARNING, "webhook refused: %s", e, kind=str(e))
            return _error(HTTPStatus.UNAUTHORIZED, "invalid Digital-Signature")
        except BankUnavailable as e:
            self._refusals.log(logger, logging.WARNING,
                               "webhook not verified, Stark Bank's key is unavailable (%s); answering 503", e)
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "cannot verify the signature now; deliver again later")
        try:
            event = events.check_shape(json.loads(content))
        except ValueError as e:  # json.JSONDecodeError is a ValueError; so is an int of too many digits
            self._refusals.log(logger, logging.WARNING, "webhook refused: signed but malformed (%s)", e,
                               kind="malformed")
            return _error(HTTPStatus.BAD_REQUEST, f"malformed event: {e}")
        except RecursionError:  # json's C scanner recurses once per nested [ or {
            self._refusals.log(logger, logging.WARNING, "webhook refused: signed but nested too deeply")
            return _error(HTTPStatus.BAD_REQUEST, "malformed event: nested too deeply")
        try:
            new = self._store.add_event(
                event["id"], event["subscription"], event["log"]["type"], events.entity_of(event),
                event, "webhook", self._clock(),
            )
        except StarkChallengeError as e:
            logger.error("webhook %s not stored: %s; answering 503", event["id"], e)
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "cannot store the event now; deliver again later")
        if new:
            logger.info(
                "webhook accepted: event %s, %s %s %s",
                event["id"], event["subscription"], event["log"]["type"], events.entity_of(event),
            )
            self._on_event()
            return Reply(HTTPStatus.OK, {"status": "stored", "event": event["id"]})
        logger.info("webhook accepted: event %s again (already stored)", event["id"])
        return Reply(HTTPStatus.OK, {"status": "duplicate", "event": event["id"]})
