"""Faults during a batched transfer call, injected into the real service process.

Credits made while the service was down are pulled together at start-up, so their
transfers go to Stark Bank in one create call; the fault hits that call. Every test
reads the outcome from the emulator's records (one transfer per credited invoice, of its
amount minus the fee, under its own external id) and the service's database.
"""

import json

import starkbank

from support import messages_matching, query, run_cli, status_json, wait_for

FEE = 50  # the emulator's default invoice_fee, in cents
COUNT = 4


def transfer_posts(emulator):
    return [c for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]


def in_flight(emulator):
    return any(c["method"] == "POST" and c["path"] == "/v2/transfer" for c in emulator.requests_in_flight)


def credits_waiting(emulator, service_factory, **env):
    """Issue a round, stop the service, pay every invoice while it is down; return (service, invoices).

    At its next start the service pulls the credits together: one batch of COUNT transfers."""
    service = service_factory(INVOICE_MIN=COUNT, INVOICE_MAX=COUNT, **env)
    service.start()
    invoices = wait_for(lambda: len(emulator.invoices()) == COUNT and emulator.invoices(), message="round 0")
    assert service.stop() == 0
    # Every delivery fails (nothing listens); quick retries, so that they are given up soon.
    emulator.set(delivery_backoff_s=0.01)
    for invoice in invoices:
        emulator.pay(invoice["id"])
    wait_for(lambda: not emulator.deliveries_pending(), message="deliveries given up")
    return service, {i["id"]: i for i in invoices}


def assert_each_forwarded_once(emulator, service, credited):
    by_invoice = {}
    for transfer in emulator.transfers():
        by_invoice.setdefault(transfer["tags"][1].removeprefix("invoice-"), []).append(transfer)
    assert set(by_invoice) == set(credited)
    for invoice_id, invoice in credited.items():
        (transfer,) = by_invoice[invoice_id]
        assert transfer["amount"] == invoice["amount"] - FEE
        assert transfer["externalId"] == f"stark-challenge-inv-{invoice_id}"
    rows = query(service, "select invoice_id, attempt, transfer_id from transfer order by invoice_id")
    assert rows == sorted((i, 1, by_invoice[i][0]["id"]) for i in credited)


def all_succeeded(service):
    return [r[0] for r in query(service, "select state from transfer")] == ["success"] * COUNT


def test_kill_during_a_held_batch_call_makes_every_transfer_of_it_once(emulator, service_factory):
    service, credited = credits_waiting(emulator, service_factory, BANK_TIMEOUT="30s")
    emulator.answer_late("POST", "/v2/transfer", 3.0)
    service.start()
    wait_for(lambda: in_flight(emulator), message="the batch call held at Stark Bank")
    # Claimed together before the call: all of them are "sending", none "pending".
    assert query(service, "select state, count(*) from transfer group by state") == [("sending", COUNT)]
    service.kill()

    # Restarted while the call may still be under way: settled by lookup, or refused as duplicates.
    service.start()
    wait_for(lambda: all_succeeded(service), message="transfers succeed", timeout=30)
    wait_for(lambda: not emulator.requests_in_flight, message="the interrupted call carried out")
    assert_each_forwarded_once(emulator, service, credited)
    statuses = [c["status"] for c in transfer_posts(emulator)]
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400}, statuses  # all or none per call
    assert messages_matching(service, "the service stopped during its create call")


def test_a_lost_batch_answer_is_settled_by_lookup_without_a_second_call(emulator, service_factory):
    service, credited = credits_waiting(emulator, service_factory)
    emulator.fail_next_after("POST", "/v2/transfer")
    service.start()
    wait_for(lambda: all_succeeded(service), message="transfers succeed", timeout=30)
    assert_each_forwarded_once(emulator, service, credited)
    (post,) = transfer_posts(emulator)
    assert post["dropped"]
    assert len(messages_matching(service, "found at Stark Bank")) == COUNT


def test_a_refused_batch_isolates_the_bad_transfer_and_sends_the_rest(emulator, sdk, service_factory):
    service, credited = credits_waiting(emulator, service_factory, ALARM_AFTER="1s", RECONCILE_INTERVAL="1s")
    bad = sorted(credited)[1]
    # Another app of the workspace took the external id of one of them (without our tags).
    starkbank.transfer.create([starkbank.Transfer(
        amount=1, name="Other", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
        account_number="6341320293482496", account_type="payment", external_id=f"stark-challenge-inv-{bad}",
        tags=["other-app"])])
    service.start()
    # Stark Bank says the bad one's external id exists: it is looked up until found, never sent again.
    wait_for(lambda: query(service, "select state, count(*) from transfer group by state")
             == [("exists", 1), ("success", COUNT - 1)], message="three sent, one exists", timeout=30)

    statuses = [c["status"] for c in transfer_posts(emulator)]
    # Theirs, our batch (refused as a whole), then ours one per call: only the bad one refused.
    assert statuses[:2] == [200, 400] and sorted(statuses[2:]) == [200] * (COUNT - 1) + [400], statuses
    ours = [t for t in emulator.transfers() if "other-app" not in t["tags"]]
    assert sorted(t["tags"][1].removeprefix("invoice-") for t in ours) == sorted(set(credited) - {bad})
    for t in ours:
        assert t["amount"] == credited[t["tags"][1].removeprefix("invoice-")]["amount"] - FEE
    ((errors,),) = query(service, "select errors from transfer where invoice_id = ?", (bad,))
    assert json.loads(errors)[0][0] == "invalidExternalId"
    assert messages_matching(service, rf"transfer stark-challenge-inv-{bad}: Stark Bank says its external id exists")
    assert messages_matching(service, rf"a batch of {COUNT} transfers was refused")
    # Open for longer than ALARM_AFTER: an alarm a person sees, once, until it is resolved.
    # (The others, open for a moment past ALARM_AFTER too, may have had theirs, resolved once they succeeded.)
    wait_for(lambda: [(a["kind"], a["subject"]) for a in status_json(service)["alarms"]]
             == [("transfer_open", f"stark-challenge-inv-{bad}")], message="the alarm")
    wait_for(lambda: messages_matching(service, f"ALARM transfer_open: stark-challenge-inv-{bad}"),
             message="the alarm's line")
    listing = run_cli("transfers", cwd=service.cwd, env={"DATABASE_PATH": service.env["DATABASE_PATH"]})
    assert [line for line in listing.stdout.splitlines() if line.startswith("ALARM ")] == [
        line for line in listing.stdout.splitlines() if f"inv-{bad}" in line]
    assert len(messages_matching(service, f"ALARM transfer_open: stark-challenge-inv-{bad}")) == 1


def test_a_batch_answered_after_the_timeout_is_made_once(emulator, service_factory):
    service, credited = credits_waiting(emulator, service_factory, BANK_TIMEOUT="1s")
    emulator.answer_late("POST", "/v2/transfer", 2.5)
    service.start()
    wait_for(lambda: query(service, "select state, tries, count(*) from transfer group by state, tries")
             == [("pending", 1, COUNT)], message="the batch call timed out, retry planned")
    assert in_flight(emulator)  # the service gave up while Stark Bank still holds it
    emulator.answer_held_calls()  # carried out now, after the service gave up, rather than seconds later
    wait_for(lambda: all_succeeded(service), message="transfers succeed", timeout=30)
    wait_for(lambda: not emulator.requests_in_flight, message="the late call answered")
    assert_each_forwarded_once(emulator, service, credited)
    statuses = [c["status"] for c in transfer_posts(emulator)]
    assert statuses.count(200) == 1 and set(statuses) <= {200, 400}, statuses
