"""The emulator's money rules, driven by the real SDK: balance, schedules, reversals, due
dates, limits, event attempts, files, and its command line acting on a running emulator.

Each test has a fresh Emulator (fast steps, no simulated payments) and waits on background
work by polling with a deadline.
"""

import datetime
import http.server
import subprocess
import sys
import threading

import pytest
import starkbank

from stark_challenge.emulator import Emulator
from stark_challenge.emulator.dates import SAO_PAULO
from stark_challenge.emulator.transfers import INSUFFICIENT_BALANCE

from support import child_env, free_port, wait_for

RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")
UTC = datetime.timezone.utc


def eventually(predicate, what, timeout_s=5.0):
    return wait_for(predicate, timeout_s, interval=0.01, message=what)


def invoice(amount=1000, **extra):
    return starkbank.Invoice(amount=amount, tax_id="012.345.678-90", name="Arya Stark", **extra)


def transfer(amount=950, **extra):
    return starkbank.Transfer(amount=amount, **dict(RECEIVER, **extra))


def status_of(emulator, kind, entity_id):
    rows = emulator.invoices() if kind == "invoice" else emulator.transfers()
    return next(row["status"] for row in rows if row["id"] == entity_id)


def logs_of(emulator, kind, entity_id):
    return [(e["log"]["type"], e["log"]["errors"]) for e in emulator.events()
            if e["subscription"] == kind and e["log"][kind]["id"] == entity_id]


def codes(raised):
    return [error.code for error in raised.value.errors]


@pytest.fixture
def emulator(emulator_certificates):
    emu = Emulator(pay_ratio=0.0, transfer_delay_s=0.02, seed=11, delivery_attempts=3, delivery_backoff_s=0.02,
                   invoice_fee=50, certificates=emulator_certificates).start()
    yield emu
    emu.stop()


@pytest.fixture
def project(sdk):
    return sdk


def paid(emulator, amount=1000):
    made = starkbank.invoice.create([invoice(amount)])[0]
    emulator.pay(made.id)
    return made.id


# -- balance and limits -----------------------------------------------------------------


def test_credits_add_to_the_balance_and_transfers_take_from_it_when_they_run(emulator, project):
    start = starkbank.balance.get().amount
    assert start == emulator.balance() == 10 ** 9
    paid(emulator, 1000)
    assert starkbank.balance.get().amount == start + 950

    made = starkbank.transfer.create([transfer(300, external_id="t-1")])[0]

    eventually(lambda: status_of(emulator, "transfer", made.id) == "success", "the transfer to succeed")
    assert emulator.balance() == start + 650


def test_a_transfer_the_balance_cannot_cover_fails_as_stark_bank_fails_it(emulator, project):
    emulator.set_balance(1000)
    short = starkbank.transfer.create([transfer(1500, external_id="t-short")])[0]
    assert short.status == "created"  # accepted first, failed when it runs

    eventually(lambda: status_of(emulator, "transfer", short.id) == "failed", "the transfer to fail")
    assert logs_of(emulator, "transfer", short.id) == [("created", []), ("failed", [INSUFFICIENT_BALANCE])]
    assert starkbank.transfer.get(short.id).transaction_ids == [] and emulator.balance() == 1000

    covered = starkbank.transfer.create([transfer(900, external_id="t-covered")])[0]
    eventually(lambda: status_of(emulator, "transfer", covered.id) == "success", "the covered transfer")
    assert emulator.balance() == 100


def test_amounts_beyond_the_limit_are_refused_at_once(emulator, project):
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.create([transfer(10 ** 15, external_id="huge"), transfer(0, external_id="zero")])
    assert codes(raised) == ["invalidAmount", "invalidAmount"]
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.create([invoice(10 ** 15)])
    assert codes(raised) == ["invalidAmount"]

    assert starkbank.invoice.create([invoice(0)])[0].amount == 0
    assert emulator.transfers() == []


# -- scheduled transfers ------------------------------------------------------------------


def test_a_transfer_scheduled_for_a_later_date_waits_and_can_be_canceled_until_then(emulator, project):
    tomorrow = datetime.datetime.now(SAO_PAULO).date() + datetime.timedelta(days=1)
    later = starkbank.transfer.create([transfer(external_id="later", scheduled=tomorrow)])[0]
    assert later.scheduled == tomorrow

    eventually(emulator.idle, "the emulator to be idle")  # a far-off date is not work in progress
    assert status_of(emulator, "transfer", later.id) == "created"
    canceled = starkbank.transfer.delete(later.id)

    assert canceled.status == "canceled" and canceled.id == later.id
    assert logs_of(emulator, "transfer", later.id) == [("created", []), ("canceled", [])]
    assert emulator.balance() == 10 ** 9
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.delete(later.id)
    assert codes(raised) == ["invalidAction"]


def test_a_transfer_not_scheduled_for_later_cannot_be_canceled(emulator, project):
    now = starkbank.transfer.create([transfer(external_id="now")])[0]

    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.delete(now.id)

    assert codes(raised) == ["invalidAction"]
    eventually(lambda: status_of(emulator, "transfer", now.id) == "success", "the transfer to succeed")
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.delete("1111111111111111")
    assert codes(raised) == ["invalidTransfer"]


def test_a_scheduled_transfer_runs_when_its_moment_comes(emulator, project):
    moment = datetime.datetime.now(UTC).replace(microsecond=0) + datetime.timedelta(seconds=2)
    soon = starkbank.transfer.create([transfer(external_id="soon", scheduled=moment)])[0]

    assert status_of(emulator, "transfer", soon.id) == "created"
    eventually(lambda: status_of(emulator, "transfer", soon.id) == "success", "the scheduled transfer", 8)
    processing = next(e for e in emulator.events() if e["log"]["type"] == "processing")
    assert processing["log"]["created"] >= moment.isoformat()


def test_a_scheduled_date_before_today_is_refused(emulator, project):
    yesterday = datetime.datetime.now(SAO_PAULO).date() - datetime.timedelta(days=1)
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.create([transfer(external_id="past-date", scheduled=yesterday),
                                   transfer(external_id="past-time", scheduled=datetime.datetime.now(UTC)
                                            - datetime.timedelta(days=2))])
    assert codes(raised) == ["invalidDate", "invalidDateTime"]
    assert emulator.transfers() == []


# -- invoices: reversal, due dates --------------------------------------------------------


def test_lowering_a_paid_invoice_amount_reverses_the_difference(emulator, project):
    invoice_id = paid(emulator, 1000)
    before = emulator.balance()

    partly = starkbank.invoice.update(invoice_id, amount=400)

    assert (partly.status, partly.amount, len(partly.transaction_ids)) == ("paid", 400, 2)
    assert emulator.balance() == before - 600
    fully = starkbank.invoice.update(invoice_id, amount=0)
    assert (fully.status, fully.amount) == ("reversed", 0) and emulator.balance() == before - 1000
    assert [t for t, _ in logs_of(emulator, "invoice", invoice_id)] == [
        "created", "paid", "credited", "reversed", "reversed"]
    reversed_log = next(starkbank.invoice.log.query(types=["reversed"], invoice_ids=[invoice_id]))
    assert starkbank.invoice.log.pdf(reversed_log.id).startswith(b"%PDF-")


def test_a_reversal_that_raises_the_amount_or_that_the_balance_cannot_cover_is_refused(emulator, project):
    invoice_id = paid(emulator, 1000)
    for change, code in ((dict(amount=1000), "invalidAmount"), (dict(status="canceled"), "invalidOperation")):
        with pytest.raises(starkbank.error.InputErrors) as raised:
            starkbank.invoice.update(invoice_id, **change)
        assert codes(raised) == [code]
    emulator.set_balance(100)
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.update(invoice_id, amount=0)
    assert codes(raised) == ["insufficientBalance"]
    assert starkbank.invoice.get(invoice_id).amount == 1000 and emulator.balance() == 100


def test_an_unpaid_invoice_goes_overdue_at_its_due_moment_then_expires(emulator, project):
    due = datetime.datetime.now(UTC) + datetime.timedelta(seconds=1)
    made = starkbank.invoice.create([invoice(due=due, expiration=1)])[0]

    eventually(lambda: status_of(emulator, "invoice", made.id) == "expired", "the invoice to expire", 8)

    assert [t for t, _ in logs_of(emulator, "invoice", made.id)] == ["created", "overdue", "expired"]
    with pytest.raises(ValueError, match="expired, not payable"):
        emulator.pay(made.id)


def test_changing_due_and_expiration_moves_the_invoice_dates(emulator, project):
    made = starkbank.invoice.create([invoice()])[0]  # due in two days by default
    past = datetime.datetime.now(UTC) - datetime.timedelta(hours=1)

    updated = starkbank.invoice.update(made.id, due=past, expiration=datetime.timedelta(hours=2))

    assert updated.expiration == datetime.timedelta(hours=2)
    eventually(lambda: status_of(emulator, "invoice", made.id) == "overdue", "the invoice to be overdue")
    assert [t for t, _ in logs_of(emulator, "invoice", made.id)] == ["created", "updated", "overdue"]
    assert emulator.pay(made.id)["status"] == "paid"  # overdue is still payable


def test_canceled_invoices_cannot_change(emulator, project):
    made = starkbank.invoice.create([invoice()])[0]
    starkbank.invoice.update(made.id, status="canceled")

    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.update(made.id, amount=10)

    assert codes(raised) == ["invalidOperation"]


# -- validation -----------------------------------------------------------------------------


def test_unknown_fields_and_filter_values_are_refused(emulator, project):
    odd = invoice()
    odd.color = "blue"  # the SDK sends every attribute: an unknown field
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.create([invoice(), odd])
    assert codes(raised) == ["invalidJson"] and raised.value.errors[0].message == "Element 1: unknown field color"

    for call, code in ((lambda: list(starkbank.invoice.query(status="bogus")), "invalidStatus"),
                       (lambda: list(starkbank.transfer.query(status="bogus")), "invalidStatus"),
                       (lambda: list(starkbank.transfer.log.query(types=["random"])), "invalidTransferLog"),
                       (lambda: list(starkbank.invoice.log.query(types=["random"])), "invalidInvoiceLog")):
        with pytest.raises(starkbank.error.InputErrors) as raised:
            call()
        assert codes(raised) == [code]
    assert emulator.invoices() == []


# -- files and sub-resources ------------------------------------------------------------------


def test_invoice_and_transfer_files_and_the_invoice_payment(emulator, project):
    invoice_id = paid(emulator, 1000)
    pdf = starkbank.invoice.pdf(invoice_id)
    small, big = starkbank.invoice.qrcode(invoice_id), starkbank.invoice.qrcode(invoice_id, size=25)

    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF") and len(pdf) > 1000
    assert small.startswith(b"\x89PNG\r\n\x1a\n") and int.from_bytes(small[16:20], "big") == 53 * 7
    assert int.from_bytes(big[16:20], "big") == 53 * 25
    payment = starkbank.invoice.payment(invoice_id)
    assert (payment.amount, payment.tax_id, payment.method) == (1000, "012.345.678-90", "pix")
    unpaid = starkbank.invoice.create([invoice()])[0]
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.invoice.payment(unpaid.id)
    assert codes(raised) == ["invalidInvoice"]

    made = starkbank.transfer.create([transfer(external_id="pdf")])[0]
    eventually(lambda: status_of(emulator, "transfer", made.id) == "success", "the transfer to succeed")
    assert starkbank.transfer.pdf(made.id).startswith(b"%PDF-")
    later = starkbank.transfer.create([transfer(external_id="pdf-later", scheduled=datetime.date.today()
                                                + datetime.timedelta(days=2))])[0]
    with pytest.raises(starkbank.error.InputErrors) as raised:
        starkbank.transfer.pdf(later.id)
    assert codes(raised) == ["invalidTransfer"]


# -- event attempts ----------------------------------------------------------------------------


class _Refusing(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def refusing():
    server = _Refusing()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/webhook" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_each_failed_delivery_is_an_event_attempt_with_its_error(emulator, project, refusing):
    closed = emulator.add_webhook("http://127.0.0.1:%d/webhook" % free_port(), ["invoice"])
    answering = emulator.add_webhook(refusing, ["invoice"])
    made = starkbank.invoice.create([invoice()])[0]
    event_id = next(e["id"] for e in emulator.events() if e["log"]["invoice"]["id"] == made.id)

    eventually(lambda: emulator.idle(), "the deliveries to give up")
    attempts = list(starkbank.event.attempt.query(event_ids=[event_id]))

    assert len(attempts) == 6  # three tries to each webhook
    by_webhook = {hook: [a for a in attempts if a.webhook_id == hook] for hook in (closed, answering)}
    assert {a.code for a in by_webhook[closed]} == {"badConnection"}
    assert {(a.code, a.message) for a in by_webhook[answering]} == {
        ("badHttpStatus", "HTTP POST request returned status 500")}
    one = starkbank.event.attempt.get(attempts[0].id)
    assert (one.id, one.event_id) == (attempts[0].id, event_id)
    assert [a.id for a in starkbank.event.attempt.query(webhook_ids=[closed])] == [a.id for a in by_webhook[closed]]
    assert starkbank.event.get(event_id).is_delivered is False


# -- the command line on a running emulator ------------------------------------------------------


def run_command(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "stark_challenge.emulator", *args], env=child_env(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_the_command_line_pays_reverses_fails_sets_the_balance_and_resends(emulator, project, tmp_path, refusing):
    control = emulator.control_url
    made = starkbank.invoice.create([invoice(1000)])[0]
    later = starkbank.transfer.create([transfer(external_id="cli", scheduled=datetime.date.today()
                                                + datetime.timedelta(days=2))])[0]

    outputs = [run_command(tmp_path, *args, "--control", control) for args in (
        ("pay", made.id), ("reverse", made.id, "--amount", "300"), ("fail-transfer", later.id, "--error", "closed"),
        ("set-balance", "5000"))]

    assert [(o.returncode, o.stdout) for o in outputs] == [
        (0, "invoice %s: paid, amount 1000 cents\n" % made.id), (0, "invoice %s: paid, amount 300 cents\n" % made.id),
        (0, "transfer %s: failed\n" % later.id), (0, "balance: 5000 cents\n")]
    assert logs_of(emulator, "transfer", later.id)[-1] == ("failed", ["closed"]) and emulator.balance() == 5000
    emulator.add_webhook(refusing, ["invoice"])
    event_id = next(e["id"] for e in emulator.events() if e["log"]["type"] == "reversed")
    resent = run_command(tmp_path, "resend", event_id, "--control", control)
    assert (resent.returncode, resent.stdout) == (0, "event %s (invoice reversed) sent again\n" % event_id)
    eventually(lambda: any(d["eventId"] == event_id for d in emulator.deliveries()), "the event to be resent")

    refused = run_command(tmp_path, "pay", made.id, "--control", control)
    assert (refused.returncode, refused.stderr) == (1, "emulator: pay: invoice %s is paid, not payable\n" % made.id)
    forged = run_command(tmp_path, "pay", made.id, "--control", control.rsplit("/", 1)[0] + "/guessed")
    assert forged.returncode == 1 and "403" in forged.stderr
    nowhere = run_command(tmp_path, "set-balance", "1")
    assert nowhere.returncode == 2 and "STARK_EMULATOR_CONTROL" in nowhere.stderr
