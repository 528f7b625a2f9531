"""The Stark Bank emulator, driven by the real starkbank SDK through its HTTPS proxy.

Every test talks to a fresh Emulator on a free port, as a service would: environment
variables from `Emulator.env`, `starkbank.user` set to one of its projects, and webhooks
received by a small local HTTP server. Waiting on background work (payments, transfer
steps, deliveries) polls with a deadline; nothing sleeps a fixed time.
"""

import base64
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import requests
import starkbank
from ellipticcurve import Ecdsa, PrivateKey

from stark_challenge.emulator import Emulator
from stark_challenge.emulator import taxid

from support import child_env, wait_for

RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")


def eventually(predicate, timeout_s=5.0, what="condition"):
    """Return predicate()'s first truthy value, polling until timeout_s; fail the test otherwise."""
    return wait_for(predicate, timeout_s, interval=0.01, message=what)


def invoice(amount=1000, tax_id="012.345.678-90", name="Arya Stark", **extra):
    return starkbank.Invoice(amount=amount, tax_id=tax_id, name=name, **extra)


def transfer(amount=950, **extra):
    return starkbank.Transfer(amount=amount, **dict(RECEIVER, **extra))


def log_types(emulator, subscription, entity_id):
    return [event["log"]["type"] for event in emulator.events()
            if event["subscription"] == subscription and event["log"][subscription]["id"] == entity_id]


@pytest.fixture
def emulator(emulator_certificates):
    emu = Emulator(pay_ratio=0.0, pay_delay_s=0.02, transfer_delay_s=0.02, seed=7,
                   delivery_attempts=3, delivery_backoff_s=0.02, certificates=emulator_certificates).start()
    yield emu
    emu.stop()


@pytest.fixture
def project(sdk):
    """(project id, private key PEM) of a project, set as starkbank.user, with the env pointing at emulator."""
    return sdk["project_id"], sdk["private_key"]


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records requests and answers scripted statuses."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)  # answered in order; 200 once used up
        self.received = []  # (path, headers, body bytes)
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.received.append((self.path, dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d/stark/webhook" % self.server.server_address[1]

    def bodies(self):
        with self._lock:
            return [json.loads(body) for _, _, body in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver():
    receivers = []

    def make(statuses=()):
        receivers.append(Receiver(statuses))
        return receivers[-1]

    yield make
    for each in receivers:
        each.close()


# -- transport and authentication ------------------------------------------------------


def test_sdk_creates_and_reads_an_invoice_through_the_proxy(emulator, project):
    created = starkbank.invoice.create([invoice(tax_id="01234567890", tags=["Batch-1", "x"])])[0]

    fetched = starkbank.invoice.get(created.id)

    assert (fetched.id, fetched.status, fetched.amount, fetched.nominal_amount, fetched.fee) == (
        created.id, "created", 1000, 1000, 0)
    assert len(created.id) == 16 and created.id.isdigit()
    assert fetched.tax_id == "012.345.678-90"
    assert fetched.tags == ["batch-1", "x"]
    assert [row["id"] for row in emulator.invoices()] == [created.id]
    assert log_types(emulator, "invoice", created.id) == ["created"]
    assert [(call["method"], call["path"], call["status"]) for call in emulator.requests] == [
        ("POST", "/v2/invoice", 200), ("GET", "/v2/invoice/" + created.id, 200)]


def test_request_signed_with_another_key_gets_401_and_creates_nothing(emulator, project):
    project_id, _ = project
    starkbank.user = starkbank.Project(environment="sandbox", id=project_id, private_key=PrivateKey().toPem())

    with pytest.raises(starkbank.error.UnknownError):
        starkbank.invoice.create([invoice()])

    assert emulator.invoices() == []
    assert emulator.requests[-1]["status"] == 401


def test_unknown_project_gets_401(emulator, project):
    starkbank.user = starkbank.Project(environment="sandbox", id="1234567890123456", private_key=PrivateKey().toPem())

    with pytest.raises(starkbank.error.UnknownError) as raised:
        list(starkbank.invoice.query())

    assert "invalidAccessId" in str(raised.value)


def test_stale_access_time_gets_401_even_when_signed(emulator, project):
    project_id, pem = project
    access_id, access_time, body = "project/" + project_id, str(time.time() - 600), ""
    signature = Ecdsa.sign("%s:%s:%s" % (access_id, access_time, body), PrivateKey.fromPem(pem)).toBase64()

    response = requests.get("https://sandbox.api.starkbank.com/v2/invoice", timeout=5, headers={
        "Access-Id": access_id, "Access-Time": access_time, "Access-Signature": signature})

    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "invalidAccessTime"


def test_production_host_is_served_too(emulator, project):
    project_id, pem = project
    starkbank.user = starkbank.Project(environment="production", id=project_id, private_key=pem)

    assert list(starkbank.invoice.query()) == []


def test_connect_to_any_other_host_is_refused(emulator):
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=5) as connection:
        connection.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        status_line = connection.makefile("rb").readline()

    assert status_line.split()[1] == b"403"


# -- invoices ----------------------------------------------------------------------------


def test_invalid_tax_id_refuses_the_whole_batch_with_400(emulator, project):
    batch = [invoice(), invoice(tax_id="012.345.678-91"), invoice()]

    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.create(batch)

    assert [(error.code, error.message.split(":")[0]) for error in raised.value.errors] == [
        ("invalidTaxId", "Element 1")]
    assert emulator.invoices() == [] and emulator.events() == []


def test_more_than_100_invoices_in_one_call_are_refused(emulator, project):
    with pytest.raises(starkbank.error.InputErrors):
        starkbank.invoice.create([invoice() for _ in range(101)])

    assert emulator.invoices() == []
    assert len(starkbank.invoice.create([invoice() for _ in range(100)])) == 100


def test_unknown_invoice_id_gets_400(emulator, project):
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.get("1111111111111111")

    assert raised.value.errors[0].code == "invalidInvoice"  # as the SDK's own tests against Stark Bank expect


def test_invoices_are_queried_by_any_of_their_tags_and_paged(emulator, project):
    first, second, _ = starkbank.invoice.create(
        [invoice(tags=["round-1", "a"]), invoice(tags=["round-2"]), invoice(tags=["other"])])

    found = {each.id for each in starkbank.invoice.query(tags=["round-1", "round-2"])}
    page, cursor = starkbank.invoice.page(limit=2)
    rest, end = starkbank.invoice.page(limit=2, cursor=cursor)

    assert found == {first.id, second.id}
    assert len(page) == 2 and len(rest) == 1 and end is None
    assert [each.id for each in page + rest] == [row["id"] for row in reversed(emulator.invoices())]


def test_sandbox_pays_invoices_with_paid_and_credited_logs_carrying_the_fee(emulator, project):
    emulator.set(pay_ratio=1.0, invoice_fee=75)
    created = starkbank.invoice.create([invoice(amount=12345)])[0]

    eventually(lambda: len(log_types(emulator, "invoice", created.id)) == 3, what="payment")

    credited = [event["log"]["invoice"] for event in emulator.events() if event["log"]["type"] == "credited"][0]
    assert log_types(emulator, "invoice", created.id) == ["created", "paid", "credited"]
    assert (credited["status"], credited["amount"], credited["fee"]) == ("paid", 12345, 75)
    assert starkbank.invoice.get(created.id).status == "paid"


def test_pay_ratio_zero_leaves_invoices_unpaid_and_credited_first_reorders_logs(emulator, project):
    unpaid, paid = starkbank.invoice.create([invoice(), invoice()])
    emulator.set(credited_first=True)

    emulator.pay(paid.id, amount=400)

    assert log_types(emulator, "invoice", paid.id) == ["created", "credited", "paid"]
    assert emulator.invoices()[1]["amount"] == 400
    assert starkbank.invoice.get(unpaid.id).status == "created"
    with pytest.raises(ValueError):
        emulator.pay(paid.id)


def test_emulators_with_the_same_seed_pay_the_same_invoices(monkeypatch):
    def paid_positions(seed):
        with Emulator(pay_ratio=0.5, pay_delay_s=0.01, seed=seed) as emu:
            project_id, pem = emu.create_project()
            for name, value in emu.env(project_id, pem).items():
                monkeypatch.setenv(name, value)
            monkeypatch.setattr(starkbank, "user", starkbank.Project(environment="sandbox", id=project_id, private_key=pem))
            starkbank.invoice.create([invoice() for _ in range(20)])
            eventually(emu.idle, what="payments")
            return [index for index, row in enumerate(emu.invoices()) if row["status"] == "paid"]

    first = paid_positions(3)

    assert paid_positions(3) == first
    assert 0 < len(first) < 20


# -- transfers ---------------------------------------------------------------------------


def test_transfer_goes_through_processing_to_success(emulator, project):
    created = starkbank.transfer.create([transfer(external_id="svc-1", tags=["credit"])])[0]

    eventually(lambda: starkbank.transfer.get(created.id).status == "success", what="transfer success")

    assert created.status == "created" and created.external_id == "svc-1"
    assert log_types(emulator, "transfer", created.id) == ["created", "processing", "success"]


def test_fail_transfer_ends_it_failed_with_errors(emulator, project):
    emulator.set(transfer_delay_s=60)
    created = starkbank.transfer.create([transfer(external_id="svc-2")])[0]

    emulator.fail_transfer(created.id, errors=["account closed"])

    failed = [e["log"] for e in emulator.events() if e["log"]["type"] == "failed"]
    assert [(log["transfer"]["id"], log["errors"]) for log in failed] == [(created.id, ["account closed"])]
    assert starkbank.transfer.get(created.id).status == "failed"


def test_transfer_fail_ratio_fails_new_transfers(emulator, project):
    emulator.set(transfer_fail_ratio=1.0)
    created = starkbank.transfer.create([transfer(external_id="svc-3")])[0]

    eventually(lambda: emulator.transfers()[0]["status"] == "failed", what="failure")

    assert log_types(emulator, "transfer", created.id) == ["created", "processing", "failed"]


def test_duplicate_external_id_is_refused_even_in_a_later_call(emulator, project):
    starkbank.transfer.create([transfer(external_id="svc-4")])

    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.create([transfer(amount=1, external_id="svc-5"), transfer(amount=2, external_id="svc-4")])

    assert [error.code for error in raised.value.errors] == ["invalidExternalId"]
    assert [row["externalId"] for row in emulator.transfers()] == ["svc-4"]


def test_same_day_repeat_without_external_id_is_refused(emulator, project):
    starkbank.transfer.create([transfer(amount=500)])

    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.create([transfer(amount=500)])
    starkbank.transfer.create([transfer(amount=500, external_id="svc-6"), transfer(amount=501)])

    assert raised.value.errors[0].code == "duplicatedTransfer"
    assert [row["amount"] for row in emulator.transfers()] == [500, 500, 501]


def test_invalid_transfer_fields_are_refused(emulator, project):
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.create([transfer(bank_code="2001"), transfer(account_type="gold"),
                                   transfer(amount=0), transfer(external_id="invoice-123")])

    assert [error.code for error in raised.value.errors] == [
        "invalidBankCode", "invalidAccountType", "invalidAmount", "invalidExternalId"]
    assert emulator.transfers() == []


# -- events ------------------------------------------------------------------------------


def test_event_query_filters_on_is_delivered_and_update_marks_delivered(emulator, project):
    starkbank.invoice.create([invoice(), invoice()])
    first, second = starkbank.event.query(is_delivered=False)

    updated = starkbank.event.update(first.id, is_delivered=True)

    assert updated.is_delivered is True
    assert [each.id for each in starkbank.event.query(is_delivered=False)] == [second.id]
    assert [each.id for each in starkbank.event.query(is_delivered=True)] == [first.id]
    assert starkbank.event.get(second.id).log.invoice.status == "created"


# -- webhooks and deliveries -----------------------------------------------------------------


def test_webhooks_are_created_listed_and_deleted_through_the_sdk(emulator, project, receiver):
    url = receiver().url
    created = starkbank.webhook.create(url=url, subscriptions=["invoice"])

    assert [(each.id, each.url) for each in starkbank.webhook.query()] == [(created.id, url)]
    assert starkbank.webhook.get(created.id).subscriptions == ["invoice"]
    starkbank.webhook.delete(created.id)
    assert emulator.webhooks() == []


def test_delivery_is_signed_for_the_sdk_and_carries_basic_auth_from_the_url(emulator, project, receiver):
    endpoint = receiver()
    starkbank.webhook.create(url=endpoint.url.replace("http://", "http://stark:s%3Acret@"),
                             subscriptions=["invoice", "transfer"])
    created = starkbank.invoice.create([invoice()])[0]

    path, headers, body = eventually(lambda: endpoint.received, what="delivery")[0]
    event = starkbank.event.parse(content=body.decode("utf-8"), signature=headers["Digital-Signature"])

    assert path == "/stark/webhook"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"stark:s:cret").decode()
    assert (event.subscription, event.log.type, event.log.invoice.id) == ("invoice", "created", created.id)
    assert b": " not in body  # compact JSON, exactly as signed
    assert emulator.public_key_fetches == 1
    eventually(lambda: emulator.events()[0]["isDelivered"], what="isDelivered")
    assert [(d["url"], d["status"]) for d in emulator.deliveries()] == [(endpoint.url, 200)]


def test_tampered_body_fails_parse_after_the_sdk_refetches_the_key(emulator, project, receiver):
    endpoint = receiver()
    emulator.add_webhook(endpoint.url)
    starkbank.invoice.create([invoice(amount=100)])
    _, headers, body = eventually(lambda: endpoint.received, what="delivery")[0]

    with pytest.raises(starkbank.error.InvalidSignatureError):
        starkbank.event.parse(content=body.decode().replace('"amount":100', '"amount":999'),
                              signature=headers["Digital-Signature"])

    assert emulator.public_key_fetches == 2
    assert starkbank.event.parse(content=body.decode(), signature=emulator.sign(body)).log.invoice.amount == 100


def test_failing_receiver_gets_bounded_retries_and_the_event_stays_undelivered(emulator, project, receiver):
    endpoint = receiver(statuses=[500] * 10)
    emulator.add_webhook(endpoint.url)
    starkbank.invoice.create([invoice()])

    eventually(lambda: not emulator.deliveries_pending() and emulator.deliveries(), what="retries to end")

    assert [(d["attempt"], d["status"]) for d in emulator.deliveries()] == [(1, 500), (2, 500), (3, 500)]
    assert len(endpoint.received) == 3
    assert [each.id for each in starkbank.event.query(is_delivered=False)] == [emulator.events()[0]["id"]]


def test_unreachable_receiver_is_recorded_as_an_error(emulator, project):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    emulator.set(delivery_attempts=2)
    emulator.add_webhook("http://127.0.0.1:%d/hook" % port)
    starkbank.invoice.create([invoice()])

    eventually(lambda: not emulator.deliveries_pending() and len(emulator.deliveries()) == 2, what="2 tries")

    assert all(d["status"] is None and d["error"] for d in emulator.deliveries())


def test_receiver_recovering_after_a_500_gets_the_event_and_it_is_delivered(emulator, project, receiver):
    endpoint = receiver(statuses=[500])
    emulator.add_webhook(endpoint.url)
    starkbank.invoice.create([invoice()])

    eventually(lambda: emulator.events()[0]["isDelivered"], what="delivered after retry")

    assert [d["status"] for d in emulator.deliveries()] == [500, 200]


@pytest.mark.parametrize("concurrently", [False, True])
def test_deliver_times_two_delivers_each_event_twice(emulator, project, receiver, concurrently):
    endpoint = receiver()
    emulator.add_webhook(endpoint.url, subscriptions=["invoice"])
    emulator.set(deliver_times=2, deliver_concurrently=concurrently)
    starkbank.invoice.create([invoice()])

    eventually(lambda: len(emulator.deliveries()) == 2, what="two deliveries")

    first, second = endpoint.bodies()
    assert first == second
    assert sorted(d["copy"] for d in emulator.deliveries()) == [1, 2]


def test_held_deliveries_are_sent_on_release(emulator, project, receiver):
    endpoint = receiver()
    emulator.add_webhook(endpoint.url)
    emulator.set(hold_deliveries=True)
    starkbank.invoice.create([invoice(), invoice()])

    assert emulator.deliveries_pending() and endpoint.received == []
    assert emulator.release_deliveries() == 2
    eventually(lambda: len(endpoint.received) == 2, what="released deliveries")
    assert {body["event"]["id"] for body in endpoint.bodies()} == {event["id"] for event in emulator.events()}


def test_turning_hold_off_releases_what_was_held(emulator, project, receiver):
    endpoint = receiver()
    emulator.add_webhook(endpoint.url)
    emulator.set(hold_deliveries=True)
    starkbank.invoice.create([invoice()])

    emulator.set(hold_deliveries=False)

    eventually(lambda: len(endpoint.received) == 1, what="released delivery")


def test_transfer_events_reach_transfer_subscribers_only(emulator, project, receiver):
    invoices_only, transfers_only = receiver(), receiver()
    emulator.add_webhook(invoices_only.url, subscriptions=["invoice"])
    emulator.add_webhook(transfers_only.url, subscriptions=["transfer"])

    starkbank.transfer.create([transfer(external_id="svc-7")])

    eventually(lambda: len(transfers_only.received) == 3, what="created, processing, success")
    assert [body["event"]["log"]["type"] for body in transfers_only.bodies()] == ["created", "processing", "success"]
    assert invoices_only.received == []


# -- faults ------------------------------------------------------------------------------


def test_fail_next_answers_500_without_acting_then_works(emulator, project):
    emulator.fail_next("POST", "/v2/invoice", count=1, status=500)

    with pytest.raises(starkbank.error.InternalServerError):
        starkbank.invoice.create([invoice()])
    assert emulator.invoices() == []
    starkbank.invoice.create([invoice()])

    assert [call["status"] for call in emulator.requests] == [500, 200]
    assert len(emulator.invoices()) == 1


def test_fail_next_after_creates_the_transfer_but_the_sdk_call_fails(emulator, project):
    emulator.fail_next_after("POST", "/v2/transfer", count=1)

    with pytest.raises(starkbank.error.UnknownError):
        starkbank.transfer.create([transfer(external_id="svc-8")])

    assert [row["externalId"] for row in emulator.transfers()] == ["svc-8"]
    assert [(call["path"], call.get("dropped")) for call in emulator.requests] == [("/v2/transfer", True)]
    assert [each.external_id for each in starkbank.transfer.query()] == ["svc-8"]
    with pytest.raises(starkbank.error.InputErrors):  # the retry is refused: the write happened
        starkbank.transfer.create([transfer(external_id="svc-8")])


def test_latency_delays_answers(emulator, project):
    emulator.set(latency_s=0.2)
    started = time.monotonic()

    list(starkbank.invoice.query())

    assert time.monotonic() - started >= 0.2


def test_unknown_or_bad_knobs_are_refused(emulator):
    with pytest.raises(TypeError):
        emulator.set(pay_rate=1.0)
    with pytest.raises(ValueError):
        emulator.set(pay_ratio=1.5)


# -- lifecycle and command line ------------------------------------------------------------


def test_stop_is_idempotent_closes_the_port_and_deletes_the_ca(project):
    emu = Emulator().start()
    port, ca_path = emu.port, emu.ca_path

    emu.stop()
    emu.stop()

    assert not os.path.exists(ca_path)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_certificates_given_are_served_and_left_in_place(emulator_certificates):
    with Emulator(certificates=emulator_certificates) as emu, pytest.MonkeyPatch.context() as env:
        project_id, private_key = emu.create_project()
        for name, value in emu.env(project_id, private_key).items():
            env.setenv(name, value)
        user = starkbank.Project(environment="sandbox", id=project_id, private_key=private_key)
        assert list(starkbank.invoice.query(limit=1, user=user)) == []  # TLS verified against the given CA

    assert emu.ca_path == emulator_certificates.ca_path and os.path.exists(emu.ca_path)


def test_env_creates_a_project_when_none_is_given(emulator):
    env = emulator.env()

    assert env["HTTPS_PROXY"] == env["https_proxy"] == emulator.proxy_url
    assert env["REQUESTS_CA_BUNDLE"] == emulator.ca_path and "127.0.0.1" in env["NO_PROXY"]
    assert env["STARK_PRIVATE_KEY"].startswith("-----BEGIN EC PRIVATE KEY-----")


def test_tax_ids_are_checked_by_their_digits():
    valid = ["012.345.678-90", "01234567890", "20.018.183/0001-80", "20018183000180"]
    invalid = ["012.345.678-91", "111.111.111-11", "20.018.183/0001-81", "0123456789", "2001818300018", "abc", None]

    assert [taxid.is_valid(each) for each in valid] == [True] * len(valid)
    assert [taxid.is_valid(each) for each in invalid] == [False] * len(invalid)


def test_cli_help_describes_the_options(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stark_challenge.emulator", "--help"], env=child_env(tmp_path),
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0
    assert "--pay-ratio" in result.stdout and "--seed" in result.stdout


def test_cli_prints_an_environment_the_sdk_can_use(monkeypatch, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "stark_challenge.emulator", "--seed", "1", "--pay-ratio", "0"],
                               env=child_env(tmp_path), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(30, process.kill)  # never hang the suite on a silent child
    watchdog.start()
    try:
        exports = {}
        for line in process.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                exports[name] = value
            if "STARK_PRIVATE_KEY" in exports:  # the last line
                break
        key_path = exports["STARK_PRIVATE_KEY"]
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        for name in ("HTTPS_PROXY", "REQUESTS_CA_BUNDLE", "NO_PROXY"):
            monkeypatch.setenv(name, exports[name])
        with open(key_path) as file:
            monkeypatch.setattr(starkbank, "user", starkbank.Project(
                environment=exports["STARK_ENVIRONMENT"], id=exports["STARK_PROJECT_ID"], private_key=file.read()))

        assert len(starkbank.invoice.create([invoice()])) == 1
    finally:
        watchdog.cancel()
        process.terminate()
        assert process.wait(timeout=10) == 0
        process.stdout.close()
    assert not os.path.exists(key_path)


# -- a second workspace: the same signing key, its own entities ---------------------------


@pytest.fixture
def other(emulator):
    """(Workspace, starkbank.Project) of a second workspace, as another Stark Bank customer has."""
    workspace = emulator.add_workspace()
    project_id, pem = workspace.create_project()
    return workspace, starkbank.Project(environment="sandbox", id=project_id, private_key=pem)


def test_each_workspace_sees_only_its_own_invoices_and_transfers(emulator, project, other):
    workspace, user = other
    ours = starkbank.invoice.create([invoice(tags=["stark-challenge"])])[0]
    our_transfer = starkbank.transfer.create([transfer(external_id="stark-challenge-inv-1")])[0]
    # The other workspace may copy our tag and our external id: external ids are unique per workspace.
    theirs = starkbank.invoice.create([invoice(tags=["stark-challenge"])], user=user)[0]
    their_transfer = starkbank.transfer.create([transfer(external_id="stark-challenge-inv-1")], user=user)[0]

    assert ours.id != theirs.id and our_transfer.id != their_transfer.id
    assert [i.id for i in starkbank.invoice.query(tags=["stark-challenge"])] == [ours.id]
    assert [i.id for i in starkbank.invoice.query(tags=["stark-challenge"], user=user)] == [theirs.id]
    assert [t.id for t in starkbank.transfer.query(tags=["stark-challenge-inv-1"])] == []  # tags, not external id
    assert [t.id for t in starkbank.transfer.query()] == [our_transfer.id]
    assert [t.id for t in starkbank.transfer.query(user=user)] == [their_transfer.id]
    for get, foreign, code in ((starkbank.invoice.get, theirs.id, "invalidInvoice"),
                               (starkbank.transfer.get, their_transfer.id, "invalidTransfer")):
        with pytest.raises(starkbank.error.InputErrors) as raised:
            get(foreign)
        assert raised.value.errors[0].code == code
    with pytest.raises(starkbank.error.InputErrors):
        starkbank.invoice.get(ours.id, user=user)
    assert {e.log.invoice.id for e in starkbank.event.query() if e.subscription == "invoice"} == {ours.id}
    assert {e.log.invoice.id for e in starkbank.event.query(user=user) if e.subscription == "invoice"} == {theirs.id}
    assert [i["id"] for i in emulator.invoices()] == [ours.id]
    assert [i["id"] for i in workspace.invoices()] == [theirs.id]


def test_a_second_workspaces_events_carry_its_id_and_the_same_valid_signature(emulator, project, other, receiver):
    workspace, user = other
    ours, theirs = receiver(), receiver()
    emulator.add_webhook(ours.url)
    workspace.add_webhook(theirs.url)
    created = starkbank.invoice.create([invoice()], user=user)[0]
    workspace.pay(created.id)

    received = eventually(lambda: len(theirs.received) == 3 and theirs.received, what="three deliveries")
    for _, headers, body in received:
        event = starkbank.event.parse(content=body.decode("utf-8"), signature=headers["Digital-Signature"])
        assert event.workspace_id == workspace.workspace_id != emulator.workspace_id
        assert event.log.invoice.id == created.id
    assert sorted(json.loads(body)["event"]["log"]["type"] for _, _, body in received) == [
        "created", "credited", "paid"]
    assert ours.received == [] and emulator.events() == []
    eventually(lambda: all(e["isDelivered"] for e in workspace.events()), what="marked delivered in its workspace")
