"""Report: where the money stands, from the store's numbers, as a dict or a compact table.

Used by ``python -m stark_challenge status`` (reading the database read-only, safe
while the service runs), by ``GET /status``, and (``one_line``) by the ``STATUS=``
line the service sends to systemd. Amounts are integer cents in the dict and reais
in the table. Pure: it reads no database and no clock of its own.
"""

import datetime

from .scheduler import round_count
from . import transfer_states

__all__ = ["build", "render", "one_line", "reais"]


def reais(cents):
    """Return cents as reais for people to read: R$ 1,234.56, -R$ 0.50."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}R$ {cents // 100:,}.{cents % 100:02d}"


def _mib(count):
    return f"{count / 2**20:.1f} MiB"


def build(summary, now):
    """Return the status dict: the store's ``summary`` plus the rounds due by ``now`` (aware UTC)."""
    report = dict(summary)
    schedule = summary.get("schedule")
    rounds = dict(summary["rounds"])
    if schedule:
        started = datetime.datetime.fromisoformat(schedule["started_at"])
        total = round_count(schedule["interval_s"], schedule["duration_s"])
        elapsed = (now - started).total_seconds()
        due = int(elapsed // schedule["interval_s"]) + 1 if elapsed >= 0 else 0
        rounds["due"] = min(due, total) if total is not None else due
        rounds["total"] = total
    else:
        rounds["due"], rounds["total"] = 0, None
    report["rounds"] = rounds
    transfers = summary["transfers"]
    for name, states in (("transfers_pending", transfer_states.OPEN), ("transfers_failed", transfer_states.FAILED)):
        report[name] = {
            "count": sum(transfers.get(s, {}).get("count", 0) for s in states),
            "amount": sum(transfers.get(s, {}).get("amount", 0) for s in states),
        }
    report["generated_at"] = now.isoformat(timespec="seconds")
    return report


def render(report):
    """Return the status report as a compact, aligned text table."""
    r = report["rounds"]
    total = "forever" if r["total"] is None else str(r["total"])
    lines = [
        ("rounds", f"{r['issued']} issued, {r['due']} due so far, {total} in the window"
                   + (f", {r['failed']} failed" if r["failed"] else "")),
    ]
    invoices = report["invoices"]
    count = sum(v["count"] for v in invoices.values())
    amount = sum(v["amount"] for v in invoices.values())
    lines.append(("invoices", f"{count} issued, {reais(amount)}"))
    for status in sorted(invoices):
        lines.append((f"  {status}", f"{invoices[status]['count']}, {reais(invoices[status]['amount'])}"))
    c = report["credits"]
    lines.append(("credited", f"{c['count']} invoices, {reais(c['amount'])}"))
    lines.append(("fees", reais(c["fee"])))
    lines.append(("to forward", reais(c["net"])))
    lines.append(("transferred", f"{reais(report['transferred'])} confirmed by Stark Bank"))
    p, f = report["transfers_pending"], report["transfers_failed"]
    lines.append(("pending", f"{p['count']} transfers, {reais(p['amount'])}"))
    lines.append(("failed", f"{f['count']} transfers, {reais(f['amount'])}"))
    attempts = report.get("attempts") or {}
    if attempts.get("retried") or attempts.get("stuck"):
        lines.append(("  attempts", f"{attempts.get('retried', 0)} credits needed more than one, "
                                    f"{attempts.get('stuck', 0)} stuck (see: transfers retry)"))
    e = report["events"]
    lines.append(("last webhook", e["last_webhook_at"] or "never"))
    lines.append(("events", f"{e['received']} received, {e['pending']} waiting to be processed"))
    if e.get("not_ours") or e.get("invalid"):
        lines.append(("  refused", f"{e.get('not_ours', 0)} not ours (moved nothing), "
                                   f"{e.get('invalid', 0)} with invalid data"))
    storage = report.get("storage")
    if storage:
        lines.append(("database", f"{_mib(storage['bytes'])} in use, {_mib(storage['free_bytes'])} free for reuse; "
                                  f"oldest event {storage['oldest_event_at'] or 'none'}"))
    alarms = report.get("alarms") or []
    if alarms:
        lines.append(("ALARMS", f"{len(alarms)} standing: a person must look"))
    for alarm in alarms:
        lines.append((f"  {alarm['kind']}", f"{alarm['subject']}: {alarm['detail']} (since {alarm['raised_at']})"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def one_line(report):
    """Return the report as one short line, for systemd's ``STATUS=`` (``systemctl status``)."""
    r = report["rounds"]
    total = "" if r["total"] is None else f"/{r['total']}"
    p, f = report["transfers_pending"], report["transfers_failed"]
    return (f"rounds {r['issued']}{total} issued; {report['credits']['count']} credited; "
            f"{reais(report['transferred'])} transferred; {p['count']} transfers pending, {f['count']} failed; "
            f"{report['events']['pending']} events pending"
            + (f"; {len(report.get('alarms') or [])} ALARMS" if report.get("alarms") else ""))
