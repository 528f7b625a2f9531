"""Metrics: the service's numbers in Prometheus's text exposition format (0.0.4), with the stdlib only.

Two kinds of number, and where each comes from:

- counts the store already knows (rounds, invoices, credits, transfers by state and
  amount, pending events) are read from it at each scrape, so they survive a restart;
- counts only this process sees (webhooks by outcome, signature verdicts, event
  pulls, transfer API calls) live in one ``Counters`` object, built in ``app`` and
  handed to the gate, the worker and the sender. They start at zero with the
  process, as Prometheus expects of a counter (``rate`` and ``increase`` handle the
  reset).

Every label value the service can give a counter is listed in ``KNOWN_LABELS`` and
shown from the start at 0, so a series exists before its first event (an alert on
``increase(...{reason="bad_signature"}[5m])`` has something to read). ``process_families``
adds Prometheus's standard ``process_*`` metrics (CPU, memory, descriptors, start
time), read from ``/proc`` where there is one.

``exposition`` writes families as text: ``# HELP`` and ``# TYPE`` lines, then one
sample a line, label values escaped (backslash, double quote, newline). Counters'
names end in ``_total``. Not a client library: no registry, no global state.

Threads: ``Counters.add`` takes one lock for a dict update, cheap enough for the
webhook path; ``snapshot`` copies under the same lock.
"""

import bisect
import math
import os
import resource
import threading
import time
from typing import NamedTuple

from . import transfer_states, vocabulary

__all__ = ["Counters", "Family", "exposition", "service_families", "process_families", "CONTENT_TYPE",
           "KNOWN_LABELS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds (seconds) of the latency histograms' buckets: a forged webhook is refused in
# well under a millisecond, a stored one waits for its commit's fsync (milliseconds), and
# anything near a second is a client or a disk in trouble.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The histogram of POST /webhook: from the request whole to its answer decided.
WEBHOOK_SECONDS = "stark_challenge_webhook_duration_seconds"

# Every label set the service's code counts, per counter: each is exposed at 0 until it is
# first counted. A label set counted but not listed here still appears, once counted.
KNOWN_LABELS = {
    "stark_challenge_webhooks_total": (
        (("outcome", "stored"),), (("outcome", "duplicate"),),
        *((("outcome", "refused"), ("reason", reason)) for reason in (
            "auth", "length_required", "no_signature", "not_utf8", "bad_signature", "malformed")),
        (("outcome", "unavailable"), ("reason", "public_key")), (("outcome", "unavailable"), ("reason", "store")),
    ),
    "stark_challenge_signature_verifications_total": ((("verdict", "valid"),), (("verdict", "invalid"),)),
    "stark_challenge_signature_check_cpu_seconds_total": ((("verdict", "valid"),), (("verdict", "invalid"),)),
    "stark_challenge_transfer_api_calls_total": (
        (("result", "created"),), (("result", "rejected"),), (("result", "unavailable"),)),
}


class Counters:
    """Process-local counters keyed by (metric name, labels); thread-safe.

    ``labels`` is a tuple of (name, value) pairs, in the order they are to be written.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._values = {}  # (name, labels) -> int, guarded by _lock
        self._histograms = {}  # name -> [count per bucket of LATENCY_BUCKETS_S and +Inf, sum], guarded by _lock

    def add(self, name, labels=(), amount=1):
        """Add ``amount`` (default 1) to the counter ``name`` with ``labels``."""
        key = (name, labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def observe(self, name, seconds):
        """Count one duration of ``seconds`` in the histogram ``name`` (buckets ``LATENCY_BUCKETS_S``)."""
        index = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        with self._lock:
            counts = self._histograms.setdefault(name, [0] * (len(LATENCY_BUCKETS_S) + 2))
            counts[index] += 1
            counts[-1] += seconds

    def histogram_samples(self, name):
        """Return the samples of the histogram ``name`` for a ``histogram`` Family: cumulative
        ``_bucket`` counts by ``le`` (+Inf last), then ``_sum`` and ``_count``; all 0 if never observed."""
        with self._lock:
            counts = list(self._histograms.get(name, [0] * (len(LATENCY_BUCKETS_S) + 2)))
        samples, total = [], 0
        for bound, count in zip(LATENCY_BUCKETS_S + (math.inf,), counts):
            total += count
            samples.append(("_bucket", (("le", "+Inf" if bound == math.inf else repr(bound)),), total))
        return samples + [("_sum", (), float(counts[-1])), ("_count", (), total)]

    def value(self, name, labels=()):
        """Return the current value of one counter (0 if never added to)."""
        with self._lock:
            return self._values.get((name, labels), 0)

    def samples(self, name):
        """Return [(labels, value)] of every counter called ``name`` (``KNOWN_LABELS`` at 0 too), in a stable order."""
        found = dict.fromkeys(KNOWN_LABELS.get(name, ()), 0)
        with self._lock:
            found.update((labels, value) for (n, labels), value in self._values.items() if n == name)
        return sorted(found.items())


class Family(NamedTuple):
    """One metric family: its name, type (``counter``, ``gauge`` or ``histogram``), help text and samples."""

    name: str
    type: str
    help: str
    # [(labels: tuple of (name, value) pairs, value: int or float)]; a histogram's samples
    # are (suffix, labels, value), the suffix being _bucket, _sum or _count.
    samples: list


def _escape_label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value):
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def exposition(families):
    """Return the families as Prometheus text (version 0.0.4), ending with a newline.

    A family without samples still gets its HELP and TYPE lines. Raise ValueError if a
    counter's name does not end in ``_total``.
    """
    lines = []
    for family in families:
        if family.type == "counter" and not family.name.endswith("_total"):
            raise ValueError(f"counter {family.name} must end in _total")
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            suffix, labels, value = sample if family.type == "histogram" else ("", *sample)
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            name = family.name + suffix
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _credit_samples(queued, outcomes):
    """Return the samples of stark_challenge_credits_total: queued credits, then refused ones by class.

    ``outcomes`` is {outcome code: events} (``vocabulary.OUTCOMES`` gives each code its label and reason).
    """
    counts = {}
    for code, n in outcomes.items():
        label, reason = vocabulary.OUTCOMES.get(code, (None, None))
        if label in ("not_ours", "invalid"):
            key = (("outcome", label), ("reason", reason))
            counts[key] = counts.get(key, 0) + n
    return [((("outcome", "queued"),), queued)] + sorted(counts.items())


def _alarm_samples(alarms):
    """Return the samples of stark_challenge_alarms: standing alarms by kind, every kind listed (0 if none)."""
    counts = {kind: 0 for kind in vocabulary.ALARMS}
    for alarm in alarms:
        counts[alarm["kind"]] = counts.get(alarm["kind"], 0) + 1
    return [((("kind", kind),), n) for kind, n in counts.items()]


def service_families(report, credit_outcomes, counters, public_key_fetches, last_pass_at, version, verifier):
    """Return the service's metric families.

    ``report`` is ``report.build``'s dict (the store's numbers, its standing alarms
    included), ``credit_outcomes`` the store's ``credit_outcomes()`` ({outcome code:
    events}), ``counters`` the process's Counters, ``last_pass_at``
    the worker's last complete pass (aware datetime or None). Every transfer state gets
    a sample, 0 if none.
    """
    rounds, transfers, events = report["rounds"], report["transfers"], report["events"]
    zero = {"count": 0, "amount": 0}
    by_state = [(s, transfers.get(s, zero)) for s in transfer_states.NAMES]
    invoices = report["invoices"].values()
    last_pass = [((), last_pass_at.timestamp())] if last_pass_at is not None else []
    return [
        Family("stark_challenge_build_info", "gauge", "Version and signature verifier of the running service.",
               [((("version", version), ("verifier", verifier)), 1)]),
        Family("stark_challenge_webhooks_total", "counter",
               "POST /webhook answers by outcome: stored, duplicate, refused (by reason), unavailable (503).",
               counters.samples("stark_challenge_webhooks_total")),
        Family(WEBHOOK_SECONDS, "histogram",
               "POST /webhook answers by how long they took, from the request whole to the answer decided "
               "(a handler thread's wait included).", counters.histogram_samples(WEBHOOK_SECONDS)),
        Family("stark_challenge_signature_verifications_total", "counter",
               "Digital-Signature checks by verdict.",
               counters.samples("stark_challenge_signature_verifications_total")),
        Family("stark_challenge_signature_check_cpu_seconds_total", "counter",
               "CPU time spent on Digital-Signature checks, by verdict (the checking thread's own time).",
               counters.samples("stark_challenge_signature_check_cpu_seconds_total")),
        Family("stark_challenge_public_key_fetches_total", "counter", "Fetches of Stark Bank's public key.",
               [((), public_key_fetches)]),
        Family("stark_challenge_events_pending", "gauge", "Stored events not processed yet.",
               [((), events["pending"])]),
        Family("stark_challenge_event_pulls_total", "counter", "Pulls of undelivered events from Stark Bank.",
               [((), counters.value("stark_challenge_event_pulls_total"))]),
        Family("stark_challenge_event_pull_failures_total", "counter", "Pulls of undelivered events that failed.",
               [((), counters.value("stark_challenge_event_pull_failures_total"))]),
        Family("stark_challenge_rounds_issued_total", "counter", "Rounds of invoices issued.",
               [((), rounds["issued"])]),
        Family("stark_challenge_rounds_failed_total", "counter", "Rounds given up after bounded retries.",
               [((), rounds["failed"])]),
        Family("stark_challenge_rounds_due", "gauge", "Rounds due so far in the schedule's window.",
               [((), rounds["due"])]),
        Family("stark_challenge_invoices_issued_total", "counter", "Invoices issued by our rounds.",
               [((), sum(v["count"] for v in invoices))]),
        Family("stark_challenge_invoices_issued_cents_total", "counter", "Amount of the invoices issued, in cents.",
               [((), sum(v["amount"] for v in invoices))]),
        Family("stark_challenge_credits_total", "counter",
               "Credited invoice events by outcome: queued for transfer, not_ours or invalid (by reason class).",
               _credit_samples(report["credits"]["count"], credit_outcomes)),
        Family("stark_challenge_credits_retried", "gauge", "Credits whose transfer needed more than one attempt.",
               [((), report["attempts"]["retried"])]),
        Family("stark_challenge_credits_stuck", "gauge",
               "Credits whose latest transfer attempt is rejected or failed (transfers retry).",
               [((), report["attempts"]["stuck"])]),
        Family("stark_challenge_alarms", "gauge",
               "Standing alarms by kind: each needs a person until resolved (status lists them).",
               _alarm_samples(report.get("alarms", []))),
        Family("stark_challenge_transfers", "gauge", "Transfer attempts in the ledger by state.",
               [((("state", s),), v["count"]) for s, v in by_state]),
        Family("stark_challenge_transfers_cents", "gauge", "Amount of the transfer attempts by state, in cents.",
               [((("state", s),), v["amount"]) for s, v in by_state]),
        Family("stark_challenge_transfer_api_calls_total", "counter",
               "Transfer create calls by result: created, rejected (4xx), unavailable (no answer, 5xx).",
               counters.samples("stark_challenge_transfer_api_calls_total")),
        Family("stark_challenge_worker_last_pass_timestamp_seconds", "gauge",
               "Unix time of the worker's last complete pass.", last_pass),
    ]


def process_families(proc="/proc/self", clock=time.time):
    """Return Prometheus's standard process metrics of this process, as client libraries name them.

    ``process_cpu_seconds_total`` (user and system), ``process_max_fds`` and, where
    ``proc`` (Linux's /proc/self) can be read, ``process_resident_memory_bytes``,
    ``process_virtual_memory_bytes``, ``process_open_fds`` and
    ``process_start_time_seconds`` (Unix time). A number that cannot be read is left out.
    """
    times = os.times()
    families = [Family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
                       [((), times.user + times.system)])]
    try:
        with open(os.path.join(proc, "statm"), encoding="ascii") as f:
            virtual, resident = (int(n) * resource.getpagesize() for n in f.read().split()[:2])
        families.append(Family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
                               [((), virtual)]))
        families.append(Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                               [((), resident)]))
    except (OSError, ValueError):
        pass
    try:
        families.append(Family("process_start_time_seconds", "gauge",
                               "Start time of the process since unix epoch in seconds.",
                               [((), round(_start_time(proc, clock), 2))]))
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME (not Linux)
        pass
    try:
        families.append(Family("process_open_fds", "gauge", "Number of open file descriptors.",
                               [((), len(os.listdir(os.path.join(proc, "fd"))))]))
    except OSError:
        pass
    families.append(Family("process_max_fds", "gauge", "Maximum number of open file descriptors.",
                           [((), resource.getrlimit(resource.RLIMIT_NOFILE)[0])]))
    return families


def _start_time(proc, clock=time.time):
    """Return the Unix time the process started, from its start in clock ticks after boot (/proc/self/stat).

    Boot is taken from CLOCK_BOOTTIME, the clock /proc counts in, rather than /proc/stat's
    btime, which a unit's ProcSubset=pid hides.
    """
    with open(os.path.join(proc, "stat"), encoding="ascii", errors="replace") as f:
        # The command name (field 2) is in parentheses and may hold spaces: count from after it.
        fields = f.read().rsplit(")", 1)[1].split()
    started_after_boot_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line
    return clock() - time.clock_gettime(time.CLOCK_BOOTTIME) + started_after_boot_s
