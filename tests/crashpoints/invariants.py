"""What must hold once the service has settled after a crash, checked against the emulator's ledger.

Each invariant is a function of a settled ``story.Run`` (and of the seconds the restart
took) that returns the list of what it found wrong, empty when it holds. ``INVARIANTS``
is the list the enumeration checks; add one to extend it. Money facts come from the
emulator, which stands for Stark Bank (its transfers, invoices and the deliveries its
webhooks got 200 for), never from what the service says it did; the service's database
and ``/status`` (as an operator reads it: with the operator's credentials) are read only for
what they promise: that an acknowledged event is stored, and that whatever is still open
has an alarm.
"""

from typing import Callable, NamedTuple

from stark_challenge import transfer_states

from .story import INVOICES, StoryStuck

__all__ = ["Invariant", "INVARIANTS", "RESTART_LIMIT_S", "ALARM_WAIT_S", "check", "stuck"]

FEE = 50  # the emulator's invoice_fee, in cents
RESTART_LIMIT_S = 5.0
ALARM_WAIT_S = 10.0  # story.AFTER_CRASH's ALARM_AFTER and two reconciliation passes, with room to spare


class Invariant(NamedTuple):
    """One property of the settled state."""

    name: str
    check: Callable  # check(run, restart_s) -> [problem, ...]


def _credited(run):
    """The invoices of ours that Stark Bank credited (status paid; the credit is logged with it)."""
    return [i for i in run.emu.invoices() if i["status"] == "paid" and "stark-challenge" in i["tags"]]


def stuck(run):
    """The credited invoices of ours whose every transfer failed at Stark Bank (what ``transfers retry``
    is for), by Stark Bank's ledger."""
    transfers = run.emu.transfers()
    found = set()
    for invoice in _credited(run):
        mine = [t for t in transfers if f"invoice-{invoice['id']}" in (t.get("tags") or ())]
        if mine and all(t["status"] == "failed" for t in mine):
            found.add(invoice["id"])
    return found


def _moved(transfers):
    """The transfers that moved money or still may: all but the failed ones."""
    return [t for t in transfers if t["status"] not in ("failed", "canceled")]


def each_credit_forwarded_once(run, _restart_s):
    """Every credited invoice of ours has exactly one transfer that moved money, of amount minus fee,
    to the configured account; no other transfer exists."""
    problems = []
    receiver = run.config()
    account = {"bankCode": receiver.transfer_bank_code, "branchCode": receiver.transfer_branch,
               "accountNumber": receiver.transfer_account, "name": receiver.transfer_name,
               "taxId": receiver.transfer_tax_id, "accountType": receiver.transfer_account_type}
    credited = {i["id"]: i for i in _credited(run)}
    by_invoice = {}
    for transfer in run.emu.transfers():
        tag = next((t for t in transfer.get("tags") or () if t.startswith("invoice-")), None)
        by_invoice.setdefault(tag and tag.removeprefix("invoice-"), []).append(transfer)
    for invoice_id, invoice in credited.items():
        moved = _moved(by_invoice.get(invoice_id, []))
        if len(moved) != 1:
            problems.append(f"invoice {invoice_id}: {len(moved)} transfers moved money "
                            f"({', '.join(t['externalId'] + ' ' + t['status'] for t in moved) or 'none'})")
            continue
        (transfer,) = moved
        if transfer["status"] != "success":
            problems.append(f"invoice {invoice_id}: its transfer {transfer['externalId']} is {transfer['status']}")
        if transfer["amount"] != invoice["amount"] - invoice["fee"]:
            problems.append(f"invoice {invoice_id}: transfer of {transfer['amount']} cents, owed "
                            f"{invoice['amount'] - invoice['fee']}")
        wrong = {k: transfer.get(k) for k, v in account.items() if transfer.get(k) != v}
        if wrong:
            problems.append(f"invoice {invoice_id}: transfer to the wrong account {wrong}")
    strays = {k: v for k, v in by_invoice.items() if k not in credited and _moved(v)}
    for invoice_id, transfers in strays.items():
        problems.append(f"transfers for invoice {invoice_id}, not a credit of ours: "
                        + ", ".join(t["externalId"] for t in transfers))
    return problems


def one_round(run, _restart_s):
    """Round 0 was issued exactly once (one create call's invoices, all recorded), and no other round."""
    invoices = [i for i in run.emu.invoices() if "stark-challenge" in i["tags"]]
    rounds = sorted({t for i in invoices for t in i["tags"] if t.startswith("round-")})
    batches = sorted({t for i in invoices for t in i["tags"] if t.startswith("batch-")})
    problems = []
    if rounds != ["round-0"] or len(batches) != 1 or len(invoices) != INVOICES:
        problems.append(f"Stark Bank has {len(invoices)} invoices of rounds {rounds} in batches {batches}; "
                        f"expected {INVOICES} of round-0 in one batch")
    stored = run.rows("select n, state, count from round")
    if stored != [(0, "issued", INVOICES)]:
        problems.append(f"the service's rounds: {stored}")
    recorded = {r[0] for r in run.rows("select id from invoice")}
    if recorded != {i["id"] for i in invoices}:
        problems.append("the service's invoices differ from Stark Bank's")
    return problems


def acknowledged_events_stored(run, _restart_s):
    """Every event a webhook delivery got 200 for is stored."""
    acknowledged = {d["eventId"] for d in run.emu.deliveries() if d["status"] == 200}
    stored = {r[0] for r in run.rows("select id from event")}
    return [f"event {e} was answered 200 but is not stored" for e in sorted(acknowledged - stored)]


def _unsettled(run):
    """Return {invoice id: (what is open, the subjects an alarm about it may name)}: each credit of ours whose
    money has not arrived by Stark Bank's ledger, and each whose latest attempt the service holds open or
    failed."""
    found = {}
    transfers = run.emu.transfers()
    for invoice in _credited(run):
        mine = [t for t in transfers if f"invoice-{invoice['id']}" in (t.get("tags") or ())]
        if not any(t["status"] == "success" for t in mine):
            found[invoice["id"]] = ("no transfer of it succeeded at Stark Bank",
                                    {invoice["id"], *(t["externalId"] for t in mine)})
    latest = run.rows("select t.invoice_id, t.external_id, t.state from transfer t where t.attempt = "
                      "(select max(attempt) from transfer l where l.invoice_id = t.invoice_id)")
    for invoice_id, external_id, state in latest:
        if state in transfer_states.OPEN or state in transfer_states.FAILED:
            what, subjects = found.get(invoice_id, ("", set()))
            found[invoice_id] = ("; ".join(filter(None, (what, f"transfer {external_id} {state}"))),
                                 subjects | {invoice_id, external_id})
    return found


def nothing_open_without_alarm(run, _restart_s):
    """Once settled, no stored event waits, and every credit whose money has not arrived (Stark Bank's
    ledger), or whose transfer the service holds open or failed, has a standing alarm as an operator
    reads them: the ALARMS of /status, with the operator's credentials. The service started after the
    kill raises an alarm within ``story.AFTER_CRASH``'s seconds; it is waited for at most ALARM_WAIT_S."""
    problems = [f"{n} events not processed" for (n,) in run.rows(
        "select count(*) from event where processed_at is null") if n]
    unsettled = _unsettled(run)
    missing = {}

    def all_alarmed():
        subjects = {alarm["subject"] for alarm in run.status_page()["alarms"]}
        missing.clear()
        missing.update({invoice: what for invoice, (what, names) in unsettled.items() if not names & subjects})
        return not missing
    try:
        run.wait(all_alarmed, "an alarm for each credit left open", ALARM_WAIT_S)
    except StoryStuck:
        pass
    return problems + [f"invoice {invoice}: {what}, no alarm in /status" for invoice, what in missing.items()]


def restarted_in_time(_run, restart_s):
    """The service answered /health again within RESTART_LIMIT_S of being started after the kill."""
    if restart_s is None or restart_s < RESTART_LIMIT_S:
        return []
    return [f"the restart took {restart_s:.1f} s"]


INVARIANTS = (
    Invariant("each credit forwarded once", each_credit_forwarded_once),
    Invariant("one round", one_round),
    Invariant("acknowledged events stored", acknowledged_events_stored),
    Invariant("nothing open without an alarm", nothing_open_without_alarm),
    Invariant("restart under 5 s", restarted_in_time),
)


def check(run, restart_s, timed=True):
    """Return every problem the invariants find, each prefixed with its invariant's name.

    ``timed=False`` leaves out the one about time (the restart's): the suite asserts
    behaviour, never speed, on a machine it shares; ``make crash`` checks it.
    """
    return [f"{inv.name}: {problem}" for inv in INVARIANTS if timed or inv.check is not restarted_in_time
            for problem in inv.check(run, restart_s)]
