"""Webhook delivery: POST each event, signed, to every subscribed URL, with bounded retries.

`Courier.publish` receives the events the ledger makes. For each webhook subscribed to
an event's subscription it sends ``{"event": {...}}`` as compact JSON (`body_of`) with the header
`Digital-Signature` (base64 ECDSA of the exact body bytes, by `EventKey`) and, when the
URL carries userinfo (http://user:pass@host/...), an `Authorization: Basic` header built
from it, the userinfo itself being stripped from the URL. A 2xx answer marks the event
delivered; anything else (status, connection error, timeout) is retried after
delivery_backoff_s, doubling, up to delivery_attempts tries. Every try is recorded.

Fault knobs: deliver_times sends each delivery N times (sequentially, or at once from N
threads with deliver_concurrently), and hold_deliveries queues them until `release`.

Threads: each delivery runs on its own daemon thread, so API requests and timers never
wait on a receiver. `stop` interrupts backoff waits and joins the threads.
"""

import base64
import datetime
import http.client
import json
import logging
import threading
from typing import NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["Courier", "body_of"]

logger = logging.getLogger(__name__)

# How long concurrent copies wait for each other before sending anyway.
_BARRIER_TIMEOUT_S = 2.0


def body_of(event):
    """Return the exact bytes pushed for an event: ``{"event": ...}``, compact JSON, without
    isDelivered (a pushed event does not carry it: see the event Stark Bank signed in
    tests/fixtures; the API's event does)."""
    pushed = {name: value for name, value in event.items() if name != "isDelivered"}
    return json.dumps({"event": pushed}, separators=(",", ":")).encode("utf-8")


class _Delivery(NamedTuple):
    """One event bound for one webhook."""

    event_id: str
    webhook_id: str
    url: str
    """The webhook URL as registered, userinfo included."""
    body: bytes
    """The exact bytes sent and signed."""


def _split_credentials(url):
    """Return (url without userinfo, Authorization header value or None)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname if ":" not in parts.hostname else "[%s]" % parts.hostname
    if parts.port is not None:
        netloc += ":%d" % parts.port
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    userpass = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
    return clean, "Basic " + base64.b64encode(userpass.encode("utf-8")).decode("ascii")


class Courier:
    """Sends events to webhooks on background threads and records every try; thread-safe."""

    def __init__(self, knobs, event_key, webhooks_for, mark_delivered, record_attempt=None):
        self._knobs = knobs
        self._event_key = event_key
        self._webhooks_for = webhooks_for  # subscription -> [(webhook id, url)]
        self._mark_delivered = mark_delivered  # event id -> None
        self._record_attempt = record_attempt or (lambda event_id, webhook_id, code, message: None)
        self._lock = threading.Lock()
        self._held = []  # deliveries queued while hold_deliveries is on
        self._attempts = []  # every try, as returned by attempts()
        self._threads = set()
        self._stopping = threading.Event()

    def publish(self, events):
        """Start (or hold) the delivery of each event to every webhook subscribed to it."""
        for event in events:
            body = body_of(event)
            for webhook_id, url in self._webhooks_for(event["subscription"]):
                delivery = _Delivery(event["id"], webhook_id, url, body)
                with self._lock:
                    if self._knobs.hold_deliveries:
                        self._held.append(delivery)
                        continue
                self._send(delivery)

    def release(self, count=None):
        """Send the ``count`` oldest held deliveries now (all by default; hold_deliveries stays as set);
        return how many."""
        with self._lock:
            cut = len(self._held) if count is None else count
            held, self._held = self._held[:cut], self._held[cut:]
        for delivery in held:
            self._send(delivery)
        return len(held)

    def held(self):
        """Return how many deliveries are held."""
        with self._lock:
            return len(self._held)

    def attempts(self):
        """Return a copy of the record of every try, oldest first."""
        with self._lock:
            return [dict(attempt) for attempt in self._attempts]

    def busy(self):
        """Return True while some delivery thread is still running."""
        with self._lock:
            return bool(self._threads)

    def stop(self, timeout_s=None):
        """Stop retrying and sending, drop held deliveries, join the threads; idempotent."""
        self._stopping.set()
        with self._lock:
            self._held.clear()
            threads = list(self._threads)
        timeout_s = self._knobs.delivery_timeout_s + 1 if timeout_s is None else timeout_s
        for thread in threads:
            thread.join(timeout_s)

    def _send(self, delivery):
        times = self._knobs.deliver_times
        if times > 1 and self._knobs.deliver_concurrently:
            barrier = threading.Barrier(times)
            for copy in range(1, times + 1):
                self._spawn(self._deliver, delivery, copy, barrier)
        else:
            self._spawn(self._deliver_copies, delivery, times)

    def _spawn(self, target, *args):
        def run():
            try:
                target(*args)
            except Exception:
                logger.exception("delivery of event %s failed unexpectedly", args[0].event_id)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        with self._lock:
            if self._stopping.is_set():
                return
            thread = threading.Thread(target=run, name="emulator-delivery", daemon=True)
            self._threads.add(thread)
        thread.start()

    def _deliver_copies(self, delivery, times):
        for copy in range(1, times + 1):
            self._deliver(delivery, copy)

    def _deliver(self, delivery, copy, barrier=None):
        signature = self._event_key.sign(delivery.body)
        if barrier is not None:
            try:
                barrier.wait(_BARRIER_TIMEOUT_S)
            except threading.BrokenBarrierError:
                pass  # a copy gave up waiting; send anyway
        delay_s = self._knobs.delivery_backoff_s
        attempts = self._knobs.delivery_attempts
        for attempt in range(1, attempts + 1):
            if self._stopping.is_set():
                return
            status, error, code = self._post(delivery, signature)
            self._record(delivery, copy, attempt, status, error, code)
            if status is not None and 200 <= status < 300:
                self._mark_delivered(delivery.event_id)
                return
            if attempt < attempts and self._stopping.wait(delay_s):
                return
            delay_s *= 2

    def _post(self, delivery, signature):
        """POST once; return (status, None, code) if answered, else (None, error text, code).

        code is the event attempt's code should the try count as failed: badHttpStatus
        for an answer, timeout or badConnection for none."""
        url, authorization = _split_credentials(delivery.url)
        parts = urlsplit(url)
        headers = {"Content-Type": "application/json", "Digital-Signature": signature,
                   "User-Agent": "stark-challenge-emulator"}
        if authorization:
            headers["Authorization"] = authorization
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=self._knobs.delivery_timeout_s)
        try:
            connection.request("POST", (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                               body=delivery.body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status, None, "badHttpStatus"
        except (OSError, http.client.HTTPException) as error:
            code = "timeout" if isinstance(error, TimeoutError) else "badConnection"
            return None, "%s: %s" % (type(error).__name__, error), code
        finally:
            connection.close()

    def _record(self, delivery, copy, attempt, status, error, code):
        url, _ = _split_credentials(delivery.url)
        with self._lock:
            self._attempts.append({
                "eventId": delivery.event_id, "webhookId": delivery.webhook_id, "url": url,
                "status": status, "error": error, "copy": copy, "attempt": attempt,
                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            })
        if error or not 200 <= status < 300:
            message = error or "HTTP POST request returned status %d" % status
            self._record_attempt(delivery.event_id, delivery.webhook_id, code, message)
            logger.info("delivery of event %s to %s, try %d: %s", delivery.event_id, url, attempt, error or status)
