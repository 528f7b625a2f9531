"""Run the Stark Bank emulator from a shell, or act on a running one as Stark Bank's side would.

    python -m stark_challenge.emulator --pay-ratio 0.5 --pay-delay 5
    python -m stark_challenge.emulator --port 8899 --webhook http://user:pass@127.0.0.1:8000/webhook

Serving (no command): it creates a project, writes its private key (mode 0600) into a
temporary directory, prints ``export NAME=value`` lines on stdout (copy them into the
service's shell; STARK_PRIVATE_KEY is the key file's path, not the PEM text, and
STARK_EMULATOR_CONTROL is for the commands below), logs on stderr, and serves until
Ctrl-C or SIGTERM, when it stops and deletes its files.

Commands, from another shell with STARK_EMULATOR_CONTROL set (or --control URL), like
``stripe trigger`` and ``stripe events resend``:

    python -m stark_challenge.emulator pay INVOICE [--amount CENTS]
    python -m stark_challenge.emulator reverse INVOICE [--amount CENTS]
    python -m stark_challenge.emulator fail-transfer TRANSFER [--error TEXT]
    python -m stark_challenge.emulator set-balance CENTS
    python -m stark_challenge.emulator resend EVENT

Each prints one line and exits 0, or prints the emulator's refusal and exits 1; a
missing control URL exits 2.
"""

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading

from .control import Emulator
from .remote import RemoteError, call

__all__ = ["main"]

_CONTROL_VARIABLE = "STARK_EMULATOR_CONTROL"


def _cents(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError("%r is not a whole number of cents" % text)
    return int(text)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m stark_challenge.emulator",
        description="Local stand-in for Stark Bank's API, usable by the unmodified starkbank SDK "
                    "through HTTPS_PROXY and REQUESTS_CA_BUNDLE. Without a command: prints `export` "
                    "lines for a service, then serves until Ctrl-C or SIGTERM. With a command: acts on "
                    "the running emulator named by %s." % _CONTROL_VARIABLE,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--pay-ratio", type=float, default=0.5, metavar="F",
                        help="share of new invoices that get paid, 0..1 (default %(default)s)")
    parser.add_argument("--pay-delay", type=float, default=5.0, metavar="S",
                        help="seconds from invoice creation to its payment (default %(default)s)")
    parser.add_argument("--fee", type=int, default=50, metavar="CENTS",
                        help="fee charged on each paid invoice, in cents (default %(default)s)")
    parser.add_argument("--transfer-delay", type=float, default=2.0, metavar="S",
                        help="seconds per transfer step, created -> processing -> success (default %(default)s)")
    parser.add_argument("--balance", type=_cents, default=None, metavar="CENTS",
                        help="starting balance in cents (default 1000000000, R$ 10 million); transfers it "
                             "cannot cover fail")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed for ids, payments and failures (default: random)")
    parser.add_argument("--webhook", action="append", default=[], metavar="URL",
                        help="register a webhook for invoice and transfer events (repeatable); "
                             "user:password@ in the URL becomes a Basic Authorization header")
    parser.add_argument("--verbose", action="store_true", help="log every API call and delivery")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="act on a running emulator instead of starting one")

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--control", default=None, metavar="URL",
                         help="the running emulator's control URL (default: $%s)" % _CONTROL_VARIABLE)
        return sub

    command("pay", "pay an invoice now (paid and credited logs)").add_argument("invoice", metavar="INVOICE")
    commands.choices["pay"].add_argument("--amount", type=_cents, metavar="CENTS",
                                         help="amount paid (default: the invoice's)")
    command("reverse", "reverse a paid invoice (reversed log)").add_argument("invoice", metavar="INVOICE")
    commands.choices["reverse"].add_argument("--amount", type=_cents, default=0, metavar="CENTS",
                                             help="amount the invoice keeps (default 0: all of it goes back)")
    command("fail-transfer", "fail a pending transfer (failed log)").add_argument("transfer", metavar="TRANSFER")
    commands.choices["fail-transfer"].add_argument("--error", metavar="TEXT", help="the error the log carries")
    command("set-balance", "set the workspace balance").add_argument("cents", type=_cents, metavar="CENTS")
    command("resend", "deliver an event again to its webhooks").add_argument("event", metavar="EVENT")
    return parser


def _act(args):
    """Send one command to a running emulator; print its outcome; return the exit status."""
    control = args.control or os.environ.get(_CONTROL_VARIABLE)
    if not control:
        print("emulator: %s: no running emulator named: set %s (printed by the emulator at start) or pass "
              "--control" % (args.command, _CONTROL_VARIABLE), file=sys.stderr)
        return 2
    fields = {name: getattr(args, name) for name in ("invoice", "transfer", "cents", "event", "amount", "error")
              if getattr(args, name, None) is not None}
    try:
        result = call(control, args.command, fields)
    except RemoteError as error:
        print("emulator: %s: %s" % (args.command, error), file=sys.stderr)
        return 1
    if args.command == "set-balance":
        print("balance: %d cents" % result["balance"])
    elif args.command == "resend":
        print("event %s (%s %s) sent again" % (result["id"], result["subscription"], result["log"]["type"]))
    elif args.command == "fail-transfer":
        print("transfer %s: failed" % result["id"])
    else:
        print("invoice %s: %s, amount %d cents" % (result["id"], result["status"], result["amount"]))
    return 0


def main(argv=None):
    """Parse argv; run the emulator until interrupted, or perform one command; return the exit status."""
    args = _parser().parse_args(argv)
    if args.command is not None:
        return _act(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    knobs = {} if args.balance is None else {"starting_balance": args.balance}
    try:
        emulator = Emulator(port=args.port, host=args.host, seed=args.seed, pay_ratio=args.pay_ratio,
                            pay_delay_s=args.pay_delay, invoice_fee=args.fee, transfer_delay_s=args.transfer_delay,
                            **knobs)
    except (TypeError, ValueError) as error:
        print("emulator: %s" % error, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="stark-emulator-key-") as directory, emulator:
        for url in args.webhook:
            emulator.add_webhook(url)
        project_id, private_pem = emulator.create_project()
        key_path = os.path.join(directory, "project-private-key.pem")
        with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(private_pem)
        variables = emulator.env(project_id)
        variables["STARK_PRIVATE_KEY"] = key_path  # a path, not the PEM: one line, no secret on screen
        variables[_CONTROL_VARIABLE] = emulator.control_url
        print("# Stark Bank emulator on %s; paste these into the service's shell:" % emulator.proxy_url)
        for name, value in variables.items():
            print("export %s=%s" % (name, shlex.quote(value)), flush=True)
        while not done.wait(0.5):
            pass
        logging.getLogger(__name__).info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
