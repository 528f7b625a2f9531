"""Operations: GET /metrics read as Prometheus would, and ``transfers`` / ``transfers retry`` run
as an operator would, against the service in a subprocess and the emulator. Every figure is
compared with the emulator's own records."""

import base64
import concurrent.futures
import json
import math
import os
import re
import urllib.request

import starkbank

from stark_challenge import __version__
from stark_challenge.metrics import Counters, Family, exposition

from support import free_port, query, run_cli, service_settled, wait_for

AUTH = {"WEBHOOK_USERNAME": "ops", "WEBHOOK_PASSWORD": "s3cret-pass"}
FEE = 37

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_VALUE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|Inf|NaN)")


def parse_exposition(text):
    """Parse Prometheus text format 0.0.4 strictly; return {(name, frozenset(labels)): float}.

    Fails on: a sample before its family's TYPE, a TYPE repeated or after samples, an unknown
    type, a counter not ending in _total, a malformed label set or value, a repeated sample,
    a missing final newline, a histogram without its +Inf bucket, _sum and _count, or whose
    buckets are not cumulative or end elsewhere than at _count. A histogram's samples keep
    their suffixed names (``x_bucket``, ``x_sum``, ``x_count``)."""
    assert text.endswith("\n")
    types, samples, helped = {}, {}, set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert _NAME.fullmatch(name) and name not in helped, line
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and kind in ("counter", "gauge", "histogram"), line
            assert not any(n == name for n, _ in samples), "TYPE after samples: " + line
            types[name] = kind
            continue
        assert not line.startswith("#") and line, repr(line)
        match = _NAME.match(line)
        name, rest = match.group(0), line[match.end():]
        labels = []
        if rest.startswith("{"):
            body, rest = rest[1:].split("} ", 1) if "} " in rest else (None, None)
            assert body is not None, line
            pos = 0
            while pos < len(body):
                label = _LABEL.match(body, pos)
                assert label, line
                labels.append((label.group(1), re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1),
                                                      label.group(2))))
                pos = label.end()
        else:
            assert rest.startswith(" "), line
            rest = rest[1:]
        assert _VALUE.fullmatch(rest), line
        family = next((name[:-len(s)] for s in ("_bucket", "_sum", "_count")
                       if name.endswith(s) and types.get(name[:-len(s)]) == "histogram"), name)
        assert family in types, "sample before its TYPE: " + line
        assert types[family] != "counter" or name.endswith("_total"), line
        assert types[family] != "histogram" or name != family, "a histogram sample needs its suffix: " + line
        key = (name, frozenset(labels))
        assert key not in samples, "repeated: " + line
        samples[key] = float(rest)
    for family in (n for n, kind in types.items() if kind == "histogram"):
        buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items()
                         if n == family + "_bucket")
        assert buckets and buckets[-1][0] == math.inf, family + ": no +Inf bucket"
        assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), family + ": buckets not cumulative"
        assert samples[(family + "_count", frozenset())] == buckets[-1][1] and (family + "_sum", frozenset()) in samples
    return samples


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def get_metrics(service, auth="operator"):
    """GET /metrics with the operator's credentials, the webhook's (``auth="webhook"``), or none (None)."""
    credentials = {"operator": f"{service.env['OPERATOR_USERNAME']}:{service.env['OPERATOR_PASSWORD']}",
                   "webhook": f"{service.env['WEBHOOK_USERNAME']}:{service.env['WEBHOOK_PASSWORD']}"}.get(auth)
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}
    request = urllib.request.Request(service.url + "/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def cli(service, *args, **env):
    """Run a command with the service's configuration (database, credentials, port, auth)."""
    return run_cli(*args, cwd=service.cwd, env={**service.env, **env})


def by_invoice(emulator, invoice_id):
    return [t for t in emulator.transfers() if f"invoice-{invoice_id}" in t["tags"]]


# -- the exposition format -------------------------------------------------------------


def test_exposition_escapes_labels_and_help_and_refuses_a_counter_without_total():
    counters = Counters()
    counters.add("x_total", (("reason", 'a "quoted"\\back\nslash'),), 2)
    text = exposition([Family("x_total", "counter", "help with \\ and\nnewline", counters.samples("x_total")),
                       Family("g", "gauge", "a float", [((), 1.5), ((("k", "v"),), float("inf")),
                                                        ((("k", "w"),), True), ((("k", "x"),), float("nan"))])])
    assert text.splitlines()[0] == "# HELP x_total help with \\\\ and\\nnewline"
    samples = parse_exposition(text)
    assert math.isnan(samples.pop(("g", frozenset({("k", "x")}))))
    assert samples == {("x_total", frozenset({("reason", 'a "quoted"\\back\nslash')})): 2.0,
                       ("g", frozenset()): 1.5, ("g", frozenset({("k", "v")})): float("inf"),
                       ("g", frozenset({("k", "w")})): 1.0}
    try:
        exposition([Family("x", "counter", "no suffix", [])])
    except ValueError as e:
        assert "_total" in str(e)
    else:
        raise AssertionError("a counter without _total was written")


# -- /metrics after a real run ----------------------------------------------------------


def test_metrics_need_auth_and_equal_the_emulators_records(emulator, service_factory):
    emulator.set(pay_ratio=1.0, invoice_fee=FEE)
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3, **AUTH)
    service.start()
    wait_for(lambda: len([t for t in emulator.transfers() if t["status"] == "success"]) == 3, message="3 transfers")
    wait_for(lambda: service_settled(service, emulator), message="settled")
    # Refused webhooks: one without basic auth, one with a forged signature.
    assert service.request("POST", "/webhook", b"{}", {"Content-Type": "application/json"})[0] == 401
    forged = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-pass").decode(),
              "Digital-Signature": base64.b64encode(b"0" * 70).decode()}
    assert service.request("POST", "/webhook", b'{"event": {}}', forged)[0] == 401

    status, content_type, body = get_metrics(service, auth=None)
    assert status == 401 and "stark_challenge" not in body
    status, content_type, body = get_metrics(service, auth="webhook")  # the password in the webhook's URL
    assert status == 401 and "stark_challenge" not in body
    status, content_type, body = get_metrics(service)
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse_exposition(body)
    assert all(name.startswith(("stark_challenge_", "process_")) for name, _ in samples)

    invoices, transfers = emulator.invoices(), emulator.transfers()
    delivered = [d for d in emulator.deliveries() if d["status"] == 200]
    [(build, value)] = [(dict(labels), v) for (name, labels), v in samples.items()
                        if name == "stark_challenge_build_info"]
    assert value == 1 and build["version"] == __version__ and build["verifier"]
    assert metric(samples, "stark_challenge_rounds_issued_total") == 1
    assert metric(samples, "stark_challenge_rounds_due") == 1
    assert metric(samples, "stark_challenge_invoices_issued_total") == len(invoices) == 3
    assert metric(samples, "stark_challenge_invoices_issued_cents_total") == sum(i["amount"] for i in invoices)
    assert metric(samples, "stark_challenge_credits_total", outcome="queued") == 3
    assert metric(samples, "stark_challenge_transfers", state="success") == len(transfers) == 3
    assert metric(samples, "stark_challenge_transfers_cents", state="success") == sum(t["amount"] for t in transfers)
    assert sum(t["amount"] for t in transfers) == sum(i["amount"] - FEE for i in invoices)
    assert metric(samples, "stark_challenge_transfers", state="failed") == 0
    # One create call per batch: as many as the emulator answered 200 (one to three).
    posts = [c["status"] for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]
    assert metric(samples, "stark_challenge_transfer_api_calls_total", result="created") == posts.count(200) >= 1
    # An event the start-up pull stored first is a duplicate when its webhook arrives.
    stored, duplicate = (metric(samples, "stark_challenge_webhooks_total", outcome=o) for o in ("stored", "duplicate"))
    assert stored + duplicate == len(delivered)
    assert [(stored,)] == query(service, "select count(*) from event where source = 'webhook'")
    assert metric(samples, "stark_challenge_webhooks_total", outcome="refused", reason="auth") == 1
    assert metric(samples, "stark_challenge_webhooks_total", outcome="refused", reason="bad_signature") == 1
    assert metric(samples, "stark_challenge_signature_verifications_total", verdict="valid") == len(delivered)
    assert metric(samples, "stark_challenge_signature_verifications_total", verdict="invalid") == 1
    for verdict in ("valid", "invalid"):  # the CPU the checks took: some for each verdict
        assert metric(samples, "stark_challenge_signature_check_cpu_seconds_total", verdict=verdict) > 0
    assert metric(samples, "stark_challenge_public_key_fetches_total") == emulator.public_key_fetches
    assert metric(samples, "stark_challenge_event_pulls_total") >= 1
    assert metric(samples, "stark_challenge_events_pending") == 0
    assert metric(samples, "stark_challenge_credits_stuck") == 0
    assert metric(samples, "stark_challenge_worker_last_pass_timestamp_seconds") > 1.7e9


# -- transfers and transfers retry ----------------------------------------------------


def test_a_rejected_transfer_retried_moves_the_money_once(emulator, service_factory, sdk):
    # Stark Bank refuses each credit's transfer (400), one credit at a time.
    emulator.set(pay_ratio=0.0, invoice_fee=FEE)
    service = service_factory(INVOICE_MIN=2, INVOICE_MAX=2, **AUTH)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 2, message="round 0")
    a, b = sorted(i["id"] for i in emulator.invoices())
    for n, invoice_id in enumerate((a, b), 1):
        emulator.fail_next("POST", "/v2/transfer", status=400)
        emulator.pay(invoice_id)
        wait_for(lambda: query(service, "select count(*) from transfer where state = 'rejected'") == [(n,)],
                 message=f"transfer {n} rejected")
    assert emulator.transfers() == []
    listed = cli(service, "transfers", "--state", "rejected", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["invoice_id"]: r for r in json.loads(listed.stdout)}
    assert sorted((r["invoice_id"], r["attempt"], r["state"]) for r in rows.values()) == [
        (a, 1, "rejected"), (b, 1, "rejected")]
    assert all(r["errors"][0][0] == "injectedFault" for r in rows.values())
    samples = parse_exposition(get_metrics(service)[2])
    assert metric(samples, "stark_challenge_credits_stuck") == 2
    # Each transfer refused on its own call.
    posts = [c["status"] for c in emulator.requests if c["method"] == "POST" and c["path"] == "/v2/transfer"]
    assert metric(samples, "stark_challenge_transfer_api_calls_total", result="rejected") == posts.count(400) >= 2

    # While the service is stopped, B turns out paid by hand at Stark Bank
    # under our own external id: the command (holding the store itself) records it and sends nothing.
    assert service.stop() == 0
    manual = starkbank.transfer.create([starkbank.Transfer(
        amount=rows[b]["amount"], name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183",
        branch_code="0001", account_number="6341320293482496", account_type="payment",
        external_id=f"stark-challenge-inv-{b}", tags=["stark-challenge", f"invoice-{b}"])])[0]
    done = cli(service, "transfers", "retry", b)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(f"invoice {b}: Stark Bank already has transfer {manual.id} \\(stark-challenge-inv-{b}, "
                        f"(created|processing|success)\\); recorded, nothing sent\n", done.stdout), done.stdout
    [(attempt, state, transfer_id)] = query(service, "select attempt, state, transfer_id from transfer"
                                                     " where invoice_id = ?", (b,))
    assert (attempt, transfer_id) == (1, manual.id) and state in ("created", "processing", "success")

    service.start()
    # Two operators retry A at once: one attempt is queued, and one transfer moves the money.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: cli(service, "transfers", "retry", a), range(2)))
    assert sorted(r.returncode for r in runs) in ([0, 0], [0, 2]), [(r.stdout, r.stderr) for r in runs]
    assert sum(r.stdout.startswith(f"invoice {a}: attempt 2 queued as stark-challenge-inv-{a}-2") for r in runs) == 1
    wait_for(lambda: query(service, "select state from transfer where invoice_id = ? and attempt = 2", (a,))
             == [("success",)], message="attempt 2 of A succeeded")
    wait_for(lambda: service_settled(service, emulator), message="settled")
    sent = by_invoice(emulator, a)
    assert [(t["externalId"], t["amount"], t["branchCode"], t["status"]) for t in sent] == [
        (f"stark-challenge-inv-{a}-2", rows[a]["amount"], "0001", "success")]
    assert len(by_invoice(emulator, b)) == 1  # only the one made by hand
    assert query(service, "select attempt, state from transfer where invoice_id = ? order by attempt", (a,)) == [
        (1, "rejected"), (2, "success")]

    # A retry of a transfer in any other state is refused with the reason; an unknown invoice too.
    again = cli(service, "transfers", "retry", a)
    assert again.returncode == 2 and again.stdout == ""
    assert f"latest attempt 2 (stark-challenge-inv-{a}-2) is success" in again.stderr
    unknown = cli(service, "transfers", "retry", "123456789")
    assert unknown.returncode == 2 and "no transfer in the ledger" in unknown.stderr
    # The service holds the store: the command must reach it, with the same credentials.
    wrong = cli(service, "transfers", "retry", a, OPERATOR_PASSWORD="wrong")
    assert wrong.returncode == 1 and "the service answered 401" in wrong.stderr
    webhooks = cli(service, "transfers", "retry", a, OPERATOR_USERNAME=AUTH["WEBHOOK_USERNAME"],
                   OPERATOR_PASSWORD=AUTH["WEBHOOK_PASSWORD"])  # the webhook's pair: refused before asking
    assert webhooks.returncode == 2 and webhooks.stderr == (
        "stark_challenge: OPERATOR_PASSWORD: must differ from WEBHOOK_PASSWORD\n")
    no_auth = cli(service, "transfers", "retry", a, OPERATOR_USERNAME="", OPERATOR_PASSWORD="")
    assert no_auth.returncode == 2 and "set OPERATOR_USERNAME and OPERATOR_PASSWORD" in no_auth.stderr
    elsewhere = cli(service, "transfers", "retry", a, PORT=str(free_port()))
    assert elsewhere.returncode == 1 and "does not answer" in elsewhere.stderr
    assert len(by_invoice(emulator, a)) == 1

    report = json.loads(cli(service, "status", "--json").stdout)
    assert report["attempts"] == {"retried": 1, "stuck": 0}
    table = cli(service, "status").stdout
    # (A's alarm for its rejected first attempt stands until the next reconciliation: the table's
    # columns may be wider than without it.)
    assert "attempts 1 credits needed more than one, 0 stuck (see: transfers retry)" in [
        " ".join(line.split()) for line in table.splitlines()]
    listed = cli(service, "transfers")
    assert listed.returncode == 0
    assert sorted(line.removeprefix("ALARM ").split()[:5:2] for line in listed.stdout.splitlines()) == sorted([
        ["rejected", a, "1"], ["success", a, "2"], ["success", b, "1"]])


def test_transfers_on_a_fresh_or_missing_database(tmp_path):
    from stark_challenge.store import Store

    Store(str(tmp_path / "fresh.sqlite3")).close()
    env = {"DATABASE_PATH": str(tmp_path / "fresh.sqlite3")}
    files = sorted(os.listdir(tmp_path))
    listed = run_cli("transfers", "--state", "failed", cwd=tmp_path, env=env)
    assert (listed.returncode, listed.stdout) == (0, "no transfers in state failed\n")
    assert run_cli("transfers", "--json", cwd=tmp_path, env=env).stdout == "[]\n"
    assert sorted(os.listdir(tmp_path)) == files  # read-only: no file created
    # The service is stopped: the command would do the retry itself, and needs the credentials for that.
    done = run_cli("transfers", "retry", "1", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "STARK_PROJECT_ID" in done.stderr, done.stderr
    missing = {"DATABASE_PATH": str(tmp_path / "missing.sqlite3")}
    for args in (("transfers",), ("transfers", "retry", "1")):
        done = run_cli(*args, cwd=tmp_path, env=missing)
        assert done.returncode == 1 and "no such database" in done.stderr, done.stderr
    assert not (tmp_path / "missing.sqlite3").exists()
    for args in (("transfers", "--help"), ("transfers", "retry", "--help")):
        done = run_cli(*args, cwd=tmp_path)
        usage = "usage: python -m stark_challenge " + " ".join(args[:-1])
        assert done.returncode == 0 and done.stdout.startswith(usage)


def test_credit_outcomes_are_counted_by_reason_class(store):
    from stark_challenge import report
    from stark_challenge.metrics import service_families
    from support import FakeClock

    outcomes = {  # by outcome code, as the store groups them
        "credit_queued": 4, "credit_known": 2, "not_ours_unknown_invoice": 3, "not_ours_missing_tag": 1,
        "not_ours_not_paid": 1, "invalid_missing_fee": 1, "invalid_fee": 2, "invalid_amount": 1,
        "invalid_malformed": 1,
    }
    families = service_families(report.build(store.summary(), FakeClock()()), outcomes, Counters(), 0, None,
                                "1.0", "pure")
    samples = parse_exposition(exposition(families))
    credits = {tuple(sorted(labels)): value for (name, labels), value in samples.items()
               if name == "stark_challenge_credits_total"}
    assert credits == {
        (("outcome", "queued"),): 0,  # from the store's credit rows, none here
        (("outcome", "not_ours"), ("reason", "unknown_invoice")): 3,
        (("outcome", "not_ours"), ("reason", "missing_tag")): 1,
        (("outcome", "not_ours"), ("reason", "not_paid")): 1,
        (("outcome", "invalid"), ("reason", "missing_fee")): 1,
        (("outcome", "invalid"), ("reason", "fee_out_of_range")): 2,
        (("outcome", "invalid"), ("reason", "amount_not_positive")): 1,
        (("outcome", "invalid"), ("reason", "malformed")): 1,
    }
    # No pass yet: the timestamp gauge has no sample (absent() alerts on it), every state has one.
    assert not any(name == "stark_challenge_worker_last_pass_timestamp_seconds" for name, _ in samples)
    assert sum(1 for name, _ in samples if name == "stark_challenge_transfers") == 8


def test_standing_alarms_are_in_the_status_table_its_line_and_the_metrics(store):
    from stark_challenge import report
    from stark_challenge.metrics import service_families
    from support import FakeClock

    now = FakeClock()()
    store.sync_alarms("transfer_open", {"x-1": "invoice 1, 9950 cents, pending"}, now)
    store.sync_alarms("credit_refused", {"6001": "invalid: fee 900 is not in 0..amount 100"}, now)
    built = report.build(store.summary(), now)
    lines = [" ".join(line.split()) for line in report.render(built).splitlines()]
    assert "ALARMS 2 standing: a person must look" in lines
    assert ("transfer_open x-1: invoice 1, 9950 cents, pending (since 2026-11-28T12:00:00.000000+00:00)"
            in lines)
    assert report.one_line(built).endswith("; 2 ALARMS")
    samples = parse_exposition(exposition(service_families(built, {}, Counters(), 0, None, "1.0", "pure")))
    alarms = {dict(labels)["kind"]: value for (name, labels), value in samples.items()
              if name == "stark_challenge_alarms"}
    assert alarms == {"transfer_open": 1, "credit_refused": 1, "invoice_not_found": 0, "credit_unpaid": 0,
                      "attempts_moving": 0, "credit_failed": 0, "credit_reversed": 0}
    store.sync_alarms("transfer_open", {}, now)  # resolved
    assert [a["kind"] for a in store.alarms()] == ["credit_refused"]
