"""/metrics from the first scrape: every known series at 0, and the process's own numbers
(Prometheus's standard process_* names) equal to what /proc says of the service process."""

import os
import time

from stark_challenge.metrics import KNOWN_LABELS, Counters, process_families

from test_operations import AUTH, get_metrics, parse_exposition


def test_a_fresh_service_shows_every_known_series_at_zero(service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, **AUTH)
    service.start()
    status, _, body = get_metrics(service)
    assert status == 200
    samples = parse_exposition(body)
    for name, label_sets in KNOWN_LABELS.items():
        for labels in label_sets:
            assert samples[(name, frozenset(labels))] == 0, (name, labels)


def test_a_counted_label_set_replaces_its_zero():
    counters = Counters()
    counters.add("stark_challenge_webhooks_total", (("outcome", "refused"), ("reason", "bad_signature")), 2)
    counters.add("stark_challenge_webhooks_total", (("outcome", "refused"), ("reason", "new_reason")))
    samples = dict(counters.samples("stark_challenge_webhooks_total"))
    assert samples[(("outcome", "refused"), ("reason", "bad_signature"))] == 2
    assert samples[(("outcome", "refused"), ("reason", "new_reason"))] == 1
    assert samples[(("outcome", "stored"),)] == 0
    assert len(samples) == len(KNOWN_LABELS["stark_challenge_webhooks_total"]) + 1


def _vm_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_process_metrics_describe_the_service_process(service_factory):
    service = service_factory(webhook=False, INVOICE_MIN=1, INVOICE_MAX=1, **AUTH)
    spawned_at = time.time()
    service.start()
    pid = service.proc.pid
    samples = parse_exposition(get_metrics(service)[2])
    value = {name: v for (name, labels), v in samples.items() if name.startswith("process_")}
    assert value["process_cpu_seconds_total"] > 0
    assert spawned_at - 1 <= value["process_start_time_seconds"] <= time.time()
    rss = _vm_rss_bytes(pid)
    assert 0.5 * rss <= value["process_resident_memory_bytes"] <= 2 * rss
    assert value["process_virtual_memory_bytes"] >= value["process_resident_memory_bytes"]
    # Descriptors come and go with connections: the scrape's own is among them.
    assert 3 <= value["process_open_fds"] <= len(os.listdir(f"/proc/{pid}/fd")) + 4
    assert value["process_max_fds"] >= value["process_open_fds"]


def test_process_metrics_leave_out_what_proc_cannot_tell(tmp_path):
    names = [f.name for f in process_families(proc=str(tmp_path / "no-proc"))]
    assert names == ["process_cpu_seconds_total", "process_max_fds"]
