"""What Stark Bank's side does after the service acted, as the running service sees it:

- an invoice going overdue or expiring changes nothing but the report (no credit, no transfer);
- a transfer the workspace balance cannot cover fails at Stark Bank: it is sent again only by
  the confirmed-final rule (one more attempt under a new external id), and when that one
  fails too the credit is an alarm a person sees, until a retry moves the money;
- a credit Stark Bank reverses after we forwarded it is an alarm: the money already left.

The emulator acts as Stark Bank's side (payments, the balance, reversals) or as a person using
the API with the same workspace's credentials (``invoice.update``); the service learns of it
only through Stark Bank's events and its own lookups.
"""

import datetime

import starkbank

from stark_challenge.emulator.transfers import INSUFFICIENT_BALANCE

from support import query, run_cli, service_settled, status_json, wait_for


def alarms(service):
    return {(a["kind"], a["subject"]): a["detail"] for a in status_json(service)["alarms"]}


def test_invoices_going_overdue_or_expiring_change_only_the_report(emulator, service_factory, sdk):
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 3, message="round 0")
    late, gone, paid = (invoice["id"] for invoice in emulator.invoices())
    now = datetime.datetime.now(datetime.timezone.utc)

    starkbank.invoice.update(late, due=now - datetime.timedelta(hours=1), expiration=datetime.timedelta(days=1))
    starkbank.invoice.update(gone, due=now - datetime.timedelta(hours=2), expiration=datetime.timedelta(minutes=1))
    emulator.pay(paid)

    wait_for(lambda: len(emulator.transfers()) == 1, message="the paid invoice's transfer")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    statuses = {invoice["id"]: invoice["status"] for invoice in emulator.invoices()}
    assert (statuses[late], statuses[gone]) == ("overdue", "expired")
    # Polled: the emulator may turn an invoice overdue just after it looked idle, its event then on its way.
    wait_for(lambda: dict(query(service, "select id, status from invoice where id in (?, ?)", (late, gone))) == {
        late: "overdue", gone: "expired"}, message="both statuses recorded")
    wait_for(lambda: service_settled(service, emulator), message="the service settled again")
    assert query(service, "select invoice_id from credit") == [(paid,)]
    assert [t["tags"][1] for t in emulator.transfers()] == ["invoice-" + paid]
    invoices = status_json(service)["invoices"]
    assert (invoices["overdue"]["count"], invoices["expired"]["count"]) == (1, 1)
    assert service.stop() == 0


def test_a_transfer_the_balance_cannot_cover_is_sent_once_more_then_is_an_alarm_until_retried(
        emulator, service_factory):
    emulator.set(transfer_delay_s=0.5, invoice_fee=50)
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, RECONCILE_INTERVAL="1s")
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 1, message="round 0")
    [invoice] = emulator.invoices()
    emulator.pay(invoice["id"])
    wait_for(lambda: emulator.transfers(), message="the first transfer")
    emulator.set_balance(0)  # before it runs: Stark Bank fails it

    wait_for(lambda: ("credit_failed", invoice["id"]) in alarms(service), timeout=30, message="the alarm")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    sent = emulator.transfers()
    assert [(t["externalId"], t["status"]) for t in sent] == [
        (f"stark-challenge-inv-{invoice['id']}", "failed"), (f"stark-challenge-inv-{invoice['id']}-2", "failed")]
    failures = [e["log"]["errors"] for e in emulator.events() if e["log"]["type"] == "failed"]
    assert failures == [[INSUFFICIENT_BALANCE]] * 2 and emulator.balance() == 0
    detail = alarms(service)[("credit_failed", invoice["id"])]
    assert detail.startswith(f"attempt 2 (stark-challenge-inv-{invoice['id']}-2, {invoice['amount'] - 50} cents) "
                             "failed") and "Insufficient balance" in detail, detail

    emulator.set_balance(10 ** 6)  # a person adds money, then retries
    done = run_cli("transfers", "retry", invoice["id"], cwd=service.cwd, env=service.env)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: [t["status"] for t in emulator.transfers()][-1:] == ["success"], message="attempt 3")
    wait_for(lambda: ("credit_failed", invoice["id"]) not in alarms(service), timeout=30, message="resolved")
    assert len(emulator.transfers()) == 3 and emulator.balance() == 10 ** 6 - (invoice["amount"] - 50)
    assert service.stop() == 0


def test_a_credit_reversed_after_it_was_forwarded_is_an_alarm_and_moves_nothing(emulator, service_factory):
    emulator.set(invoice_fee=50)
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, RECONCILE_INTERVAL="1s")
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 1, message="round 0")
    [invoice] = emulator.invoices()
    emulator.pay(invoice["id"])
    wait_for(lambda: [t["status"] for t in emulator.transfers()] == ["success"], message="forwarded")

    emulator.reverse(invoice["id"], invoice["amount"] // 2)  # the payer gets half back

    key = ("credit_reversed", invoice["id"])
    wait_for(lambda: key in alarms(service), timeout=30, message="the alarm")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    assert alarms(service)[key] == (f"credit of {invoice['amount'] - 50} cents; transfers: "
                                    f"stark-challenge-inv-{invoice['id']} success")
    assert len(emulator.transfers()) == 1  # nothing more moved, nothing taken back
    assert query(service, "select status from invoice") == [("reversed",)]
    assert service.stop() == 0
