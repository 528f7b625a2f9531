"""Commands: the operator's commands besides ``run``: ``status``, ``transfers``, ``check``, ``keygen``, ``webhook``.

Each takes the parsed arguments (``__main__.build_parser``), prints what it found
and returns the exit status: 0 success, 1 runtime failure, 2 usage or configuration
error. ``status``, ``transfers`` and ``check`` read the database through a read-only
``Store``, safe while the service runs. ``transfers retry`` writes. A SQLite file has
one writer: while the service runs (it holds the store's lock), the service does the
retry, asked at ``POST /transfers/retry`` with the webhook's basic auth; otherwise
the command opens the store itself (taking the lock) and does it. A PostgreSQL
database is shared: the command queues the attempt itself, and an instance sends it.
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from . import config as config_module, logs, report
from .errors import BankError, BankRejected, ConfigError
from .timing import utcnow

__all__ = ["read_report", "status", "transfers", "check", "keygen", "webhook", "load_config", "fail"]

# Seconds the retry command waits for the running service's answer (it asks Stark Bank once).
RETRY_TIMEOUT_S = 60.0


def load_config(args, require_credentials=True, extra=None):
    """Return the Config for these arguments (``extra`` and the flags win over the environment); raise ConfigError."""
    overrides = dict(extra or {})
    if args.host:
        overrides["HOST"] = args.host
    if args.port is not None:
        overrides["PORT"] = str(args.port)
    # --env-file names a file that must exist; the default .env is read only if there.
    return config_module.load(dotenv_path=args.env_file or ".env", overrides=overrides,
                              require_credentials=require_credentials, isatty=sys.stderr.isatty(),
                              dotenv_required=args.env_file is not None, journald=logs.under_journald(sys.stderr))


def configured_bank(args):
    """Return (Config, Bank) with the SDK user set; raise ConfigError."""
    from .bank import Bank

    config = load_config(args)
    bank = Bank(config)
    bank.configure()
    return config, bank


def fail(message, status=2):
    """Print ``message`` to stderr as one line, secrets redacted; return ``status`` (for ``return fail(...)``).

    Under systemd the line starts with ``<3>`` (an error's priority, ``logs.priority_prefixes``).
    """
    prefix = "<3>" if logs.priority_prefixes(sys.stderr) else ""
    print(f"{prefix}stark_challenge: {' '.join(logs.redact(message).split())}", file=sys.stderr)
    return status


def read_report(path):
    """Return the status report of the database at ``path``, read-only; raise StoreError."""
    from .store import Store

    reader = Store(path, read_only=True)
    try:
        return report.build(reader.summary(), utcnow())
    finally:
        reader.close()


def status(args):
    """Print the status report from the database, read-only."""
    from .store import StoreError

    try:
        data = read_report(load_config(args, require_credentials=False).database)
    except ConfigError as e:
        return fail(str(e))
    except StoreError as e:
        return fail(str(e), 1)
    print(json.dumps(data, indent=2) if args.json else report.render(data))
    return 0


def transfers(args):
    """List the transfer attempts (read-only), or ``retry`` one stuck credit."""
    states = (args.state,) if args.state else None
    return read_or_write(args, "retry", _retry,
                         lambda reader: (reader.transfers(states=states), {a["subject"] for a in reader.alarms()}),
                         _print_transfers)


def read_or_write(args, write_action, write, read, show):
    """Run an operator's command: ``write(args, config)`` for ``write_action``, else ``show(args, read(store))``.

    The configuration is loaded without Stark Bank's credentials (exit 2 if it is wrong);
    ``read`` gets the database opened read-only, safe while the service runs (exit 1 if
    it cannot be read). Return the exit status.
    """
    from .store import Store, StoreError

    try:
        config = load_config(args, require_credentials=False)
    except ConfigError as e:
        return fail(str(e))
    if args.action == write_action:
        return write(args, config)
    try:
        reader = Store(config.database, read_only=True)
        try:
            found = read(reader)
        finally:
            reader.close()
    except StoreError as e:
        return fail(str(e), 1)
    return show(args, found)


def _print_transfers(args, found):
    rows, alarms = found
    if args.json:
        print(json.dumps([{**t._asdict(), "errors": [list(e) for e in t.errors],
                            "alarm": _alarmed(t, alarms), **_times(t)} for t in rows], indent=2))
        return 0
    for t in rows:
        error = "; ".join(f"{c}: {m}" if c else m for c, m in t.errors[-1:])
        flag = "ALARM " if _alarmed(t, alarms) else ""
        print(f"{flag}{t.state:<10}  invoice {t.invoice_id}  attempt {t.attempt}  {report.reais(t.amount):>14}  "
              f"{t.external_id}  {t.transfer_id or '-'}{'  ' + error if error else ''}")
    if not rows:
        print("no transfers" + (f" in state {args.state}" if args.state else ""))
    return 0


def _alarmed(transfer, alarm_subjects):
    """Return True if a standing alarm is about this transfer or its invoice."""
    return transfer.external_id in alarm_subjects or transfer.invoice_id in alarm_subjects


def _times(transfer):
    return {name: value.isoformat() for name, value in transfer._asdict().items()
            if hasattr(value, "isoformat")}


def _retry(args, config):
    """Retry one stuck credit: through the running service, or here when it is stopped."""
    from . import resend

    return write_or_ask(args, config, lambda: _retry_through_service(config, args.invoice_id),
                        lambda store, bank, settings: resend.retry(store, bank, settings.instance_tag,
                                                                   args.invoice_id, utcnow()),
                        "nothing queued", (("queued", "resent"), "; the service acts on it when it starts"),
                        _print_outcome)


def write_or_ask(args, config, ask, act, nothing, later, print_outcome):
    """Make an operator's write to the store here, or ask the running service, which holds it; return the exit status.

    While the service holds the store's lock: ``ask()``. Otherwise the store is opened
    here and ``act(store, bank, config)`` returns an Outcome, printed by
    ``print_outcome(code, message)``; ``later`` is (outcome codes, what to add to their
    message: the service finishes the work at its next start). Exit 1 without a
    database or if Stark Bank does not answer (``nothing`` says what was left undone),
    2 for a configuration error.
    """
    from .store import Store, StoreError, StoreLocked

    if not config.database_url and not os.path.exists(config.database_path):
        return fail(f"{config.database_path}: no such database (set DATABASE_PATH)", 1)
    try:
        # A PostgreSQL database is shared: the write is made here, and a running instance does the rest.
        store = Store(config.database)
    except StoreLocked:
        return ask()
    except StoreError as e:
        return fail(str(e), 1)
    try:
        try:
            config, bank = configured_bank(args)
        except ConfigError as e:
            return fail(str(e))
        try:
            outcome = act(store, bank, config)
        except BankError as e:
            return fail(f"Stark Bank did not answer, {nothing}: {e}", 1)
    finally:
        store.close()
    codes, suffix = later
    return print_outcome(outcome.code, outcome.message + (suffix if outcome.code in codes else ""))


def outcome_printer(refusals):
    """Return ``print_outcome(code, message) -> exit status``: 0 with ``message`` printed, or 2 with it on
    stderr for a code in ``refusals`` (the operator asked for what cannot be done)."""
    def print_outcome(code, message):
        if code in refusals:
            return fail(message, 2)
        print(message)
        return 0
    return print_outcome


_print_outcome = outcome_printer(("refused", "unknown"))


def _retry_through_service(config, invoice_id):
    """Ask the running service (it holds the store) to retry; return the exit status."""
    return ask_service(config, "/transfers/retry", {"invoice_id": invoice_id}, RETRY_TIMEOUT_S, "retry",
                       {409: "refused", 404: "refused"}, _print_outcome)


def ask_service(config, path, payload, timeout_s, what, reported, print_outcome):
    """POST ``payload`` (JSON) to the running service's operator endpoint ``path``; return the exit status.

    With the operator's credentials (exit 2 without them, naming them). An answer 200,
    or one whose HTTP status is in ``reported`` (status -> the outcome code when the body
    names none), goes to ``print_outcome(code, message)``, whose exit status is returned;
    any other answer, or none within ``timeout_s``, is exit 1. ``what`` names the request
    in the messages.
    """
    if not config.operator_auth:
        return fail("the service is running: set OPERATOR_USERNAME and OPERATOR_PASSWORD (as the service has them) "
                    f"to ask it for the {what}", 2)
    url = config_module.local_url(config.host, config.port, path)
    token = base64.b64encode(f"{config.operator_username}:{config.operator_password}".encode()).decode()
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Authorization": "Basic " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:
            body = {}
        if e.code not in reported:
            return fail(f"the service answered {e.code}: {body.get('error', e.reason)}", 1)
        return print_outcome(body.get("outcome", reported[e.code]), body.get("message", f"HTTP {e.code}"))
    except (OSError, ValueError) as e:
        return fail(f"the service holds the database but does not answer at {url}: {e}", 1)
    return print_outcome(body["outcome"], body["message"])


def check(args):
    """Validate the configuration (and credentials, unless --offline); print the plan.

    Exit 0 if all is well, 2 if a variable, the key or the credentials are wrong,
    1 if Stark Bank could not be reached (nothing was proven either way).
    """
    from . import verify
    from .scheduler import round_count

    try:
        config, bank = configured_bank(args)
    except ConfigError as e:
        return fail(str(e))
    if not args.offline:
        try:
            bank.check_credentials()
        except BankRejected as e:
            return fail(str(e))
        except BankError as e:  # no verdict on the configuration: a runtime failure
            return fail(str(e), 1)
    duration = config_module.format_duration
    rounds = round_count(config.invoice_interval_s, config.invoice_duration_s)
    window = "forever" if rounds is None else f"for {duration(config.invoice_duration_s)} ({rounds} rounds)"
    print(f"configuration ok{'' if args.offline else '; credentials accepted by Stark Bank'} ({config.environment})")
    print(f"  rounds: {config.invoice_min}-{config.invoice_max} invoices every "
          f"{duration(config.invoice_interval_s)} {window}, tagged {config.instance_tag!r}")
    print(f"  credits forwarded to: {config.transfer_name}, bank {config.transfer_bank_code}, "
          f"branch {config.transfer_branch}, account {config.transfer_account} ({config.transfer_account_type})")
    print(f"  listening on {config.host}:{config.port}, basic auth {'on' if config.basic_auth else 'OFF'}, "
          f"operator endpoints {'on' if config.operator_auth else 'off (404)'}")
    print(f"  database: {_database_name(config)} ({_database_plan(config)})")
    print(f"  webhook signatures verified by: {verify.best_verifier().name}")
    return 0


def _database_name(config):
    """Return the database as the operator may see it: the SQLite path, or the PostgreSQL URL without its password."""
    from .postgres_db import display_url

    return display_url(config.database_url) if config.database_url else config.database_path


def _database_plan(config):
    """Return what a start would do with the configured database: resume a window, or start one."""
    from .store import StoreError

    if not config.database_url and not os.path.exists(config.database_path):
        return "new: the first round is issued at start"
    try:
        data = read_report(config.database)
    except StoreError as e:
        return f"unreadable: {e}"
    r = data["rounds"]
    if data.get("schedule") is None:
        return "no schedule yet: the first round is issued at start"
    return (f"resumes the schedule started {data['schedule']['started_at'][:19]}Z: "
            f"{r['issued']} rounds issued, {r['due']} due")


def keygen(args):
    """Write a new key pair to args.dir, the private key with mode 0600; never overwrite a file."""
    from .bank import new_key_pair

    private_path = os.path.join(args.dir, "private-key.pem")
    public_path = os.path.join(args.dir, "public-key.pem")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            return fail(f"{path} exists; not overwriting a key", 1)
    private_pem, public_pem = new_key_pair()
    try:
        os.makedirs(args.dir, mode=0o700, exist_ok=True)
        # O_EXCL: created here and now, with its mode from the start (no window at 0644).
        for path, pem, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            os.fchmod(fd, mode)  # exactly this mode, whatever the umask
            with os.fdopen(fd, "w") as f:
                f.write(pem)
    except OSError as e:
        return fail(f"cannot write the keys to {args.dir}: {e.strerror}", 1)
    print(f"private key: {private_path} (mode 0600; keep it secret, set STARK_PRIVATE_KEY to this path)")
    print(f"public key:  {public_path}")
    print("Upload the public key when you create the project at Stark Bank "
          "(Integrations > New project), then set STARK_PROJECT_ID to the project's id.")
    return 0


def webhook(args):
    """Register, list or delete webhook subscriptions at Stark Bank."""
    try:
        config, bank = configured_bank(args)
    except ConfigError as e:
        return fail(str(e))
    try:
        if args.action == "register":
            parts = urlsplit(args.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return fail("URL: expected http(s)://host/path")
            url = config_module.with_userinfo(args.url, config.webhook_username, config.webhook_password)
            hook = bank.create_webhook(url, ["invoice", "transfer"])
            print(f"webhook {hook['id']} registered: {logs.redact(hook['url'])} ({', '.join(hook['subscriptions'])})")
        elif args.action == "list":
            hooks = bank.webhooks()
            for hook in hooks:
                print(f"{hook['id']}  {logs.redact(hook['url'])}  {', '.join(hook['subscriptions'])}")
            if not hooks:
                print("no webhooks")
        else:
            hook = bank.delete_webhook(args.id)
            print(f"webhook {hook['id']} deleted")
    except BankError as e:
        return fail(str(e), 1)
    return 0
