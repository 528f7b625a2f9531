"""/livez and /readyz beside /health, and the latency histogram of POST /webhook, read from a
running service's /metrics by the strict parser."""

import base64
import json
import urllib.error
import urllib.request

from stark_challenge import verify
from stark_challenge.bank import Bank
from stark_challenge.gate import Gate
from stark_challenge.verify import Signatures
from stark_challenge.wire import Request

from support import sdk_config, signed_event, wait_for
from test_operations import AUTH, get_metrics, parse_exposition

HISTOGRAM = "stark_challenge_webhook_duration_seconds"


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_livez_and_readyz_answer_anyone(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    assert service.request("GET", "/livez") == (200, {"status": "alive"})
    fetches = emulator.public_key_fetches
    assert service.request("GET", "/readyz") == (200, {"status": "ready"})  # the key fetched for it
    assert service.request("GET", "/readyz") == (200, {"status": "ready"})
    assert emulator.public_key_fetches == fetches + 1
    assert service.request("HEAD", "/livez")[0] == 200


def test_readyz_is_503_until_stark_banks_key_can_be_fetched(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    emulator.fail_next("GET", "/v2/public-key", count=5, status=500)
    assert service.request("GET", "/readyz") == (503, {"status": "not ready", "database": "ok",
                                                       "public_key": "unavailable"})
    assert service.request("GET", "/livez") == (200, {"status": "alive"})


def test_readyz_is_503_when_the_database_stops_answering(emulator, in_process_app):
    app = in_process_app
    base = f"http://127.0.0.1:{app.server.port}"
    assert _get(base + "/readyz") == (200, {"status": "ready"})
    wait_for(lambda: emulator.invoices(), message="round 0")
    app.store.close()
    assert _get(base + "/readyz") == (503, {"status": "not ready", "database": "unavailable", "public_key": "ok"})
    assert _get(base + "/livez") == (200, {"status": "alive"})


def _histogram(service):
    samples = parse_exposition(get_metrics(service)[2])
    return {dict(labels).get("le", name): value for (name, labels), value in samples.items()
            if name.startswith(HISTOGRAM)}


def test_every_webhook_answer_is_counted_in_the_latency_histogram(emulator, service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, **AUTH)
    service.start()
    empty = _histogram(service)
    assert empty[f"{HISTOGRAM}_count"] == 0 and empty["+Inf"] == 0  # there before the first webhook
    wait_for(lambda: emulator.invoices(), message="round 0")
    body, headers = signed_event(emulator, "9300000000000001", emulator.invoices()[0], log_type="created")
    headers["Authorization"] = "Basic " + base64.b64encode(b"ops:s3cret-pass").decode()
    forged = {**headers, "Digital-Signature": base64.b64encode(b"0" * 70).decode()}
    answers = [service.request("POST", "/webhook", body, headers)[0],
               service.request("POST", "/webhook", body, headers)[0],
               service.request("POST", "/webhook", body, forged)[0],
               service.request("POST", "/webhook", b"{}", {"Content-Type": "application/json"})[0]]
    assert answers == [200, 200, 401, 401]
    counted = _histogram(service)
    assert counted[f"{HISTOGRAM}_count"] == counted["+Inf"] == 4
    assert 0 < counted[f"{HISTOGRAM}_sum"] < 4 * 10  # each under the client's timeout


def test_a_webhook_left_to_a_handler_is_counted_once_its_reply_exists(emulator, sdk, store, clock):
    config = sdk_config(sdk)
    bank = Bank(config)
    bank.configure()
    gate = Gate(store, Signatures(bank.fetch_public_key, verify.best_verifier(native=False)), config, clock)
    invoice = {"id": "9400000000000002", "tags": []}
    body, headers = signed_event(emulator, "9400000000000001", invoice, log_type="created")
    finish = gate.admit(Request("POST", "/webhook", headers, body, "127.0.0.1"), may_wait=False)
    assert callable(finish)  # the pure verifier never runs on the selector thread
    assert gate.counters.histogram_samples(HISTOGRAM)[-2:] == [("_sum", (), 0.0), ("_count", (), 0)]
    assert finish().status == 200
    samples = gate.counters.histogram_samples(HISTOGRAM)
    assert samples[-1] == ("_count", (), 1) and samples[-2][2] > 0
