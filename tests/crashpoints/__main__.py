"""Kill the service at every durable step of the money path's story, and check what must hold after.

    make crash                          # every point (PYTHONPATH=tests python -m crashpoints)
    make crash POINT=call:12:before     # one point, alone
    PYTHONPATH=tests .venv/bin/python -m crashpoints --every 10 --seed 3 --jobs 1

First runs the story once without a kill and lists its crash points (each durable
commit of the service, and each call to Stark Bank twice: before and after Stark Bank
carried it out), then runs it once per point: the service is killed there with SIGKILL,
started again, left to settle, and the invariants are checked against the emulator's
ledger. One line per point, then ``crash points: N run, N held, N failed``. Exit status
0 if every point held, 1 otherwise.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import tempfile
import time

from stark_challenge.emulator.certs import make_certificates

from . import points, run
from .story import STEPS

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(prog="python -m crashpoints", description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", default=[], metavar="ID",
                        help="run only this point (commit:<process>.<k> or call:<n>:before|after); repeatable")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="run every K-th point only")
    parser.add_argument("--seed", type=int, default=0, help="with --every: which point to start from (seed %% K)")
    parser.add_argument("--jobs", type=int, default=2, help="points run side by side (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory, not only failed ones")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    began = time.monotonic()
    certificates = make_certificates(tempfile.mkdtemp(prefix="crash-certs-"))
    if args.point:
        chosen = [points.parse(text) for text in args.point]
    else:
        found, problems, seconds, kept = run.count(certificates, args.keep)
        print(f"story: {len(STEPS)} steps, run once without a kill in {seconds:.1f} s: {len(found)} crash points "
              f"({sum(p.kind == points.COMMIT for p in found)} commits, "
              f"{sum(p.kind == points.CALL for p in found) // 2} calls to Stark Bank, each before and after)")
        for p in found:
            print(f"  {p.id:<17} {p.label} [{p.step}]")
        if problems:
            print("the story without a kill does not hold: " + "; ".join(problems) + (f" (kept: {kept})" if kept else ""))
            return 1
        chosen = found[args.seed % max(1, args.every)::max(1, args.every)]
    results = []
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) \
            as pool:
        futures = [pool.submit(run.run_point, p, certificates, args.keep) for p in chosen]
        for index, future in enumerate(futures, 1):
            result = future.result()
            results.append(result)
            print(run.line(index, len(chosen), result), flush=True)
    failed = [r for r in results if not r.held]
    drifted = sum(1 for r in results if r.drift)
    print(f"crash points: {len(results)} run, {len(results) - len(failed)} held, {len(failed)} failed "
          f"({drifted} drifted from the run without a kill; {time.monotonic() - began:.0f} s, "
          f"{args.jobs} at a time; load average {os.getloadavg()[1]:.1f} over the last 5 min: the restart times "
          f"count the other processes' CPU too)")
    for r in failed:
        print(f"  rerun alone: make crash POINT={r.point.id}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
