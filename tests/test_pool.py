"""pool: handler threads reused last-freed first, ended when idle, bounded, and drained on stop."""

import threading
import time

from stark_challenge.memory import Trimmer
from stark_challenge.pool import Pool
from support import wait_for


class Recorder:
    """A pool's ``run``: records which thread ran each item; items named in ``hold`` wait for ``release``."""

    def __init__(self, hold=()):
        self.ran = []  # (item, thread name)
        self.hold = set(hold)
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, item):
        if item in self.hold:
            self.release.wait(10)
        with self.lock:
            self.ran.append((item, threading.current_thread().name))

    def items(self):
        with self.lock:
            return [item for item, _ in self.ran]


def stop(pool):
    assert pool.stop(time.monotonic() + 10, time.monotonic)


def test_an_idle_thread_ends_and_the_next_item_starts_another():
    run = Recorder()
    pool = Pool(4, run, idle_s=0.05)
    try:
        assert pool.offer("a")
        wait_for(lambda: run.items() == ["a"], message="a run")
        wait_for(lambda: pool.threads == [], message="the idle thread to end")
        assert pool.offer("b")
        wait_for(lambda: run.items() == ["a", "b"], message="b run")
        assert run.ran[0][1] != run.ran[1][1]  # a new thread: the first one ended
    finally:
        stop(pool)


def burst(pool, run):
    """Offer the three items ``run`` holds at once (three threads), then let them all run."""
    for item in ("h0", "h1", "h2"):
        assert pool.offer(item)
    wait_for(lambda: len(pool.threads) == 3, message="three threads")
    run.release.set()
    wait_for(lambda: len(run.items()) == 3, message="the burst run")


def test_a_bursts_extra_threads_end_once_idle():
    run = Recorder(hold={"h0", "h1", "h2"})
    pool = Pool(4, run, idle_s=0.05)
    try:
        burst(pool, run)
        wait_for(lambda: pool.threads == [], message="every idle thread to end")
    finally:
        stop(pool)


def test_the_thread_freed_last_takes_the_next_item():
    run = Recorder(hold={"h0", "h1", "h2"})
    pool = Pool(4, run, idle_s=30)
    try:
        burst(pool, run)
        for n in range(5):  # one at a time: the same thread takes each, the others stay cold
            wait_for(lambda: len(pool._idle) == 3, message="every thread idle")
            assert pool.offer(f"s{n}")
            wait_for(lambda: len(run.items()) == 4 + n, message=f"s{n} run")
        assert len({name for item, name in run.ran if item.startswith("s")}) == 1
        assert len(pool.threads) == 3
    finally:
        stop(pool)


def test_the_pool_is_bounded_and_stop_runs_what_was_offered():
    run = Recorder(hold={"h0", "h1"})
    pool = Pool(2, run, idle_s=30)
    assert all(pool.offer(item) for item in ("h0", "h1", "w0", "w1"))  # two running, two waiting
    wait_for(lambda: len(pool.threads) == 2, message="two threads")
    assert not pool.offer("refused")  # every thread busy and as many items waiting
    run.release.set()
    stop(pool)
    assert sorted(run.items()) == ["h0", "h1", "w0", "w1"] and pool.threads == []
    assert not pool.offer("after stop")


def test_the_trimmer_trims_at_most_once_per_period():
    now = [100.0]
    trimmer = Trimmer(every_s=60, monotonic=lambda: now[0])
    if not trimmer.available:  # not glibc: nothing to trim
        assert not trimmer.run_if_due()
        return
    assert not trimmer.run_if_due()  # not at start: the first period starts with the process
    now[0] += 60
    assert trimmer.run_if_due() and not trimmer.run_if_due()
    now[0] += 59
    assert not trimmer.run_if_due()
    now[0] += 1
    assert trimmer.run_if_due() and trimmer.trims == 2
