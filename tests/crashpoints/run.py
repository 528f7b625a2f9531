"""Running the story: once without a kill to count its crash points, then once per point with the kill.

``count`` runs the whole story, checks the invariants on its end state (the story must
hold without any crash first) and returns its points. ``run_point`` runs the story up to
one point, where the service is killed with SIGKILL, then does what a supervisor and
Stark Bank would: the emulator stops holding webhooks and its unused faults are
forgotten, the service is started again (the plain one, no seam, with ``AFTER_CRASH``'s
settings: alarms raised within seconds), and once everything has settled the invariants
are checked. A run is on SQLite, or on PostgreSQL when given a ``database_url`` (an empty
schema). ``line`` formats a result as the output's line.
"""

import contextlib
import os
import shutil
import tempfile
import time
from typing import NamedTuple, Optional

from . import invariants, points
from .story import AFTER_CRASH, DELIVERY_ATTEMPTS, STEPS, Crashed, Run, StoryStuck

__all__ = ["Result", "count", "run_point", "line"]

SETTLE_S = 60.0  # the longest the service may take to settle after its restart
STABLE_S = 0.1  # settled means nothing moved for this long


class Result(NamedTuple):
    """What happened at one crash point."""

    point: points.Point
    restart_s: Optional[float]  # from the restart to /health answering 200
    settle_s: Optional[float]  # from the restart to everything settled
    problems: tuple  # invariants broken, or what went wrong on the way
    kept: Optional[str]  # the run's directory (service log, database), kept when it failed
    drift: Optional[str] = None  # what differed from the run without a kill at this point, if anything

    @property
    def held(self):
        return not self.problems


def _run_steps(run):
    for step in STEPS:
        run.step_started.append((time.monotonic(), step.name))
        step.act(run)


def count(certificates, keep=False, base=None, database_url=None):
    """Run the story without a kill; return (its points, problems found at its end, seconds, kept directory).

    The directory (service log, database, commit logs; made under ``base``, default the system's
    temporary folder) is kept when something is wrong, or with ``keep``. ``database_url``: the
    service's database is that PostgreSQL one (an empty schema), not a SQLite file.
    """
    began = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="crash-count-", dir=base)
    problems = []
    with Run(workdir, certificates, database_url=database_url) as run:
        try:
            _run_steps(run)
            run.quiet()
            problems = invariants.check(run, None)
        except (Crashed, StoryStuck, AssertionError) as e:
            problems = [f"the story without a kill: {e}"]
        found = points.enumerate_points(run)
    kept = workdir if problems or keep else None
    if kept is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return found, problems, time.monotonic() - began, kept


def run_point(point, certificates, keep=False, base=None, timed=True, database_url=None):
    """Run the story with the service killed at ``point``; return its Result (directory, and
    ``database_url``, which a point on PostgreSQL needs: see ``count``; ``timed``: see ``invariants.check``)."""
    workdir = tempfile.mkdtemp(prefix="crash-point-", dir=base)
    restart_s = settle_s = None
    drift = None
    commit_kill = (point.launch, point.n) if point.kind == points.COMMIT else None
    with Run(workdir, certificates, commit_kill=commit_kill, database_url=database_url) as run:
        if point.kind == points.CALL:
            run.emu.tripwire.arm(point.n, point.phase, run.kill)
        try:
            problems = _crash(run, point)
            point, drift = _as_seen(run, point)
            if not problems:
                restart_s = _recover(run)
                began = time.monotonic() - restart_s
                run.wait(_settled(run), "everything to settle", SETTLE_S)
                if _follow_alarms(run):
                    run.wait(_settled(run), "everything to settle after the operator's retries", SETTLE_S)
                settle_s = time.monotonic() - began
                problems = invariants.check(run, restart_s, timed)
        except (Crashed, StoryStuck, AssertionError) as e:
            problems = [f"after the restart: {e}"]
    kept = workdir if problems or keep else None
    if kept is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return Result(point, restart_s, settle_s, tuple(problems), kept, drift)


def _crash(run, point):
    """Run the story until the kill; return what went wrong (nothing if the kill came at ``point``)."""
    try:
        _run_steps(run)
        run.stop_service()  # a kill at the story's last commit may land after the story saw its effect
    except Crashed:
        pass
    except (StoryStuck, AssertionError) as e:
        return [f"before the kill: {e}"]
    else:
        return ["the story ended without reaching this point: the story is not deterministic"]
    return _killed_where_expected(run, point)


def _killed_where_expected(run, point):
    """Return [] if the service died at ``point``, else what happened instead."""
    if point.kind == points.CALL:
        return [] if run.emu.tripwire.tripped else ["the service died, but not at the armed call"]
    if run.launches != point.launch:
        return [f"the service died in its process {run.launches}, not {point.launch}"]
    if len(_commits(run, point.launch)) != point.n:
        return [f"the service died after {len(_commits(run, point.launch))} commits, not at commit {point.n}"]
    return []


def _commits(run, launch):
    """Return the labels of the durable commits process ``launch`` of the run made."""
    if not os.path.exists(run.commit_log(launch)):
        return []
    with open(run.commit_log(launch)) as log:
        return [line.split(" ", 2)[2] for line in log.read().splitlines()]


def _as_seen(run, point):
    """Return ``point`` as this run saw it where it died (label, process, step), and a note if the run
    without a kill saw something else there (a drift: the story did not repeat itself exactly), or None."""
    step = run.step_started[-1][1] if run.step_started else ""
    if point.kind == points.CALL:
        tripped = run.emu.tripwire.tripped
        label = tripped[2] if tripped else ""
    else:
        commits = _commits(run, point.launch)
        label = commits[-1] if commits else ""
    drift = None
    if point.label and label != point.label:
        drift = f"here the run without a kill saw {point.label}, this one {label}"
    seen = point._replace(label=label or point.label, step=point.step or step,
                          process=point.process or run.processes.get(point.launch, ""))
    return seen, drift


def _recover(run):
    """Let the emulator behave as Stark Bank again, run again a command that was killed (as its operator
    would), and start the service; return seconds from its start to /health answering 200."""
    run.emu.tripwire.disarm()
    run.emu.clear_faults()
    run.emu.answer_held_calls()
    run.emu.set(hold_deliveries=False, deliver_times=1, transfer_fail_ratio=0.0,
                delivery_attempts=DELIVERY_ATTEMPTS)
    run.proc = None
    if run.processes[run.launches] != "service":
        status = run.run_command(*run.last_command, seam=False)
        if status not in (0, 2):  # 2: refused, what the killed one did is already queued
            raise StoryStuck(f"{' '.join(run.last_command)} run again exited {status}")
    return run.start_service(seam=False, settings=AFTER_CRASH)


def _follow_alarms(run):
    """Do what the operator does for a credit whose every attempt failed (Stark Bank's ledger says which):
    wait for its alarm in /status (``credit_failed``, at most ``invariants.ALARM_WAIT_S``) and run
    ``transfers retry`` for it, as the alarm says; return True if a retry was run. A credit left without
    an alarm is not retried: the invariants report it."""
    stuck = invariants.stuck(run)
    if not stuck:
        return False

    def alarmed():
        return stuck & {a["subject"] for a in run.status_page()["alarms"] if a["kind"] == "credit_failed"}
    with contextlib.suppress(StoryStuck):
        run.wait(lambda: alarmed() == stuck, "an alarm for each stuck credit", invariants.ALARM_WAIT_S)
    found = alarmed()
    for invoice_id in sorted(found):
        status = run.run_command("transfers", "retry", invoice_id, seam=False)
        if status != 0:
            raise StoryStuck(f"transfers retry {invoice_id} (its alarm standing) exited {status}")
    return bool(found)


def _settled(run):
    """Return a predicate: True once the worker finished its first pass and nothing has moved for STABLE_S."""
    since = []

    def settled():
        still = (run.health() == "ok" and not run.emu.requests_in_flight and run.emu.idle() and run.is_quiet())
        if not still:
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= STABLE_S
    return settled


def line(index, total, result):
    """Return the output line of one point: step, what was killed, restart and settle times, verdict."""
    p = result.point
    head = f"{index:>4}/{total} {p.id:<17} {p.describe()} [{p.step or '?'}]"
    kept = f" (kept: {result.kept})" if result.kept else ""
    kept += f" (drifted: {result.drift})" if result.drift else ""
    if result.restart_s is None:
        return f"{head}: FAILED: {'; '.join(result.problems)}{kept}"
    times = f"restarted in {result.restart_s:.2f} s, settled in {result.settle_s or 0:.1f} s"
    if result.held:
        return f"{head}: {times}, invariants held{kept}"
    return f"{head}: {times}, FAILED: {'; '.join(result.problems)}{kept}"
