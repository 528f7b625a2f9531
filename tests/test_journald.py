"""journald: under systemd every line carries its priority, and the journal format sends
ids and amounts as fields in journald's native protocol.

The service is started as the unit starts it: stderr is a file whose device and inode
JOURNAL_STREAM names. The native protocol is read from a real datagram socket bound
where the handler sends.
"""

import json
import logging
import os
import re
import socket
import struct

import pytest

from stark_challenge import logs

from support import messages_matching, query, run_cli, wait_for

_PREFIXED = re.compile(r"<[0-7]>")


def _journal_stream(path):
    """Return the JOURNAL_STREAM value systemd would set for stderr connected to ``path``."""
    found = os.stat(path)
    return f"{found.st_dev}:{found.st_ino}"


def test_under_journald_only_when_journal_stream_names_stderr(tmp_path):
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w"):
        assert logs.under_journald(stream, {"JOURNAL_STREAM": _journal_stream(tmp_path / "stderr")})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": _journal_stream(tmp_path / "other")})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": "garbage"})
        assert not logs.under_journald(stream, {})


def test_priorities_prefix_a_redirected_service_but_never_a_terminal(tmp_path):
    leader, follower = os.openpty()
    with open(tmp_path / "stderr", "w") as stream, os.fdopen(follower, "w") as terminal:
        assert logs.priority_prefixes(stream, {"JOURNAL_STREAM": _journal_stream(tmp_path / "stderr")})
        assert logs.priority_prefixes(stream, {"JOURNAL_STREAM": "8:1234"})  # systemd's, stderr redirected
        assert not logs.priority_prefixes(stream, {})
        assert not logs.priority_prefixes(terminal, {"JOURNAL_STREAM": "8:1234"})
    os.close(leader)


def test_a_configuration_error_under_systemd_is_one_line_at_error_priority(tmp_path):
    done = run_cli("check", "--offline", cwd=tmp_path, env={"JOURNAL_STREAM": "8:1234"})
    assert done.returncode == 2
    assert done.stderr.startswith("<3>stark_challenge: STARK_PROJECT_ID: not set.") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("level, prefix", [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"),
                                           (logging.WARNING, "<4>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>")])
def test_each_level_has_its_syslog_priority(level, prefix):
    assert f"<{logs.priority(level)}>" == prefix


def test_a_service_started_as_the_unit_starts_it_prefixes_every_line_with_its_priority(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1, LOG_FORMAT="text")
    open(service.log_path, "w").close()
    service.env["JOURNAL_STREAM"] = _journal_stream(service.log_path)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 1, message="round 0")
    wait_for(lambda: service.request("GET", "/health")[1] == {"status": "ok"}, message="first pass")
    emulator.fail_next("POST", "/v2/transfer", status=400)
    emulator.pay(emulator.invoices()[0]["id"])
    wait_for(lambda: query(service, "select state from transfer") == [("rejected",)], message="rejected")
    wait_for(lambda: "TRANSFER REJECTED" in service.logs(), message="the rejection logged")
    assert service.stop() == 0
    lines = service.logs().splitlines()
    assert lines and all(_PREFIXED.match(line) for line in lines), lines
    (rejected,) = [line for line in lines if "TRANSFER REJECTED" in line]
    assert rejected.startswith("<3>transfers: TRANSFER REJECTED: "), rejected
    assert [line for line in lines if "listening on" in line][0].startswith("<6>")
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)  # journald dates them


def test_json_lines_under_journald_are_prefixed_and_keep_the_fields_as_keys(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        handler = logs.setup("INFO", "json", stream=stream,
                             journald=logs.under_journald(stream, {"JOURNAL_STREAM": _journal_stream(path)}))
        logging.getLogger("stark_challenge.worker").error(
            "credit %s refused", "5001", extra=logs.fields(invoice_id="5001", amount_cents=12345))
        handler.flush()
    line = path.read_text().splitlines()[0]
    assert line.startswith("<3>{")
    entry = json.loads(line[3:])
    assert (entry["message"], entry["invoice_id"], entry["amount_cents"]) == ("credit 5001 refused", "5001", 12345)
    assert entry["level"] == "ERROR"


def test_fields_are_lowercase_words():
    with pytest.raises(ValueError):
        logs.fields(InvoiceId="1")


def _read_entry(datagram):
    """Parse one datagram of journald's native protocol into a dict."""
    fields, rest = {}, datagram
    while rest:
        head, sep, tail = rest.partition(b"\n")
        if b"=" in head:
            name, _, value = head.partition(b"=")
            fields[name.decode()] = value.decode()
            rest = tail
        else:
            (size,) = struct.unpack("<Q", tail[:8])
            fields[head.decode()] = tail[8:8 + size].decode()
            assert tail[8 + size:9 + size] == b"\n"
            rest = tail[9 + size:]
    return fields


@pytest.fixture
def journal(tmp_path):
    """A datagram socket bound where the journal handler sends: journald's side."""
    path = str(tmp_path / "journal.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        yield path, receiver


def test_the_journal_format_sends_priority_identifier_and_fields_natively(journal, tmp_path):
    path, receiver = journal
    with open(tmp_path / "stderr", "w") as stream:
        handler = logs.setup("DEBUG", "journal", stream=stream, journal_socket=path)
        try:
            logger = logging.getLogger("stark_challenge.transfers")
            logger.error("TRANSFER REJECTED: %s", "x-1",
                         extra=logs.fields(invoice_id="5001", transfer_id="6002", external_id="x-1",
                                           amount_cents=9800))
            try:
                raise RuntimeError("boom\nsecond line")
            except RuntimeError:
                logger.warning("payer 123.456.789-09 failed", exc_info=True)
        finally:
            handler.close()
    error = _read_entry(receiver.recv(65536))
    assert error == {"MESSAGE": "TRANSFER REJECTED: x-1", "PRIORITY": "3", "SYSLOG_IDENTIFIER": "stark-challenge",
                     "LOGGER": "stark_challenge.transfers", "INVOICE_ID": "5001", "TRANSFER_ID": "6002",
                     "EXTERNAL_ID": "x-1", "AMOUNT_CENTS": "9800"}
    warning = _read_entry(receiver.recv(65536))
    assert warning["PRIORITY"] == "4"
    assert warning["MESSAGE"].startswith("payer ***.456.789-** failed\nTraceback")  # redacted, multi-line
    assert "RuntimeError: boom\nsecond line" in warning["MESSAGE"]
    assert (tmp_path / "stderr").read_text() == ""


def test_the_journal_format_falls_back_to_prefixed_lines_when_the_socket_is_missing(tmp_path):
    with open(tmp_path / "stderr", "w") as stream:
        handler = logs.setup("INFO", "journal", stream=stream, journal_socket=str(tmp_path / "absent.socket"))
        try:
            logging.getLogger("stark_challenge.transfers").error("TRANSFER REJECTED: %s", "x-1")
            logging.getLogger("stark_challenge.invoicer").info("round 0 issued")
        finally:
            handler.close()
    assert (tmp_path / "stderr").read_text().splitlines() == [
        "<3>transfers: TRANSFER REJECTED: x-1", "<6>invoicer: round 0 issued"]


def test_the_journal_format_is_the_default_under_journald(tmp_path):
    from stark_challenge import config

    pem = "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----"
    env = {"STARK_PROJECT_ID": "1", "STARK_PRIVATE_KEY": pem}
    assert config.load(env, dotenv_path=None, journald=True, isatty=True).log_format == "journal"
    assert config.load({**env, "LOG_FORMAT": "json"}, dotenv_path=None, journald=True).log_format == "json"


def test_the_round_line_carries_its_fields_as_json_keys(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    wait_for(lambda: messages_matching(service, "^round 0 issued"), message="round 0")
    assert service.stop() == 0
    (entry,) = [json.loads(line) for line in service.logs().splitlines()
                if line.startswith("{") and json.loads(line)["message"].startswith("round 0 issued")]
    assert entry["round"] == 0 and entry["invoices"] == 1 and entry["amount_cents"] == emulator.invoices()[0]["amount"]
