"""Logs: the two formats, redaction, and what a real run writes (and never writes).

The real-run test reads the whole log of a service that issued a round, was paid,
forwarded every credit, refused bad requests and restarted, and looks for every
secret and every payer's tax id in it.
"""

import base64
import io
import json
import logging
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from stark_challenge import config as config_module, logs

from support import make_config, messages_matching, signed_event, wait_for

PASSWORD = "hunter2-Pa55word-xyz"
WRONG_PASSWORD = "wrong-Pa55word-abc"


def _reais(cents):
    return f"R$ {cents // 100:,}.{cents % 100:02d}"


def _basic(username, password):
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _record(message, *args, exc_info=None, name="stark_challenge.transfers"):
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, args, exc_info)


# -- redact and the formatters -----------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("-----BEGIN EC PRIVATE KEY-----\nMHQCAQEEIB\n-----END EC PRIVATE KEY----- loaded",
     "[private key redacted] loaded"),
    ("key: -----BEGIN PRIVATE KEY-----\nMHQCAQEEIB (truncated", "key: [private key redacted]"),
    ("Authorization: Basic b3BzOnB3", "Authorization: Basic [redacted]"),
    ("{'Authorization': 'Basic b3BzOnB3', 'Host': 'x'}", "{'Authorization': 'Basic [redacted]', 'Host': 'x'}"),
    ("authorization=Bearer abc.def-ghi", "authorization=Bearer [redacted]"),
    ("POST http://ops:s3cret@127.0.0.1:8000/webhook", "POST http://ops:[redacted]@127.0.0.1:8000/webhook"),
    ("https://:s3cret@host/x", "https://:[redacted]@host/x"),
    ("payer 123.456.789-09 paid", "payer ***.456.789-** paid"),
    ("payer 12345678909 paid", "payer ***456789** paid"),
    ("payer 12.345.678/0001-95 paid", "payer **.345.678/****-** paid"),
    ("payer 12345678000195 paid", "payer **345678****** paid"),
])
def test_redact_hides_keys_credentials_and_tax_ids(text, expected):
    assert logs.redact(text) == expected


@pytest.mark.parametrize("text", [
    "invoice 5656565656565656 credited: amount 24973, fee 50",  # 16-digit ids are not tax ids
    "authorization header missing",
    "round 0 issued: 8 invoices, total R$ 2,030.62",
    "at 2026-11-28T14:25:51.527+00:00 from 127.0.0.1:54085",
    "http://127.0.0.1:8000/webhook",
])
def test_redact_leaves_ordinary_lines_alone(text):
    assert logs.redact(text) == text


def test_text_formatter_writes_one_readable_line_in_utc():
    record = _record("transfer sent: invoice %s, amount %d", "123", 4500)
    record.created = 1795860000.0  # 2026-11-28 10:00:00 UTC
    line = logs.TextFormatter().format(record)
    assert line == "2026-11-28 10:00:00 INFO    transfer sent: invoice 123, amount 4500"
    record.levelno, record.levelname = logging.WARNING, "WARNING"  # a warning says where it comes from
    assert logs.TextFormatter().format(record) == (
        "2026-11-28 10:00:00 WARNING transfers: transfer sent: invoice 123, amount 4500")


def test_text_formatter_redacts_the_traceback_too():
    try:
        raise ValueError("Authorization: Basic b3BzOnB3 for payer 123.456.789-09")
    except ValueError:
        record = _record("call failed", exc_info=sys.exc_info())
    text = logs.TextFormatter().format(record)
    assert "Traceback" in text and "b3BzOnB3" not in text and "123.456.789-09" not in text
    assert "***.456.789-**" in text


def test_json_formatter_writes_one_object_per_line():
    try:
        raise RuntimeError("key -----BEGIN EC PRIVATE KEY-----\nMHQ\n-----END EC PRIVATE KEY-----")
    except RuntimeError:
        record = _record("two\nlines for %s", "http://ops:pw@host/", exc_info=sys.exc_info())
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "exception"}
    assert (entry["level"], entry["logger"]) == ("INFO", "stark_challenge.transfers")
    assert entry["message"] == "two\nlines for http://ops:[redacted]@host/"
    assert entry["time"].endswith("+00:00")
    assert "MHQ" not in entry["exception"] and "[private key redacted]" in entry["exception"]


def test_setup_installs_one_handler_of_the_chosen_format():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        stream = io.StringIO()
        logs.setup("INFO", "text", stream)
        handler = logs.setup("WARNING", "json", stream)  # a second call replaces the first
        assert root.handlers == [handler] and root.level == logging.WARNING
        logging.getLogger("stark_challenge.test").warning("payer %s", "123.456.789-09")
        logging.getLogger("stark_challenge.test").info("not shown")
        [line] = stream.getvalue().splitlines()
        assert json.loads(line)["message"] == "payer ***.456.789-**"
    finally:
        root.handlers[:], root.level = saved


def test_log_format_defaults_to_text_on_a_terminal_and_json_otherwise():
    env = {"STARK_PROJECT_ID": "1", "STARK_PRIVATE_KEY": "-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----"}
    assert config_module.load(env, dotenv_path=None, isatty=True).log_format == "text"
    assert config_module.load(env, dotenv_path=None, isatty=False).log_format == "json"
    assert config_module.load({**env, "LOG_FORMAT": "json"}, dotenv_path=None, isatty=True).log_format == "json"
    assert make_config(LOG_FORMAT="TEXT").log_format == "text"


# -- the service's own log -------------------------------------------------------


def test_service_on_a_terminal_logs_text(service_factory):
    service = service_factory()
    env = {k: v for k, v in service.env.items() if k != "LOG_FORMAT"}
    master, slave = pty.openpty()
    try:
        service.spawn(env, stdout=subprocess.DEVNULL, stderr=slave)  # the fixture stops it whatever happens
        os.close(slave)
        slave = None
        output = b""
        deadline = time.monotonic() + 15
        while b"recovery:" not in output:
            left = deadline - time.monotonic()
            assert left > 0, f"no start-up lines on the terminal: {output!r}"
            if select.select([master], [], [], left)[0]:
                output += os.read(master, 65536)
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(15) == 0
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    lines = output.decode().splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines)
    assert any(" INFO    listening on 127.0.0.1:" in line
               for line in lines)


def test_a_real_run_logs_what_matters_and_no_secret_or_tax_id(emulator, service_factory):
    emulator.set(pay_ratio=1.0)
    emulator.fail_next("POST", "/v2/transfer", count=1, status=500)  # one retry to log
    service = service_factory(WEBHOOK_USERNAME="ops", WEBHOOK_PASSWORD=PASSWORD,
                              INVOICE_MIN=8, INVOICE_MAX=8, LOG_LEVEL="DEBUG")
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 8, message="round 0")

    assert service.request("POST", "/webhook", b"{}", {"Authorization": _basic("ops", WRONG_PASSWORD)})[0] == 401
    authorized = {"Authorization": _basic("ops", PASSWORD)}
    assert service.request("POST", "/webhook", b"{}", authorized)[0] == 401  # no signature
    body, headers = signed_event(emulator, "9000000000000001", dict(emulator.invoices()[0], status="paid"))
    forged = body.replace(b"9000000000000001", b"9000000000000002")
    assert service.request("POST", "/webhook", forged, {**headers, **authorized})[0] == 401
    assert service.request("GET", "/status", None, {"Authorization": _basic("ops", WRONG_PASSWORD)})[0] == 401

    wait_for(lambda: len(emulator.transfers()) == 8 and all(t["status"] == "success" for t in emulator.transfers()),
             message="8 transfers succeeded")
    wait_for(lambda: len(messages_matching(service, r"^transfer \S+ succeeded")) == 8, message="8 successes logged")
    assert service.stop() == 0
    service.start()
    assert service.stop() == 0

    text = service.logs()
    lines = text.splitlines()
    # One JSON object per line, every line (stdout and stderr both go to the log file).
    for line in lines:
        assert set(json.loads(line)) >= {"time", "level", "logger", "message"}, line

    # No secret, anywhere.
    key_lines = [line for line in service.env["STARK_PRIVATE_KEY"].splitlines() if "-----" not in line]
    assert key_lines and "PRIVATE KEY" not in text
    for secret in [*key_lines, PASSWORD, WRONG_PASSWORD, _basic("ops", PASSWORD).split()[1],
                   _basic("ops", WRONG_PASSWORD).split()[1]]:
        assert secret not in text
    # No full tax id of any payer, formatted or bare.
    invoices = emulator.invoices()
    for invoice in invoices:
        tax_id = invoice["taxId"]
        assert tax_id not in text
        assert "".join(c for c in tax_id if c.isdigit()) not in text

    # The lines a person cares about.
    total = sum(i["amount"] for i in invoices)
    assert messages_matching(service, rf"^round 0 issued: 8 invoices, total {_reais(total).replace('$', '[$]')}$")
    assert len(messages_matching(service, r"^webhook accepted: event \d+, invoice credited \d+$")) == 8
    assert messages_matching(service, r"^webhook refused: bad or missing basic auth from 127\.0\.0\.1$")
    assert messages_matching(service, r"^webhook refused: no Digital-Signature header$")
    assert messages_matching(service, r"^webhook refused: Digital-Signature does not match")
    assert messages_matching(service, r"^status refused: bad or missing basic auth")
    assert messages_matching(service, r"^transfer stark-challenge-inv-\d+: try 1 got no definite answer, sending it "
                                      r"again under the same external id in [\d.]+ s: .*500")
    by_id = {i["id"]: i for i in invoices}
    for transfer in emulator.transfers():
        invoice = by_id[transfer["tags"][1].removeprefix("invoice-")]
        sent = (f"invoice {invoice['id']}: {_reais(invoice['amount'])} - {_reais(invoice['fee'])} fee = "
                f"{_reais(transfer['amount'])}, transfer {transfer['id']}")
        assert service.log_messages().count(sent) == 1
    # Recovery at each start-up: nothing half-done the first time; the schedule resumed the second.
    recovery = messages_matching(service, r"^recovery: ")
    assert recovery[0] == "recovery: no events or transfers left half-done"
    assert any(m.startswith("recovery: resuming the schedule started ") and "(1 of its rounds already settled)" in m
               for m in recovery)
    assert messages_matching(service, r"^stopped; ")
