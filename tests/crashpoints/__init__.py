"""Crash points enumerated, not sampled: the service killed at every durable step of the money path.

``make crash`` (``python -m crashpoints``, with ``tests`` on the path) runs the money path's
story (``story.STEPS``) once without a kill to list its crash points (``points``): every
commit the service's store makes durable, numbered from outside the package by
``seam.py``, and every call to Stark Bank, numbered by the emulator's tripwire, twice:
killed before Stark Bank carries it out, and after, before the answer arrives. Then it
runs the story once per point with the service killed there by SIGKILL, starts it
again, waits until everything settled (following the alarms as an operator would) and
checks ``invariants.INVARIANTS`` against the emulator's ledger (``run``). All of it on
SQLite and on PostgreSQL. ``tests/test_crash_points.py`` runs a seeded sample of the
points of each backend in the suite.

Modules: ``story`` (the steps, and the run they act on), ``points`` (naming and listing
points), ``invariants`` (what must hold), ``run`` (one run per point, and its line of
output), ``seam`` (the launcher that numbers commits), ``__main__`` (the command line).
"""
