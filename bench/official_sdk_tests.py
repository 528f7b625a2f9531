"""Run the official SDK's own tests (starkbank/sdk-python ``tests/sdk``) against the emulator.

Not part of the suite: a measurement of how closely the emulator plays Stark Bank, judged
by tests its authors wrote against the real sandbox. Nothing is fetched here and no test
file is copied into this repository: give it the path of a checkout of sdk-python (a
directory holding ``tests/sdk`` and ``tests/utils``; tag v2.35.0 is the one measured).

    .venv/bin/python bench/official_sdk_tests.py /path/to/sdk-python

It starts the emulator in this process with a webhook receiver beside it, seeds the
workspace as a long-used sandbox account looks (20 invoices: paid, one partly and one
fully reversed, canceled, overdue, the rest open; 15 transfers: succeeded, failed, one
scheduled; a webhook whose receiver takes invoice events and refuses transfer events, so
events are both delivered and undelivered, with failed attempts), then runs the chosen
test files with pytest in a child process whose SDK reaches the emulator through
HTTPS_PROXY (``SANDBOX_ID`` and ``SANDBOX_PRIVATE_KEY`` name the seeded project). It prints
one line per file (run / passed / failed) and each failure with its first line; the exit
status is 0 when every failure is one of EXPECTED_FAILURES. Loopback only; about 20 s.
"""

import argparse
import datetime
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree

import starkbank

from stark_challenge.emulator import Emulator

FILES = ("test_invoice", "test_invoice_log", "test_transfer", "test_transfer_log", "test_event",
         "test_webhook", "test_balance")

# Parsing an event signed with Stark Bank's own private key needs that key's public half
# (GET /v2/public-key), which no stand-in can serve: the emulator serves its own.
EXPECTED_FAILURES = {
    "tests.sdk.test_event.TesteEventProcess.test_success",
    "tests.sdk.test_event.TesteEventProcess.test_normalized_success",
}

# The taxpayer ids of the seed (valid CPF and CNPJ check digits).
_TAX_IDS = ("012.345.678-90", "20.018.183/0001-80")


class _Receiver(http.server.ThreadingHTTPServer):
    """A webhook endpoint that takes invoice events (200) and refuses transfer events (500)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)

    @property
    def url(self):
        return "http://127.0.0.1:%d/webhook" % self.server_address[1]


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 500 if b'"subscription":"transfer"' in body else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args):
        pass


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("official_sdk_tests: timed out waiting for %s" % what)
        time.sleep(0.05)


def _attempt(notes, what, action):
    """Do one seeding step; note (and go on) if the emulator refuses it."""
    try:
        action()
    except Exception as error:  # an older emulator may lack the step: seed what it can
        notes.append("seed step not possible: %s (%s)" % (what, " ".join(str(error).split())[:120]))


def seed(emulator, webhook_url):
    """Fill the workspace as a long-used sandbox account; return notes about steps refused."""
    notes = []
    now = datetime.datetime.now(datetime.timezone.utc)
    starkbank.webhook.create(url=webhook_url, subscriptions=["invoice", "transfer"])
    invoices = starkbank.invoice.create([
        starkbank.Invoice(amount=10000 + 137 * n, name="Seed Payer %d" % n, tax_id=_TAX_IDS[n % 2],
                          due=now + datetime.timedelta(days=2 + n), tags=["seed", "seed-%d" % n])
        for n in range(20)
    ])
    for invoice in invoices[:10]:
        emulator.pay(invoice.id)
    _attempt(notes, "partial reversal", lambda: starkbank.invoice.update(invoices[0].id, amount=5000))
    _attempt(notes, "full reversal", lambda: starkbank.invoice.update(invoices[1].id, amount=0))
    for invoice in invoices[10:12]:
        starkbank.invoice.update(invoice.id, status="canceled")
    _attempt(notes, "overdue invoice", lambda: starkbank.invoice.update(
        invoices[12].id, due=now - datetime.timedelta(days=2)))
    transfers = starkbank.transfer.create([
        starkbank.Transfer(amount=1000 + 59 * n, name="Seed Receiver %d" % n, tax_id=_TAX_IDS[n % 2],
                           bank_code="20018183", branch_code="0001", account_number="%d-%d" % (10000 + n, n % 10),
                           account_type="checking", external_id="seed-transfer-%d" % n, tags=["seed"])
        for n in range(14)
    ])
    for transfer in transfers[:3]:
        emulator.fail_transfer(transfer.id)
    _attempt(notes, "scheduled transfer", lambda: starkbank.transfer.create([starkbank.Transfer(
        amount=2500, name="Seed Scheduled", tax_id=_TAX_IDS[0], bank_code="20018183", branch_code="0001",
        account_number="20000-0", account_type="checking", external_id="seed-transfer-scheduled",
        scheduled=(now + datetime.timedelta(days=3)).date(), tags=["seed"])]))
    _wait(emulator.idle, 30, "the seeded payments, transfers and deliveries to settle")
    return notes


def run_tests(checkout, files, env):
    """Run the test files with pytest in a child process; return the junit XML root."""
    with tempfile.TemporaryDirectory(prefix="official-sdk-tests-") as directory:
        report = os.path.join(directory, "report.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", report,
                   "-o", "junit_family=xunit1", "--rootdir", checkout]
        command += [os.path.join("tests", "sdk", name + ".py") for name in files]
        subprocess.run(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL, timeout=600, check=False)
        return ElementTree.parse(report).getroot()


def tabulate(root, files):
    """Return ({file: [run, passed, failed]}, [(test id, first line of its failure)])."""
    table = {name: [0, 0, 0] for name in files}
    failures = []
    for case in root.iter("testcase"):
        test_id = "%s.%s" % (case.get("classname"), case.get("name"))
        module = case.get("classname").split(".")[2]
        row = table.setdefault(module, [0, 0, 0])
        if case.find("skipped") is not None:
            continue
        row[0] += 1
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            row[1] += 1
        else:
            row[2] += 1
            failures.append((test_id, (problem.get("message") or "").splitlines()[0][:150]))
    return table, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="a checkout of starkbank/sdk-python (holding tests/sdk)")
    parser.add_argument("--files", nargs="+", default=list(FILES), metavar="NAME",
                        help="test files of tests/sdk to run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="the emulator's seed (default %(default)s)")
    args = parser.parse_args(argv)
    checkout = os.path.abspath(args.checkout)
    if not os.path.isdir(os.path.join(checkout, "tests", "sdk")):
        parser.error("%s holds no tests/sdk" % checkout)
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    emulator = Emulator(seed=args.seed, pay_ratio=0.5, pay_delay_s=0.5, transfer_delay_s=0.2,
                        delivery_attempts=2, delivery_backoff_s=0.05).start()
    try:
        project_id, private_key = emulator.create_project()
        env = {name: value for name, value in emulator.env(project_id, private_key).items()
               if not name.startswith("STARK_")}
        os.environ.update(env)
        starkbank.user = starkbank.Project(environment="sandbox", id=project_id, private_key=private_key)
        notes = seed(emulator, receiver.url)
        child_env = dict(os.environ, **env, SANDBOX_ID=project_id, SANDBOX_PRIVATE_KEY=private_key,
                         SANDBOX_ORGANIZATION_ID=project_id, SANDBOX_ORGANIZATION_PRIVATE_KEY=private_key,
                         PYTHONPATH=checkout)
        root = run_tests(checkout, args.files, child_env)
    finally:
        emulator.stop()
        receiver.shutdown()
    table, failures = tabulate(root, args.files)
    for note in notes:
        print(note)
    print("| file | run / passed / failed |\n|---|---|")
    for name, (run, passed, failed) in table.items():
        print("| %s | %d / %d / %d |" % (name, run, passed, failed))
    totals = [sum(column) for column in zip(*table.values())]
    print("| **total** | **%d / %d / %d** |" % tuple(totals))
    for test_id, message in failures:
        print("%s %s: %s" % ("expected" if test_id in EXPECTED_FAILURES else "FAILED  ", test_id, message))
    return 0 if all(test_id in EXPECTED_FAILURES for test_id, _ in failures) else 1


if __name__ == "__main__":
    sys.exit(main())
