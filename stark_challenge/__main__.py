"""Command line: the only place that builds the service's objects and starts them.

    python3 -m stark_challenge --emulator    # try it: a local Stark Bank and the service, no account
    python3 -m stark_challenge               # run against the Stark Bank project in the environment or .env

Here: the parser, the wiring of ``run`` (``app.App``) and its signals. The other
subcommands (``status``, ``transfers``, ``check``, ``keygen``, ``webhook``) are in ``commands``,
``events`` in ``event_commands``.
Exit status: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading

from . import __version__, commands, config as config_module, event_commands, logs, memory, report, transfer_states
from .commands import fail, load_config
from .errors import ConfigError, StarkChallengeError

logger = logging.getLogger("stark_challenge")

# Try-it mode runs fast unless the user set these: a round every 30 s for 3 minutes. The
# undelivered-event pull keeps its default (10 min): the webhook is registered before round 0,
# and a pull every 30 s would meet each round's events on their way in.
EMULATOR_DEFAULTS = {
    "INVOICE_INTERVAL": "30s",
    "INVOICE_DURATION": "3m",
    "BANK_TIMEOUT": "5s",
}


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
    parser.add_argument("--env-file", metavar="PATH", **({"default": None} if defaults else keep),
                        help="read configuration from this file too (default: .env; the environment wins)")
    parser.add_argument("--emulator", action="store_true", **keep,
                        help="run against a built-in Stark Bank emulator with a throwaway project: "
                             "no account needed, short intervals, a temporary database unless DATABASE_PATH is set")
    parser.add_argument("--keep-database", action="store_true", **keep,
                        help="with --emulator: keep the temporary database at exit (and print the status command "
                             "that reads it); by default it is deleted")
    parser.add_argument("--host", **keep, help="override HOST")
    parser.add_argument("--port", type=int, **keep, help="override PORT")


def _program_name():
    """Return the command as the user typed it: the console script's name, or ``python -m stark_challenge``."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return typed if typed == "stark-challenge" else "python -m stark_challenge"


def build_parser():
    """Return the argparse parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
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

    transfers = sub.add_parser("transfers", help="list transfers by state, or retry a stuck one", description=(
        "List every transfer attempt in the ledger (read-only, safe while the service runs; ALARM marks one "
        "a standing alarm is about), or 'retry INVOICE_ID': act on a credit whose transfer is stuck."))
    transfers.add_argument("--state", choices=transfer_states.NAMES, help="only transfers in this state")
    transfers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    transfer_actions = transfers.add_subparsers(dest="action", metavar="ACTION")
    retry = transfer_actions.add_parser("retry", help="retry a stuck credit, never paying twice", description=(
        "For INVOICE_ID's latest attempt N: without a definite answer from Stark Bank yet (pending, sending, "
        "exists, created, processing), send it again under the SAME external id or ask Stark Bank about it now "
        "(resent); once Stark Bank confirmed it final without moving money (rejected, failed), queue attempt N+1 "
        "(<tag>-inv-<id>-<N+1>) unless Stark Bank shows an attempt of it created, processing or paid (recorded, "
        "nothing sent). A running service does it (POST /transfers/retry on HOST:PORT, "
        "OPERATOR_USERNAME/PASSWORD); a stopped one acts at its next start. Exit 0 queued, resent or recorded, 2 "
        "refused or unknown invoice, 1 Stark Bank or the service unreachable."))
    retry.add_argument("invoice_id", metavar="INVOICE_ID")

    events = sub.add_parser("events", help="list the events received, show one, or replay one from Stark Bank",
                            description=(
        "List the events received, newest last (read-only, safe while the service runs): when, event id, "
        "source (webhook or pull), type, subject (invoice or transfer id) and outcome. 'show ID' prints one "
        "with its body; 'replay ID' asks Stark Bank for it again and feeds it through the normal path: an "
        "event already stored is a duplicate and nothing happens, a new one is processed like any other. A "
        "running service does the replay (POST /events/replay on HOST:PORT, OPERATOR_USERNAME/PASSWORD); a "
        "stopped one processes it at its next start. Exit 0 stored or already there, 2 unknown event, 1 "
        "Stark Bank or the service unreachable."))
    events.add_argument("--limit", type=int, default=20, metavar="N", help="how many events to list (default: 20)")
    events.add_argument("--json", action="store_true", help="print JSON instead of a table")
    event_actions = events.add_subparsers(dest="action", metavar="ACTION")
    show = event_actions.add_parser("show", help="print one event, its outcome and its body",
                                    description="Print event ID as stored: type, subject, source, outcome, body.")
    show.add_argument("event_id", metavar="ID")
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    replay = event_actions.add_parser("replay", help="ask Stark Bank for an event again, through the normal path",
                                      description="Fetch event ID from Stark Bank with the project's credentials "
                                                  "and accept it as a pulled event: deduplication decides.")
    replay.add_argument("event_id", metavar="ID")

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


# -- run ------------------------------------------------------------------------


def _route_sdk_through(emulator):
    """Point this process's HTTPS calls at the emulator's proxy, trusting its CA.

    The one change to ``os.environ`` in the package: the SDK's HTTP library reads
    HTTPS_PROXY and REQUESTS_CA_BUNDLE from there and nowhere else. The project's
    credentials are not set here: ``_emulator_config`` passes them explicitly.
    """
    os.environ.update({k: v for k, v in emulator.env().items() if not k.startswith("STARK_")})


def _emulator_config(args, emulator):
    """Return (Config, throwaway directory or None) of a try-it run against ``emulator``.

    The project is the emulator's throwaway one, rounds are fast unless set, the webhook
    gets basic auth with a random password unless WEBHOOK_USERNAME/PASSWORD are set (so the
    try-it goes through every check a production webhook does), and the database goes in a
    new temporary directory (returned, for ``run`` to delete at exit) unless DATABASE_PATH
    is set.
    """
    project_id, private_key = emulator.create_project()
    env_file = config_module.read_dotenv(args.env_file or ".env", required=args.env_file is not None)
    given = lambda name: os.environ.get(name) or env_file.get(name)  # noqa: E731
    fast = {k: v for k, v in EMULATOR_DEFAULTS.items() if not given(k)}
    if not (given("WEBHOOK_USERNAME") or given("WEBHOOK_PASSWORD")):
        fast.update(WEBHOOK_USERNAME="try-it", WEBHOOK_PASSWORD=secrets.token_urlsafe(16))
    directory = None
    if not (given("DATABASE_PATH") or given("DATABASE_URL")):
        directory = tempfile.mkdtemp(prefix="try-it-")
        fast["DATABASE_PATH"] = os.path.join(directory, "stark_challenge.sqlite3")
    fast.update({"STARK_PROJECT_ID": project_id, "STARK_PRIVATE_KEY": private_key, "STARK_ENVIRONMENT": "sandbox"})
    try:
        return load_config(args, extra=fast), directory
    except ConfigError:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _leave_throwaway(directory, database_path, keep):
    """Delete the try-it's temporary database directory, or, if ``keep``, say how to read it."""
    if keep:
        print(f"stark_challenge: the database is kept; read it with: DATABASE_PATH={database_path} "
              f"{_program_name()} status", file=sys.stderr)
    else:
        shutil.rmtree(directory, ignore_errors=True)


class Signals:
    """SIGTERM and SIGINT, caught: the first asks the service to stop, a second exits at once (status 1).

    Installed before any thread starts, so a signal during start-up is a clean stop,
    not a kill.
    """

    def __init__(self):
        self.received = []  # signal numbers, in order
        self._stop = threading.Event()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.received.append(signum)
        # os._exit skips atexit, so coverage cannot record this block; test_faults.py's
        # test_a_second_signal_forces_exit checks it in a real process.
        if len(self.received) > 1:  # pragma: no cover
            logger.error("second signal: exiting at once")
            os._exit(1)
        self._stop.set()

    def wait(self, timeout):
        """Return True once a signal came, False after ``timeout`` seconds without one."""
        return self._stop.wait(timeout)


def run(args):
    """Run the service until SIGTERM or SIGINT; return the exit status."""
    from .app import App
    from .bank import Bank
    from .notify import Notifier
    from .store import Store, StoreError

    signals = Signals()  # first: a signal during start-up then stops cleanly once started
    memory.limit_arenas()  # before any thread starts (see memory.ARENAS)
    emulator = throwaway = None
    try:
        if args.emulator:
            from .emulator import Emulator  # only here: the service never imports the emulator otherwise
            from .emulator.certs import CertificateError

            try:
                emulator = Emulator(pay_ratio=0.5, pay_delay_s=4.0, transfer_delay_s=2.0).start()
            except CertificateError as e:
                return fail(f"--emulator: {e} (install it, e.g. apt install openssl; or run against your own "
                            "Stark Bank project)")
            _route_sdk_through(emulator)
            config, throwaway = _emulator_config(args, emulator)
        else:
            config = load_config(args)
        logs.setup(config.log_level, config.log_format)
        if emulator:  # its per-delivery lines would drown the service's own
            logging.getLogger("stark_challenge.emulator").setLevel(logging.WARNING)
        bank = Bank(config)
        bank.configure()
        if not config.basic_auth:
            logger.warning("no WEBHOOK_USERNAME/PASSWORD: POST /webhook relies on signatures alone")
        if not config.operator_auth:
            logger.info("no OPERATOR_USERNAME/PASSWORD: /status, /metrics, retries and replays answer 404")
        try:
            store = Store(config.database, lease_s=config.lease_s)
        except StoreError as e:
            return fail(str(e), 1)
        app = App(config, bank, store)
        # The try-it's webhook is registered once the port is known and before round 0
        # goes out, so that round's events are pushed, not pulled later.
        register = (lambda port: _register_emulator_webhook(bank, config, port, emulator)) if emulator else None
        try:
            app.start(before_rounds=register)
        except OSError as e:
            app.stop()
            return fail(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}; "
                        "choose another port with PORT (or --port)")

        # The port is bound and the store open: ready (sd_notify; a no-op outside systemd).
        notifier = Notifier()
        notifier.send(READY=1, STATUS=app.status_line())
        notifier.start(healthy=app.healthy, status=app.status_line)

        trimmer = memory.Trimmer()  # the main thread is idle: it hands freed heap pages back meanwhile
        while not signals.wait(1.0):
            trimmer.run_if_due()
        logger.info("stopping (signal %d): finishing in-flight work", signals.received[0])
        notifier.send(STOPPING=1)
        notifier.stop()
        app.stop()
        logger.info("stopped; %s", _summary(config.database))
        return 0
    except ConfigError as e:
        return fail(str(e))
    finally:
        if emulator:
            emulator.stop()
        if throwaway:
            _leave_throwaway(throwaway, config.database_path, args.keep_database)


def _summary(database):
    """Return what the run left, read back from the database: rounds, credits, money forwarded, transfers open."""
    try:
        data = commands.read_report(database)
    except StarkChallengeError as e:
        return f"no summary ({e})"
    r, c, p = data["rounds"], data["credits"], data["transfers_pending"]
    return (f"{r['issued']} round{'' if r['issued'] == 1 else 's'} issued, {c['count']} credit"
            f"{'' if c['count'] == 1 else 's'} ({report.reais(c['amount'])}), {report.reais(data['transferred'])} "
            f"forwarded, {p['count']} transfer{'' if p['count'] == 1 else 's'} open")


def _register_emulator_webhook(bank, config, port, emulator):
    url = config_module.with_userinfo(config_module.local_url(config.host, port, "/webhook"),
                                      config.webhook_username, config.webhook_password)
    hook = bank.create_webhook(url, ["invoice", "transfer"])
    logger.info("emulator: webhook %s registered; invoices get paid soon after each round", hook["id"])
    # Its command line (python -m stark_challenge.emulator pay/reverse/fail-transfer/set-balance/resend) acts on
    # this emulator from another shell through this URL.
    # Two lines, so that each fits 120 columns and the second can be copied as it is.
    logger.info("emulator: commands (pay, reverse, ...) act on it from another shell after:")
    logger.info("export STARK_EMULATOR_CONTROL=%s", emulator.control_url)


COMMANDS = {None: run, "run": run, "status": commands.status, "check": commands.check,
            "keygen": commands.keygen, "webhook": commands.webhook, "transfers": commands.transfers,
            "events": event_commands.events}


def main(argv=None):
    """Parse the command line, run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "emulator", False) and args.command not in (None, "run"):
        return fail(f"--emulator goes with run only; {args.command} uses the Stark Bank project configured "
                    "(environment, .env or --env-file)")
    if getattr(args, "keep_database", False) and not getattr(args, "emulator", False):
        return fail("--keep-database goes with --emulator only (it keeps the try-it's temporary database)")
    try:
        return COMMANDS[args.command](args)
    except StarkChallengeError as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
