"""Events that are genuine but not ours move no money: the running service, the real SDK, the emulator.

Stark Bank signs every workspace's events with one key, and anyone with a workspace can
point a webhook at any URL. Here a second workspace of the emulator plays that attacker:
its events reach the service validly signed (and with the webhook's basic auth), it
copies our public tag and our external ids, and its invoices and transfers are real in
its own workspace. Each attack must move no money, while every genuine credit is still
forwarded exactly once. Outcomes are read from the emulator's own records (our
workspace's transfers, the API calls it answered) and from the service's SQLite file,
opened read-only.
"""

import base64
import json
import random
import sqlite3

import pytest
import starkbank

from stark_challenge.bank import Bank
from stark_challenge.errors import BankUnavailable
from stark_challenge.events import Event
from stark_challenge.transfers import Sender
from stark_challenge.worker import Worker

from support import messages_matching, query, sdk_config, signed_event, status_json, wait_for

FEE = 50  # the emulator's default invoice_fee, in cents
TAG = "stark-challenge"  # the default INSTANCE_TAG: public, so anyone can copy it
USER, PASSWORD = "stark", "webhook-secret"
RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")


# -- helpers ------------------------------------------------------------------------------


def invoice_now(emulator, invoice_id):
    """Return our workspace's invoice ``invoice_id`` as it is now (emulator JSON)."""
    return next(i for i in emulator.invoices() if i["id"] == invoice_id)


def our_transfers(emulator, invoice_id):
    """Return the transfers of our workspace made for ``invoice_id`` (a transfer's 2nd tag names its invoice)."""
    return [t for t in emulator.transfers() if t["tags"][1] == f"invoice-{invoice_id}"]


def outcome_of(service, entity_id, log_type):
    """Wait until the service processed the ``log_type`` event of ``entity_id``; return its outcome."""
    return wait_for(lambda: next(iter(query(
        service, "select outcome from event where entity_id = ? and log_type = ? and processed_at is not null",
        (entity_id, log_type))), (None,))[0], message=f"the {log_type} event of {entity_id} processed")


def assert_forwarded_once(emulator, service, invoice):
    """``invoice`` (emulator JSON) has exactly one transfer of ours, of its amount minus the fee, and it succeeded."""
    (transfer,) = wait_for(lambda: our_transfers(emulator, invoice["id"]), message=f"{invoice['id']}'s transfer")
    assert transfer["amount"] == invoice["amount"] - FEE
    assert transfer["externalId"] == f"{TAG}-inv-{invoice['id']}"
    wait_for(lambda: query(service, "select state, transfer_id from transfer where invoice_id = ?",
                           (invoice["id"],)) == [("success", transfer["id"])], message="its success recorded")


def transfer_rows(service):
    return query(service, "select invoice_id, attempt, state from transfer order by invoice_id, attempt")


def post_event(service, emulator, event):
    """Push one event (emulator JSON) to the service as Stark Bank delivers it; return the status."""
    body = json.dumps({"event": event}, separators=(",", ":")).encode()
    return service.request("POST", "/webhook", body, {"Digital-Signature": emulator.sign(body), **auth()})[0]


def auth():
    return {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def service(emulator, service_factory):
    """The service with basic auth on, its round 0 (3 invoices) issued and its first pass over."""
    return started_service(emulator, service_factory, 3)


def started_service(emulator, service_factory, count):
    """Start the service with basic auth on; return it once round 0 (``count`` invoices) is issued and its
    first pass is over."""
    # RECONCILE_AFTER=0: an invoice carrying our tag that Stark Bank does not find is not waited for.
    running = service_factory(INVOICE_MIN=count, INVOICE_MAX=count, WEBHOOK_USERNAME=USER, WEBHOOK_PASSWORD=PASSWORD,
                              RECONCILE_AFTER="0")
    running.start()
    wait_for(lambda: len(emulator.invoices()) == count, message="round 0")
    wait_for(lambda: len([d for d in emulator.deliveries() if d["status"] == 200]) >= count, message="created events")
    # /health says "starting" until the worker's first pass is over, "ok" after it.
    wait_for(lambda: running.request("GET", "/health")[1] == {"status": "ok"}, message="first pass")
    return running


@pytest.fixture
def other_workspace(emulator, sdk):
    """(Workspace, starkbank.Project) of another Stark Bank customer, without a webhook yet."""
    workspace = emulator.add_workspace()
    project_id, pem = workspace.create_project()
    return workspace, starkbank.Project(environment="sandbox", id=project_id, private_key=pem)


@pytest.fixture
def attacker(other_workspace, service):
    """The other workspace, with a webhook pointing at the service.

    It knows the webhook's URL and basic-auth credentials: the worst case.
    """
    workspace, _ = other_workspace
    workspace.add_webhook(f"http://{USER}:{PASSWORD}@127.0.0.1:{service.port}/webhook")
    return other_workspace


# -- the four attacks ---------------------------------------------------------------------------


def test_a_credit_of_an_invoice_we_never_issued_moves_no_money(emulator, service, attacker):
    workspace, user = attacker
    a, b, _ = emulator.invoices()
    # Another workspace's invoices, tagged with our public tag; one paid 77,700 cents, one 10^12
    # (the largest amount the emulator takes: Stark Bank refuses 10^15).
    theirs = starkbank.invoice.create([starkbank.Invoice(amount=amount, name="Mallory", tax_id="012.345.678-90",
                                                         tags=[TAG]) for amount in (77700, 10 ** 12)], user=user)
    for invoice in theirs:
        workspace.pay(invoice.id)
    emulator.pay(a["id"])
    emulator.pay(b["id"])

    for invoice in theirs:  # they carry our tag, but our credentials do not see them: an alarm, nothing moves
        assert outcome_of(service, invoice.id, "credited") == \
            "not issued here: Stark Bank never found this invoice, which carries our tag"
    # Pushed by the other workspace's webhook, validly signed, and acknowledged so Stark Bank stops redelivering.
    credited = {e["id"] for e in workspace.events() if e["log"]["type"] == "credited"}
    assert len(credited) == 2 and credited <= {d["eventId"] for d in workspace.deliveries() if d["status"] == 200}
    for invoice in (a, b):
        assert_forwarded_once(emulator, service, invoice_now(emulator, invoice["id"]))
    assert len(emulator.transfers()) == 2 and workspace.transfers() == []
    assert query(service, "select invoice_id from credit order by invoice_id") == sorted([(a["id"],), (b["id"],)])
    # Each foreign credit was checked once with our own credentials: Stark Bank said "no such invoice".
    gets = [c for c in emulator.requests if c["method"] == "GET" and c["path"].startswith("/v2/invoice/")]
    assert sorted((c["path"], c["status"]) for c in gets) == sorted((f"/v2/invoice/{i.id}", 400) for i in theirs)
    assert len(messages_matching(service, r"moves nothing: not issued here")) == 2
    assert status_json(service)["events"]["not_ours"] == 2


def test_a_foreign_failed_log_with_our_external_id_does_not_pay_twice(emulator, service, attacker):
    workspace, user = attacker
    a, b, _ = emulator.invoices()
    emulator.pay(a["id"])
    paid_a = invoice_now(emulator, a["id"])
    assert_forwarded_once(emulator, service, paid_a)

    # Another workspace makes a transfer with our external id (unique per workspace only) and lets it fail.
    emulator.set(transfer_delay_s=60.0)
    (copy,) = starkbank.transfer.create([starkbank.Transfer(amount=1, external_id=f"{TAG}-inv-{a['id']}",
                                                            tags=[TAG, f"invoice-{a['id']}"], **RECEIVER)], user=user)
    workspace.fail_transfer(copy.id, ["receiver account closed"])

    assert outcome_of(service, copy.id, "failed") == "transfer not ours"
    assert outcome_of(service, copy.id, "created") == "transfer not ours"
    emulator.set(transfer_delay_s=0.05)
    emulator.pay(b["id"])  # a genuine credit after the attack still goes through, once
    assert_forwarded_once(emulator, service, invoice_now(emulator, b["id"]))
    assert_forwarded_once(emulator, service, paid_a)  # still one transfer for A, still success
    assert sorted(transfer_rows(service)) == sorted([(a["id"], 1, "success"), (b["id"], 1, "success")])
    assert not messages_matching(service, "TRANSFER FAILED")
    assert status_json(service)["events"]["not_ours"] == 2


def test_a_foreign_success_log_does_not_cancel_a_payout_waiting_for_its_retry(emulator, service, other_workspace):
    workspace, user = other_workspace
    a, b, _ = emulator.invoices()
    ext = f"{TAG}-inv-{b['id']}"
    # Another workspace's transfer with B's external id succeeds; its success event reaches
    # us only when B waits for its retry (the attacker picks the moment; pushed here as Stark Bank would).
    (copy,) = starkbank.transfer.create([starkbank.Transfer(amount=1, external_id=ext, **RECEIVER)], user=user)
    success = wait_for(lambda: [e for e in workspace.events() if e["log"]["type"] == "success"], message="success")[0]

    # Our transfer for B gets a 500 twice: it waits to be sent again, with no Stark Bank id recorded.
    emulator.fail_next("POST", "/v2/transfer", count=2, status=500)
    emulator.pay(b["id"])
    wait_for(lambda: query(service, "select state, tries, transfer_id from transfer where invoice_id = ?",
                           (b["id"],)) == [("pending", 1, None)], message="B waiting to be sent again")
    assert post_event(service, emulator, success) == 200
    assert outcome_of(service, copy.id, "success") == "transfer not ours"
    ((state, transfer_id),) = query(service, "select state, transfer_id from transfer where invoice_id = ?", (b["id"],))
    assert transfer_id != copy.id and state in ("pending", "sending", "created", "processing")  # still owed
    emulator.pay(a["id"])
    for invoice_id in (a["id"], b["id"]):
        assert_forwarded_once(emulator, service, invoice_now(emulator, invoice_id))
    posts = [c["status"] for c in emulator.requests if (c["method"], c["path"]) == ("POST", "/v2/transfer")]
    assert posts[0] == 200 and sorted(posts[1:]) == [200, 200, 500, 500]  # theirs, then ours: two faults, two sent
    # Before comparing, the service looked its own transfer up by tag, in its own workspace.
    assert any(c["path"] == "/v2/transfer" and f"tags={ext}" in c["query"] for c in emulator.requests)
    report = status_json(service)
    assert report["transferred"] == sum(i["amount"] - FEE for i in emulator.invoices() if i["status"] == "paid")


BAD_NUMBERS = [
    {"amount": 10000, "fee": -5000},  # a negative fee would forward more than was paid
    {"amount": -10000, "fee": 0},
    {"amount": 10000},  # no fee: never taken as 0
    {"amount": 0, "fee": 0},
]


def test_a_credit_with_bad_numbers_moves_no_money_and_does_not_block_the_real_one(emulator, service_factory):
    # One service, each kind of bad numbers about an invoice of its own (one run instead of one per kind).
    service = started_service(emulator, service_factory, len(BAD_NUMBERS))
    invoices = emulator.invoices()
    for n, (invoice, numbers) in enumerate(zip(invoices, BAD_NUMBERS), 1):
        # Signed by Stark Bank's key and about an invoice we did issue: only the numbers are wrong.
        body, headers = signed_event(emulator, f"810000000000000{n}",
                                     dict(id=invoice["id"], tags=[TAG], status="paid", **numbers))
        assert service.request("POST", "/webhook", body, {**headers, **auth()})[0] == 200
    for invoice, numbers in zip(invoices, BAD_NUMBERS):
        assert outcome_of(service, invoice["id"], "credited").startswith("invalid: "), numbers
        assert messages_matching(service, rf"invoice {invoice['id']}: .*not forwarded"), numbers
    assert query(service, "select count(*) from credit") == [(0,)] and emulator.transfers() == []

    for invoice in invoices:
        emulator.pay(invoice["id"])
    for invoice in invoices:
        assert_forwarded_once(emulator, service, invoice_now(emulator, invoice["id"]))
    assert status_json(service)["events"]["invalid"] == len(BAD_NUMBERS)


# -- what still works -----------------------------------------------------------------------------


def test_a_credit_of_our_invoice_missing_from_the_store_is_confirmed_and_forwarded_once(emulator, sdk, service):
    # An invoice of our workspace, with our tag, that the store never recorded (say, a
    # database restored from an older backup). The SDK here uses another project of
    # the same workspace, as an earlier deployment would have.
    (ours,) = starkbank.invoice.create([starkbank.Invoice(amount=12345, name="Arya Stark", tax_id="012.345.678-90",
                                                          tags=[TAG])])
    # A copy of its credit with a wrong amount arrives first: the amounts come from Stark Bank, not the event.
    body, headers = signed_event(emulator, "8200000000000001",
                                 {"id": ours.id, "tags": [TAG], "status": "paid", "amount": 10 ** 12, "fee": 0})
    emulator.set(hold_deliveries=True)
    emulator.pay(ours.id)
    assert service.request("POST", "/webhook", body, {**headers, **auth()})[0] == 200
    emulator.set(hold_deliveries=False)  # and the genuine credited event follows

    assert_forwarded_once(emulator, service, invoice_now(emulator, ours.id))
    wait_for(lambda: query(service, "select count(*) from event where entity_id = ? and log_type = 'credited'"
                                    " and processed_at is not null", (ours.id,)) == [(2,)], message="both credits")
    assert query(service, "select amount, fee, net from credit") == [(12345, FEE, 12345 - FEE)]
    assert [(c["path"], c["status"]) for c in emulator.requests if c["path"].startswith("/v2/invoice/")] == [
        (f"/v2/invoice/{ours.id}", 200)]
    assert len(emulator.transfers()) == 1


def test_a_genuine_failed_log_of_ours_leads_to_exactly_one_second_attempt(emulator, service, attacker):
    workspace, user = attacker
    a, _, _ = emulator.invoices()
    emulator.set(transfer_delay_s=60.0, deliver_times=2)  # ours stays "created" until failed; each event twice
    emulator.pay(a["id"])
    (first,) = wait_for(lambda: our_transfers(emulator, a["id"]), message="A's transfer")
    wait_for(lambda: query(service, "select transfer_id from transfer where invoice_id = ?", (a["id"],)) ==
             [(first["id"],)], message="its id recorded")
    # The attacker's copy of our second attempt's external id is refused nowhere: it is another workspace.
    starkbank.transfer.create([starkbank.Transfer(amount=1, external_id=f"{TAG}-inv-{a['id']}-2", **RECEIVER)],
                              user=user)

    emulator.fail_transfer(first["id"], ["receiver account closed"])
    second = wait_for(lambda: len(our_transfers(emulator, a["id"])) == 2 and our_transfers(emulator, a["id"])[1],
                      message="A sent once more")
    assert second["externalId"] == f"{TAG}-inv-{a['id']}-2" and second["amount"] == first["amount"]
    # Confirmed with our own credentials before the second attempt.
    assert any(c["path"] == f"/v2/transfer/{first['id']}" and c["status"] == 200 for c in emulator.requests)
    wait_for(lambda: not emulator.deliveries_pending(), message="every copy delivered")
    assert len(our_transfers(emulator, a["id"])) == 2
    wait_for(lambda: transfer_rows(service) == [(a["id"], 1, "failed"), (a["id"], 2, "created")],
             message="the second attempt recorded")
    assert messages_matching(service, r"TRANSFER FAILED: .*receiver account closed.*queued once more")


# -- the mechanisms, one step at a time (fake clock, real SDK and emulator) -------------------------


@pytest.fixture
def bank(sdk):
    configured = Bank(sdk_config(sdk))
    configured.configure()
    return configured


def test_stark_bank_answers_for_our_workspace_only_and_not_found_is_definite(emulator, bank, other_workspace):
    _, user = other_workspace
    (ours,) = starkbank.invoice.create([starkbank.Invoice(amount=5000, name="Arya Stark", tax_id="012.345.678-90",
                                                          tags=[TAG])])
    (theirs,) = starkbank.invoice.create([starkbank.Invoice(amount=5000, name="Arya Stark", tax_id="012.345.678-90",
                                                            tags=[TAG])], user=user)
    emulator.pay(ours.id)

    assert bank.get("invoice", ours.id) == {"id": ours.id, "amount": 5000, "fee": FEE, "status": "paid", "tags": [TAG]}
    assert bank.get("invoice", theirs.id) is None  # another workspace's: Stark Bank shows us nothing
    assert bank.get("invoice", "../transfer") is None  # not an id of Stark Bank's: never sent
    emulator.fail_next("GET", f"/v2/invoice/{ours.id}", status=500)
    with pytest.raises(BankUnavailable):
        bank.get("invoice", ours.id)
    assert [(c["path"], c["status"]) for c in emulator.requests if c["method"] == "GET"] == [
        (f"/v2/invoice/{ours.id}", 200), (f"/v2/invoice/{theirs.id}", 400), (f"/v2/invoice/{ours.id}", 500)]


def test_a_credit_stark_bank_cannot_confirm_yet_waits_with_backoff_and_holds_up_nothing(emulator, bank, store, clock):
    # An invoice of our workspace that the store never recorded, credited while no webhook listens.
    (ours,) = starkbank.invoice.create([starkbank.Invoice(amount=5000, name="Arya Stark", tax_id="012.345.678-90",
                                                          tags=[TAG])])
    emulator.pay(ours.id)
    worker = Worker(store, bank, TAG, poll_interval_s=0, clock=clock, rng=random.Random(1))
    gets = lambda: [c["status"] for c in emulator.requests if c["path"] == f"/v2/invoice/{ours.id}"]  # noqa: E731
    emulator.fail_next("GET", f"/v2/invoice/{ours.id}", status=500)

    wait_s = worker.run_once()  # pulls created, paid, credited; Stark Bank does not answer about the credit
    (waiting,) = store.pending_events()
    assert waiting.log_type == "credited" and gets() == [500] and emulator.transfers() == []
    assert 1.0 <= wait_s <= 2.0  # the first backoff, with jitter
    assert not next(e for e in emulator.events() if e["id"] == waiting.id)["isDelivered"]  # pulled again later
    worker.run_once()
    assert gets() == [500]  # not asked again before its time

    clock.advance(wait_s)
    worker.run_once()
    assert gets() == [500, 200] and store.pending_events() == []
    assert [(t["amount"], t["externalId"]) for t in emulator.transfers()] == [(5000 - FEE, f"{TAG}-inv-{ours.id}")]


def test_a_credit_of_ours_that_the_read_shows_not_paid_yet_waits_and_is_forwarded_once_paid(emulator, bank, store,
                                                                                             clock):
    # A read that lags the writes can show an invoice of ours as it was before its payment: the credit is not
    # final "not paid" then, but "not yet" for RECONCILE_AFTER (60 s here), and forwarded once Stark Bank shows it
    # paid. One that Stark Bank still shows unpaid after that moves nothing.
    ours, never = starkbank.invoice.create([starkbank.Invoice(amount=amount, name="Arya Stark",
                                                              tax_id="012.345.678-90", tags=[TAG])
                                            for amount in (5000, 6000)])
    for n, invoice in enumerate((ours, never)):
        event = json.loads(signed_event(emulator, f"830000000000000{n}", {"id": invoice.id, "tags": [TAG],
                                                                          "status": "paid", "amount": invoice.amount,
                                                                          "fee": FEE})[0])["event"]
        store.add_event(Event(event["id"], "invoice", "credited", invoice.id, event), "webhook", clock())
    worker = Worker(store, bank, TAG, poll_interval_s=0, clock=clock, rng=random.Random(1), reconcile_after_s=60)

    assert worker.process_events() == 0  # Stark Bank reports both "created": both wait
    assert len(store.pending_events()) == 2 and store.credit(ours.id) is None
    emulator.pay(ours.id)
    clock.advance(30)
    assert worker.process_events() == 1
    assert store.credit(ours.id) is not None and [e.id for e in store.pending_events()] == ["8300000000000001"]
    clock.advance(31)  # past RECONCILE_AFTER: what Stark Bank reports now is final
    assert worker.process_events() == 1 and store.pending_events() == []
    assert store.credit(never.id) is None
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("select outcome_code from event where id = '8300000000000001'").fetchall() == [
            ("not_ours_not_paid",)]
    finally:
        conn.close()
    worker.run_once()
    assert [(t["amount"], t["externalId"]) for t in emulator.transfers()] == [(5000 - FEE, f"{TAG}-inv-{ours.id}")]
    # Our invoice, credited by Stark Bank's event, yet not paid by its word: a person must look.
    worker.check_alarms()
    assert [(a["kind"], a["subject"]) for a in store.alarms()] == [("credit_unpaid", never.id)]


def test_a_transfer_log_waits_for_our_own_lookup_while_no_stark_bank_id_is_recorded(emulator, bank, store, clock,
                                                                                     other_workspace):
    workspace, user = other_workspace
    ext = f"{TAG}-inv-1234"
    store.add_credit("1234", "ev-1", 10000, FEE, ext, clock())
    worker = Worker(store, bank, TAG, poll_interval_s=0, clock=clock, rng=random.Random(1),
                    sender=Sender(store, bank, TAG, clock, rng=random.Random(2)))
    emulator.fail_next("POST", "/v2/transfer", status=500)
    retry_in_s = worker.run_once()  # our create call fails; the lookup finds nothing: it waits to be sent again
    assert store.transfer(ext)[4:6] == ("pending", None) and retry_in_s >= 1.0

    # Another workspace's transfer with our external id succeeds, and its log reaches us.
    (copy,) = starkbank.transfer.create([starkbank.Transfer(amount=1, external_id=ext, **RECEIVER)], user=user)
    success = wait_for(lambda: [e for e in workspace.events() if e["log"]["type"] == "success"], message="success")[0]
    store.add_event(Event(success["id"], "transfer", "success", copy.id, success), "webhook", clock())
    emulator.fail_next("GET", "/v2/transfer", status=503)
    worker.process_events()  # our lookup gets no answer: the log cannot be compared yet, and waits
    assert [e.id for e in store.pending_events()] == [success["id"]]
    assert store.transfer(ext)[4:6] == ("pending", None)

    clock.advance(300)  # both due: the event is processed first, then the transfer sent again
    worker.run_once()  # our lookup finds no transfer of ours with that external id: the log is not ours
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("select outcome from event where id = ?", (success["id"],)).fetchall() == [
            ("transfer not ours",)]
    finally:
        conn.close()
    assert not store.pending_events() and emulator.transfers()[0]["externalId"] == ext
    assert store.transfer(ext)[4:6] == ("created", emulator.transfers()[0]["id"]) and len(emulator.transfers()) == 1
    assert store.summary()["events"]["not_ours"] == 1


def test_a_failed_duplicate_of_our_transfer_that_went_through_is_not_sent_again(emulator, bank, store, clock):
    # A create call retried after no answer can make a second transfer under our external id that
    # Stark Bank then fails (a duplicate) while the first one goes through, and the retry's answer
    # recorded the second one's id. Its confirmed failure must not queue another attempt.
    ext, tags = f"{TAG}-inv-1234", [TAG, "invoice-1234", f"{TAG}-inv-1234"]
    store.add_credit("1234", "ev-1", 10000, FEE, ext, clock())
    (first,) = starkbank.transfer.create([starkbank.Transfer(amount=10000 - FEE, external_id=ext, tags=tags,
                                                             **RECEIVER)])
    emulator.set(transfer_fail_ratio=1.0)  # drawn when a transfer is created
    (second,) = starkbank.transfer.create([starkbank.Transfer(amount=10000 - FEE, external_id=ext + "-again",
                                                              tags=tags, **RECEIVER)])
    emulator.set(transfer_fail_ratio=0.0)
    store.transfer_created(ext, second.id, "created", clock())
    failed = wait_for(lambda: [e for e in emulator.events() if e["log"]["type"] == "failed"
                               and e["log"]["transfer"]["id"] == second.id], message="the second one failed")[0]
    wait_for(lambda: {t["id"]: t["status"] for t in emulator.transfers()} == {first.id: "success", second.id: "failed"},
             message="the first one through")

    # The emulator keeps external ids unique, so the second one got its own; a real duplicate's log
    # carries ours, as here.
    failed["log"]["transfer"]["externalId"] = ext
    store.add_event(Event(failed["id"], "transfer", "failed", second.id, failed), "webhook", clock())
    worker = Worker(store, bank, TAG, poll_interval_s=0, clock=clock, rng=random.Random(1))
    assert worker.process_events() == 1
    # Our row follows the transfer that went through; no second attempt is queued.
    assert [(t.attempt, t.state, t.transfer_id) for t in store.transfers()] == [(1, "success", first.id)]
    assert len(emulator.transfers()) == 2


def test_a_failed_transfer_with_no_other_of_its_invoice_moving_is_sent_again(emulator, bank, store, clock):
    ext, tags = f"{TAG}-inv-1234", [TAG, "invoice-1234", f"{TAG}-inv-1234"]
    store.add_credit("1234", "ev-1", 10000, FEE, ext, clock())
    emulator.set(transfer_fail_ratio=1.0)
    (only,) = starkbank.transfer.create([starkbank.Transfer(amount=10000 - FEE, external_id=ext, tags=tags,
                                                            **RECEIVER)])
    emulator.set(transfer_fail_ratio=0.0)
    store.transfer_created(ext, only.id, "created", clock())
    failed = wait_for(lambda: [e for e in emulator.events() if e["log"]["type"] == "failed"], message="failed")[0]

    store.add_event(Event(failed["id"], "transfer", "failed", only.id, failed), "webhook", clock())
    worker = Worker(store, bank, TAG, poll_interval_s=0, clock=clock, rng=random.Random(1))
    assert worker.process_events() == 1
    assert [(t.attempt, t.state) for t in store.transfers()] == [(1, "failed"), (2, "pending")]
