"""Kill the service at every durable step of the money path's story, and check what must hold after.

    make crash                              # every point, on SQLite then PostgreSQL
    make crash POINT=call:12:before         # one point, alone (postgres:call:12:before on PostgreSQL)
    PYTHONPATH=tests .venv/bin/python -m crashpoints --backend sqlite --every 10 --seed 3 --jobs 1

First runs the story once without a kill on each backend and lists its crash points
(each durable commit of the service, and each call to Stark Bank twice: before and
after Stark Bank carried it out), then runs it once per point: the service is killed
there with SIGKILL, started again, left to settle, and the invariants are checked
against the emulator's ledger. SQLite runs in a file of each run's own; PostgreSQL in a
throwaway server (tests/support/postgres.py), an empty schema per run. One line per
point, then per backend ``<backend>: crash points: N run, N held, N failed``. Exit
status 0 if every point held, 1 otherwise.
"""

import argparse
import compileall
import concurrent.futures
import importlib.util
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import stark_challenge
from stark_challenge.emulator.certs import make_certificates

from support.postgres import Cluster, find_bindir

from . import points, run
from .story import STEPS

__all__ = ["main"]


def _parser():
    parser = argparse.ArgumentParser(prog="python -m crashpoints", description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", default=[], metavar="ID",
                        help="run only this point ([postgres:]commit:<process>.<k> or "
                             "[postgres:]call:<n>:before|after); repeatable")
    parser.add_argument("--backend", choices=(*points.BACKENDS, "both"), default="both",
                        help="the service's database (default: both)")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="run every K-th point only")
    parser.add_argument("--seed", type=int, default=0, help="with --every: which point to start from (seed %% K)")
    parser.add_argument("--jobs", type=int, default=3, help="points run side by side (default 3: a run mostly "
                                                            "waits on the service and the emulator)")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory, not only failed ones")
    return parser


def postgres_server():
    """Start a throwaway PostgreSQL server; return (it, None), or (None, why it cannot be started)."""
    bindir = find_bindir()
    if bindir is None:
        return None, "PostgreSQL's server binaries are not installed (apt-get install postgresql)"
    if importlib.util.find_spec("psycopg") is None:
        return None, "psycopg, the [postgres] extra, is not installed"
    return Cluster(bindir).start(), None


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        chosen = [points.parse(text) for text in args.point]
    except ValueError as e:
        parser.error(str(e))  # one line, exit 2
    began = time.monotonic()
    # The service's processes are started without writing bytecode (tests/support: child_env), and a
    # few hundred are started: compiled once here, each of them reads it (a quarter of its start's CPU).
    compileall.compile_dir(os.path.dirname(stark_challenge.__file__), quiet=1)
    certificates_dir = tempfile.mkdtemp(prefix="crash-certs-")
    certificates = make_certificates(certificates_dir)
    backends = sorted({p.backend for p in chosen} or (points.BACKENDS if args.backend == "both" else {args.backend}),
                      key=points.BACKENDS.index)
    server = None
    if points.POSTGRES in backends:
        server, why = postgres_server()
        if server is None:
            print(f"cannot run on PostgreSQL: {why}")
            return 1
    try:
        with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            if not chosen:
                chosen = _count(pool, backends, certificates, args, server)
                if chosen is None:
                    return 1
            results = _run_points(pool, chosen, certificates, args, server)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(certificates_dir, ignore_errors=True)
    return _summary(results, backends, args, began)


def _url(server, backend):
    return server.new_url() if backend == points.POSTGRES else None


def _count(pool, backends, certificates, args, server):
    """Run the story once without a kill on each backend (side by side); print each one's points; return
    the points to run (every ``args.every``-th), or None if the story does not hold without a kill."""
    futures = {b: pool.submit(run.count, certificates, args.keep, database_url=_url(server, b)) for b in backends}
    chosen = []
    for backend, future in futures.items():
        found, problems, seconds, kept = future.result()
        print(f"{backend}: the story ({len(STEPS)} steps) run once without a kill in {seconds:.1f} s: "
              f"{len(found)} crash points ({sum(p.kind == points.COMMIT for p in found)} commits, "
              f"{sum(p.kind == points.CALL for p in found) // 2} calls to Stark Bank, each before and after)")
        for p in found:
            print(f"  {p.id:<26} {p.label} [{p.step}]")
        if problems:
            print(f"{backend}: the story without a kill does not hold: " + "; ".join(problems)
                  + (f" (kept: {kept})" if kept else ""))
            return None
        chosen += found[args.seed % max(1, args.every)::max(1, args.every)]
    return chosen


def _run_points(pool, chosen, certificates, args, server):
    """Run each point, ``args.jobs`` at a time; print each one's line as it is known, in order; return the
    Results."""
    futures = [pool.submit(run.run_point, p, certificates, args.keep, database_url=_url(server, p.backend))
               for p in chosen]
    results = []
    for index, future in enumerate(futures, 1):
        results.append(future.result())
        print(run.line(index, len(chosen), results[-1]), flush=True)
    return results


def _summary(results, backends, args, began):
    """Print the summary line of each backend, and the points to rerun alone; return the exit status."""
    for backend in backends:
        mine = [r for r in results if r.point.backend == backend]
        failed = sum(1 for r in mine if not r.held)
        drifted = sum(1 for r in mine if r.drift)
        print(f"{backend}: crash points: {len(mine)} run, {len(mine) - failed} held, {failed} failed "
              f"({drifted} drifted from the run without a kill)")
    failed = [r for r in results if not r.held]
    print(f"crash points: {len(results)} run, {len(results) - len(failed)} held, {len(failed)} failed "
          f"({' and '.join(backends)}; {time.monotonic() - began:.0f} s, {args.jobs} at a time; load average "
          f"{os.getloadavg()[1]:.1f} over the last 5 min: the restart times count the other processes' CPU too)")
    for r in failed:
        print(f"  rerun alone: make crash POINT={r.point.id}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
