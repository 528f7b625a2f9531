"""Crash points: the durable steps of one run of the story, each a moment to kill the service at.

A point is either a durable commit (the k-th of the service's n-th process, numbered by
``seam.py``; the process dies as the commit returns) or a call to Stark Bank (the n-th
the emulator's tripwire numbered; the process dies just before Stark Bank carries it out,
or just after, before the answer reaches it). ``enumerate_points`` lists them from a run
of the story without a kill, in the order they happened, each with the story step it
belongs to. A point's ``id`` (``commit:2.5``, ``call:12:before``; ``postgres:commit:2.5``
for the run on PostgreSQL) is all it takes to run it again alone.
"""

import bisect
import os
import re
from typing import NamedTuple

__all__ = ["Point", "enumerate_points", "parse", "sample", "SQLITE", "POSTGRES", "BACKENDS"]

COMMIT, CALL = "commit", "call"
BEFORE, AFTER = "before", "after"
SQLITE, POSTGRES = "sqlite", "postgres"
BACKENDS = (SQLITE, POSTGRES)
_ID = re.compile(r"(?:(postgres|sqlite):)?(?:commit:(\d+)\.(\d+)|call:(\d+):(before|after))")


class Point(NamedTuple):
    """One moment to kill the service at."""

    kind: str  # COMMIT or CALL
    launch: int  # COMMIT: which service process of the run (1-based); CALL: 0
    n: int  # COMMIT: its k-th durable commit; CALL: the run's n-th call to Stark Bank
    phase: str  # CALL: BEFORE or AFTER Stark Bank carried it out; COMMIT: AFTER it is on disk
    label: str = ""  # what the run without a kill saw there: "insert event", "POST /v2/transfer"
    process: str = ""  # COMMIT: the process's name ("service", "transfers retry")
    step: str = ""  # the story step it happened in
    at: float = 0.0  # time.monotonic() when it happened, in the run without a kill
    backend: str = SQLITE  # the service's database: SQLITE or POSTGRES

    @property
    def id(self):
        """The point's name on the command line: ``commit:2.5`` or ``call:12:before`` on SQLite,
        ``postgres:commit:2.5`` on PostgreSQL."""
        name = f"commit:{self.launch}.{self.n}" if self.kind == COMMIT else f"call:{self.n}:{self.phase}"
        return name if self.backend == SQLITE else f"{self.backend}:{name}"

    def describe(self):
        """Say what is killed, for a person."""
        if self.kind == COMMIT:
            return (f"{self.process or 'process'} {self.launch}: commit {self.n} ({self.label or '?'}), "
                    "killed once durable")
        when = "before Stark Bank carried it out" if self.phase == BEFORE else "after Stark Bank carried it out"
        return f"call {self.n} {self.label or '?'}, killed {when}"


def parse(text):
    """Return the Point named by ``text`` (its label and step unknown); raise ValueError if malformed."""
    match = _ID.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a crash point: [postgres:]commit:<process>.<k> or "
                         "[postgres:]call:<n>:before|after")
    backend = match.group(1) or SQLITE
    if match.group(2):
        return Point(COMMIT, int(match.group(2)), int(match.group(3)), AFTER, backend=backend)
    return Point(CALL, 0, int(match.group(4)), match.group(5), backend=backend)


def enumerate_points(run):
    """Return the crash points of a finished run of the story (``story.Run``), oldest first."""
    points = []
    backend = run.backend
    for n, (kind, at) in enumerate(run.emu.tripwire.calls(), 1):
        points += [Point(CALL, 0, n, BEFORE, kind, at=at, backend=backend),
                   Point(CALL, 0, n, AFTER, kind, at=at, backend=backend)]
    for launch in range(1, run.launches + 1):
        path = run.commit_log(launch)
        if not os.path.exists(path):
            continue
        with open(path) as log:
            for line in log:
                k, at, label = line.rstrip("\n").split(" ", 2)
                points.append(Point(COMMIT, launch, int(k), AFTER, label, run.processes[launch], at=float(at),
                                    backend=backend))
    points.sort(key=lambda p: (p.at, p.phase == AFTER))
    started = [at for at, _ in run.step_started]
    return [p._replace(step=run.step_started[max(0, bisect.bisect_right(started, p.at) - 1)][1]) for p in points]


def sample(points, size, seed):
    """Return every k-th point from an offset the seed picks, k such that about ``size`` are taken."""
    if not points:
        return []
    k = max(1, len(points) // max(1, size))
    return points[seed % k::k][:size]
