"""Command line: the only place that builds the service's objects and starts them.

The README's two commands::

    python3 -m stark_challenge --emulator    # try it: a local Stark Bank and the service, no account
    make test                                # the whole suite

Subcommands: run (the default), ``status``, ``check``, ``keygen``, ``webhook``.
Exit status: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import datetime
from http import HTTPStatus

from . import __version__, config as config_module, logs, report
from .errors import BankError, BankRejected, ConfigError, StarkChallengeError

logger = logging.getLogger("stark_challenge")

# Try-it mode runs fast unless the user set these: a round every 30 s for 3 minutes.
EMULATOR_DEFAULTS = {
    "INVOICE_INTERVAL": "30s",
    "INVOICE_DURATION": "3m",
    "EVENT_POLL_INTERVAL": "30s",
    "BANK_TIMEOUT": "5s",
}
SHUTDOWN_TIMEOUT_S = 5.0


def utcnow():
    """Return the current time, timezone-aware UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


def _variables_help():
    lines = ["configuration (environment variables; a .env file in the working directory is read too):"]
    for v in config_module.VARIABLES:
        default = f" [default: {v.default}]" if v.default else ""
        lines.append(f"  {v.name:<22} {v.help}{default}")
    return "\n".join(lines)


def _add_run_options(parser, defaults):
    # Given both before and after "run"; the subcommand's copy must not reset what
    # the top level parsed, hence SUPPRESS there (an argparse subparser quirk).
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--env-file", metavar="PATH", **({"default": ".env"} if defaults else keep),
                        help="read configuration from this file too (default: .env; the environment wins)")
    parser.add_argument("--emulator", action="store_true", **keep,
                        help="run against a built-in Stark Bank emulator with a throwaway project: "
                             "no account needed, short intervals, a temporary database unless DATABASE_PATH is set")
    parser.add_argument("--host", **keep, help="override HOST")
    parser.add_argument("--port", type=int, **keep, help="override PORT")


def build_parser():
    """Return the argparse parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="python -m stark_challenge",
        description="Issue Stark Bank invoices on a schedule and forward every credited invoice, "
                    "minus fees, by transfer, exactly once.",
        epilog=_variables_help() + "\n\nexit status: 0 ok, 1 runtime failure, 2 usage or configuration error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stark_challenge {__version__}")
    _add_run_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run_parser = sub.add_parser("run", help="run the service (the default)",
                                description="Run the service: HTTP server, invoice schedule, transfer worker.")
    _add_run_options(run_parser, defaults=False)

    status = sub.add_parser("status", help="print where the money stands, from the database (read-only)",
                            description="Read the database read-only (safe while the service runs) and "
                                        "print rounds, invoices, credits, fees and transfers.")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    check = sub.add_parser("check", help="validate the configuration and the Stark Bank credentials",
                           description="Validate every variable, load the key and, unless --offline, call "
                                       "Stark Bank once to prove the credentials work; print the plan.")
    check.add_argument("--offline", action="store_true", help="do not call Stark Bank")

    keygen = sub.add_parser("keygen", help="write a new project key pair",
                            description="Write private-key.pem (mode 0600) and public-key.pem to DIR. "
                                        "Upload the public key when creating the project at Stark Bank.")
    keygen.add_argument("dir", nargs="?", default="keys", metavar="DIR", help="where to write (default: ./keys)")

    webhook = sub.add_parser("webhook", help="manage Stark Bank webhook subscriptions",
                             description="Subscribe a URL to invoice and transfer events, list or delete them.")
    actions = webhook.add_subparsers(dest="action", metavar="ACTION", required=True)
    register = actions.add_parser("register", help="subscribe URL to invoice and transfer events",
                                  description="Subscribe URL (e.g. https://host/webhook) to invoice and transfer "
                                              "events; WEBHOOK_USERNAME/PASSWORD, when set, go in its userinfo.")
    register.add_argument("url")
    actions.add_parser("list", help="list the subscriptions", description="List the webhook subscriptions.")
    delete = actions.add_parser("delete", help="delete a subscription", description="Delete subscription ID.")
    delete.add_argument("id")
    return parser


def _overrides(args):
    found = {}
    if args.host:
        found["HOST"] = args.host
    if args.port is not None:
        found["PORT"] = str(args.port)
    return found


def load_config(args, require_credentials=True, extra=None):
    """Return the Config for these arguments; raise ConfigError."""
    return config_module.load(
        dotenv_path=args.env_file,
        overrides={**(extra or {}), **_overrides(args)},
        require_credentials=require_credentials,
        isatty=sys.stderr.isatty(),
    )


def configured_bank(args):
    """Return (Config, Bank) with the SDK user set; raise ConfigError."""
    from .bank import Bank

    config = load_config(args)
    bank = Bank(config)
    bank.configure()
    return config, bank


def fail(message, status=2):
    """Print ``message`` to stderr as one line, secrets redacted; return ``status`` (for ``return fail(...)``)."""
    print(f"stark_challenge: {' '.join(logs.redact(message).split())}", file=sys.stderr)
    return status


# -- run ------------------------------------------------------------------------


def _start_emulator(args):
    """Start the built-in emulator; return (emulator, config) with the service pointed at it."""
    from .emulator import Emulator  # only here: the service never imports the emulator otherwise

    emulator = Emulator(pay_ratio=0.6, pay_delay_s=4.0, transfer_delay_s=2.0).start()
    project_id, private_key = emulator.create_project()
    os.environ.update({k: v for k, v in emulator.env().items() if not k.startswith("STARK_")})
    env_file = config_module.read_dotenv(args.env_file) if args.env_file else {}
    fast = {k: v for k, v in EMULATOR_DEFAULTS.items() if not (os.environ.get(k) or env_file.get(k))}
    if not (os.environ.get("DATABASE_PATH") or env_file.get("DATABASE_PATH")):
        directory = tempfile.mkdtemp(prefix="stark_challenge-")
        fast["DATABASE_PATH"] = os.path.join(directory, "stark_challenge.sqlite3")
    fast.update({"STARK_PROJECT_ID": project_id, "STARK_PRIVATE_KEY": private_key, "STARK_ENVIRONMENT": "sandbox"})
    return emulator, load_config(args, extra=fast)


class App:
    """The service's objects, wired together; started and stopped in order.

    Built from a Config, a configured Bank and an open Store. ``start()`` binds the
    port (OSError if taken) and starts the worker and the schedule; ``stop()``
    drains them all, bounded by SHUTDOWN_TIMEOUT_S each, and closes the store.
    """

    def __init__(self, config, bank, store):
        from .invoicer import Invoicer
        from .scheduler import Schedule
        from .webhook import Intake
        from .worker import Worker

        self.config, self.bank, self.store = config, bank, store
        self.worker = Worker(store, bank, config.instance_tag, config.event_poll_interval_s)
        self.schedule = Schedule(
            store, job=lambda n, due_at: self.invoicer.issue_round(n, due_at),
            interval_s=config.invoice_interval_s, duration_s=config.invoice_duration_s,
        )
        window = self.schedule.open()
        done = [r for r in store.rounds() if r.state in ("issued", "failed")]
        if done:
            logger.info("recovery: resuming the schedule started %s (%d of its rounds already settled)",
                        window["started_at"].isoformat(timespec="seconds"), len(done))
        self.invoicer = Invoicer(
            bank, store, config, window["schedule_id"], clock=utcnow,
            retry_base_s=min(30.0, window["interval_s"] / 10),
        )
        self.intake = Intake(store, bank, config, clock=utcnow, on_event=self.worker.wake)
        self.server = None
        self.worker_started = threading.Event()  # set by start() once the worker thread runs

    def health(self):
        """Return (HTTPStatus, body) for GET /health: the status word only, for anyone who asks.

        ``degraded`` (503) when the store does not answer or the worker thread is dead;
        ``starting`` (200: webhooks are already taken) until the worker's first pass is
        over; ``ok`` (200) otherwise. The details are in ``details()``, behind basic auth.
        """
        if not self.store.ping():
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if not self.worker_started.is_set():  # the port is bound a moment before the worker starts
            return HTTPStatus.OK, {"status": "starting"}
        if not self.worker.state()["alive"]:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "degraded"}
        if self.worker.last_pass_at is None:
            return HTTPStatus.OK, {"status": "starting"}
        return HTTPStatus.OK, {"status": "ok"}

    def details(self):
        """Return the service's live details (version, store, scheduler, worker, key fetches) as a dict."""
        store_ok = self.store.ping()
        return {
            "version": __version__,
            "store": "ok" if store_ok else "unavailable",
            "scheduler": self.schedule.state() if store_ok else None,
            "worker": self.worker.state(),
            "public_key_fetches": self.bank.keys.fetches,
        }

    def status_report(self):
        """Return the status report dict (sd_notify STATUS=, and the body of GET /status with ``service``)."""
        return report.build(self.store.summary(), utcnow())

    def status_page(self):
        """Return GET /status's body: the status report, and the live details under ``service``."""
        return {**self.status_report(), "service": self.details()}

    def healthy(self):
        """Return True if the store answers and the worker and HTTP threads run (the watchdog's test)."""
        serving = self.server is None or self.server.alive()
        return serving and self.store.ping() and self.worker.state()["alive"]

    def start(self):
        """Bind the port, then start the worker and the schedule. Raise OSError if the port is taken."""
        from .server import serve

        c = self.config
        self.server = serve(c.host, c.port, self.intake, self.health, self.status_page,
                            c.max_connections, c.request_timeout_s)
        logger.info("stark_challenge %s listening on %s:%d (%s, database %s)",
                    __version__, c.host, self.server.port, c.environment, c.database_path)
        self.worker.start()
        self.worker_started.set()
        self.schedule.start()

    def stop(self):
        """Stop accepting, finish in-flight work, close the store."""
        # Ask the worker and the schedule first, so that they finish their current item
        # while the server drains its requests; then wait for each (bounded).
        self.worker.stop(timeout=0)
        self.schedule.stop(timeout=0)
        if self.server is not None:
            self.server.stop(SHUTDOWN_TIMEOUT_S)
        self.schedule.stop(SHUTDOWN_TIMEOUT_S)
        self.worker.stop(SHUTDOWN_TIMEOUT_S)
        self.store.close()


def _catch_signals():
    """Route SIGTERM and SIGINT to the returned Event (its ``signals`` list names them).

    Installed before any thread starts, so a signal during start-up is a clean stop,
    not a kill. A second signal exits at once (status 1).
    """
    stop = threading.Event()
    stop.signals = []

    def on_signal(signum, _frame):
        stop.signals.append(signum)
        # os._exit skips atexit, so coverage cannot record this block; test_faults.py's
        # test_a_second_signal_forces_exit checks it in a real process.
        if len(stop.signals) > 1:  # pragma: no cover
            logger.error("second signal: exiting at once")
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def run(args):
    """Run the service until SIGTERM or SIGINT; return the exit status."""
    from .bank import Bank
    from .notify import Notifier
    from .store import Store, StoreError

    stop = _catch_signals()  # first: a signal during start-up then stops cleanly once started
    emulator = None
    try:
        if args.emulator:
            emulator, config = _start_emulator(args)
        else:
            config = load_config(args)
        logs.setup(config.log_level, config.log_format)
        if emulator:  # its per-delivery lines would drown the service's own
            logging.getLogger("stark_challenge.emulator").setLevel(logging.WARNING)
        bank = Bank(config)
        bank.configure()
        if not config.basic_auth:
            logger.warning("WEBHOOK_USERNAME/WEBHOOK_PASSWORD not set: POST /webhook relies on signatures alone")
        try:
            store = Store(config.database_path)
        except StoreError as e:
            return fail(str(e), 1)
        app = App(config, bank, store)
        try:
            app.start()
        except OSError as e:
            app.stop()
            return fail(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}", 1)
        if emulator:
            _register_emulator_webhook(bank, config, app.server.port)

        # The port is bound and the store open: ready (sd_notify; a no-op outside systemd).
        notifier = Notifier()
        notifier.send(READY=1, STATUS=report.one_line(app.status_report()))
        notifier.start(healthy=app.healthy, status=lambda: report.one_line(app.status_report()))

        while not stop.wait(1.0):
            pass
        logger.info("stopping (signal %d): finishing in-flight work", stop.signals[0])
        notifier.send(STOPPING=1)
        notifier.stop()
        app.stop()
        logger.info("stopped")
        return 0
    except ConfigError as e:
        return fail(str(e))
    finally:
        if emulator:
            emulator.stop()


def _register_emulator_webhook(bank, config, port):
    host = "127.0.0.1" if config.host in ("0.0.0.0", "", "::") else config.host
    userinfo = f"{config.webhook_username}:{config.webhook_password}@" if config.basic_auth else ""
    hook = bank.create_webhook(f"http://{userinfo}{host}:{port}/webhook", ["invoice", "transfer"])
    logger.info("emulator: webhook %s registered for port %d; invoices are paid a few seconds after each round",
                hook["id"], port)


# -- other commands -------------------------------------------------------------


def status(args):
    """Print the status report from the database, read-only."""
    from .store import StoreError, open_read_only, summarize

    try:
        config = load_config(args, require_credentials=False)
        conn = open_read_only(config.database_path)
    except ConfigError as e:
        return fail(str(e))
    except StoreError as e:
        return fail(str(e), 1)
    try:
        data = report.build(summarize(conn), utcnow())
    finally:
        conn.close()
    print(json.dumps(data, indent=2) if args.json else report.render(data))
    return 0


def check(args):
    """Validate the configuration (and credentials, unless --offline); print the plan.

    Exit 0 if all is well, 2 if a variable, the key or the credentials are wrong,
    1 if Stark Bank could not be reached (nothing was proven either way).
    """
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
    rounds = round_count(config.invoice_interval_s, config.invoice_duration_s)
    window = "forever" if rounds is None else f"for {_duration(config.invoice_duration_s)} ({rounds} rounds)"
    print(f"configuration ok{'' if args.offline else '; credentials accepted by Stark Bank'} ({config.environment})")
    print(f"  rounds: {config.invoice_min}-{config.invoice_max} invoices every "
          f"{_duration(config.invoice_interval_s)} {window}, tagged {config.instance_tag!r}")
    print(f"  credits forwarded to: {config.transfer_name}, bank {config.transfer_bank_code}, "
          f"branch {config.transfer_branch}, account {config.transfer_account} ({config.transfer_account_type})")
    print(f"  listening on {config.host}:{config.port}, basic auth {'on' if config.basic_auth else 'OFF'}")
    print(f"  database: {config.database_path} ({_database_plan(config.database_path)})")
    return 0


def _duration(seconds):
    """Return ``seconds`` as the configuration writes it, in the largest whole unit: 3h, 24h, 90s, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit == "d" else 1) and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def _database_plan(path):
    """Return what a start would do with the database at ``path``: resume a window, or start one."""
    from .store import StoreError, open_read_only, summarize

    if not os.path.exists(path):
        return "new: the first round is issued at start"
    try:
        conn = open_read_only(path)
    except StoreError as e:
        return f"unreadable: {e}"
    try:
        data = report.build(summarize(conn), utcnow())
    finally:
        conn.close()
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
    from urllib.parse import urlsplit, urlunsplit

    try:
        config, bank = configured_bank(args)
    except ConfigError as e:
        return fail(str(e))
    try:
        if args.action == "register":
            parts = urlsplit(args.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                return fail("URL: expected http(s)://host/path")
            url = args.url
            if config.basic_auth and "@" not in parts.netloc:
                from urllib.parse import quote

                userinfo = f"{quote(config.webhook_username, safe='')}:{quote(config.webhook_password, safe='')}"
                url = urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))
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


COMMANDS = {None: run, "run": run, "status": status, "check": check, "keygen": keygen, "webhook": webhook}


def main(argv=None):
    """Parse the command line, run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except StarkChallengeError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
