"""Run the Stark Bank emulator from a shell, printing the environment a service needs.

    python -m stark_challenge.emulator --pay-ratio 0.5 --pay-delay 5
    python -m stark_challenge.emulator --port 8899 --webhook http://user:pass@127.0.0.1:8000/webhook

It creates a project, writes its private key (mode 0600) into a temporary directory,
prints ``export NAME=value`` lines on stdout (copy them into the service's shell;
STARK_PRIVATE_KEY is the key file's path, not the PEM text), logs
on stderr, and serves until Ctrl-C or SIGTERM, when it stops and deletes its files.
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

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m stark_challenge.emulator",
        description="Local stand-in for Stark Bank's API, usable by the unmodified starkbank SDK "
                    "through HTTPS_PROXY and REQUESTS_CA_BUNDLE. Prints `export` lines for a "
                    "service, then serves until Ctrl-C or SIGTERM.",
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
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed for ids, payments and failures (default: random)")
    parser.add_argument("--webhook", action="append", default=[], metavar="URL",
                        help="register a webhook for invoice and transfer events (repeatable); "
                             "user:password@ in the URL becomes a Basic Authorization header")
    parser.add_argument("--verbose", action="store_true", help="log every API call and delivery")
    return parser


def main(argv=None):
    """Parse argv, run the emulator until interrupted; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    try:
        emulator = Emulator(port=args.port, host=args.host, seed=args.seed, pay_ratio=args.pay_ratio,
                            pay_delay_s=args.pay_delay, invoice_fee=args.fee, transfer_delay_s=args.transfer_delay)
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
        print("# Stark Bank emulator on %s; paste these into the service's shell:" % emulator.proxy_url)
        for name, value in variables.items():
            print("export %s=%s" % (name, shlex.quote(value)), flush=True)
        while not done.wait(0.5):
            pass
        logging.getLogger(__name__).info("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
