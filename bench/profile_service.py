"""Run the service under cProfile, every thread included; write the merged stats at exit.

Not part of the service. ``webhook_bench.py`` starts this instead of
``python -m stark_challenge`` when ``BENCH_PROFILE=PATH`` is set::

    BENCH_PROFILE=/tmp/service.prof .venv/bin/python bench/webhook_bench.py
    .venv/bin/python -m pstats /tmp/service.prof    # then: sort tottime / stats 30

``cProfile`` alone sees only the main thread, and the service's work happens in the
HTTP connection threads and the worker, so a profiler is enabled in each new thread
(``threading.setprofile``) and the profiles are merged when the service returns
(SIGTERM). The timer is each thread's CPU clock (``time.thread_time``), so waits
(for a lock, the GIL, a socket, an fsync) do not count: the profile shows what the
CPU did. The profiler's own overhead grows with the number of calls: read the
shares, not the absolute times.

``SIGUSR1`` clears every thread's profile so far: ``webhook_bench.py`` sends it just
before its saturation phase, so the stats show that phase (and the drain after it),
not the start-up and the round of invoices issued before.
"""

import cProfile
import os
import pstats
import signal
import sys
import threading
import time

PROFILES = []
LOCK = threading.Lock()


def _start_in_thread(frame, event, arg):
    sys.setprofile(None)
    profile = cProfile.Profile(time.thread_time)
    with LOCK:
        PROFILES.append(profile)
    profile.enable()


def _clear(signum, frame):
    with LOCK:
        for profile in PROFILES:
            profile.clear()


def main():
    path = os.environ["BENCH_PROFILE"]
    threading.setprofile(_start_in_thread)
    signal.signal(signal.SIGUSR1, _clear)
    from stark_challenge.__main__ import main as service_main

    first = cProfile.Profile(time.thread_time)
    PROFILES.append(first)
    first.enable()
    try:
        status = service_main(sys.argv[1:])
    finally:
        first.disable()
        with LOCK:
            stats = pstats.Stats(first)
            for profile in PROFILES[1:]:
                try:
                    stats.add(profile)
                except TypeError:  # a thread that never returned to the profiler
                    continue
        stats.dump_stats(path)
    return status


if __name__ == "__main__":
    sys.exit(main())
