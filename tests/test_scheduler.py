"""scheduler: fixed-rate rounds in a window kept in the store; time is stepped, never slept."""

import datetime
import threading

from stark_challenge.invoicer import Outcome
from stark_challenge.scheduler import Schedule, round_count
from stark_challenge.store import Store

from support import wait_for


class RecordingJob:
    """Stands in for the invoicer: records each round it is asked for and settles it in the store."""

    def __init__(self, store, clock, fail=()):
        self.store, self.clock, self.calls, self.fail = store, clock, [], set(fail)

    def __call__(self, n, due_at):
        self.calls.append((n, due_at))
        if self.store.claim_round(n, due_at, 1, self.clock()) is None:
            return Outcome("done", None)
        if n in self.fail:
            self.fail.discard(n)
            return Outcome("retry", self.clock() + datetime.timedelta(seconds=30))
        self.store.finish_round(n, self.clock())
        return Outcome("issued", None)


def hours(h):
    return h * 3600


def test_round_count_is_those_starting_inside_the_window():
    assert round_count(hours(3), hours(24)) == 8
    assert round_count(hours(3), hours(25)) == 9
    assert round_count(hours(3), hours(2)) == 1
    assert round_count(hours(3), 0) is None


def test_rounds_come_due_at_a_fixed_rate_from_the_first(store, clock):
    job = RecordingJob(store, clock)
    schedule = Schedule(store, job, hours(3), hours(24), clock=clock)
    start = clock()

    assert schedule.run_due() == start + datetime.timedelta(hours=3)
    clock.advance(hours(3) + 7)  # a late timer does not shift later rounds
    assert schedule.run_due() == start + datetime.timedelta(hours=6)
    assert [n for n, _ in job.calls] == [0, 1]
    assert job.calls[1][1] == start + datetime.timedelta(hours=3)


def test_the_window_ends_after_eight_rounds_and_nothing_more_is_issued(store, clock):
    job = RecordingJob(store, clock)
    schedule = Schedule(store, job, hours(3), hours(24), clock=clock)
    for _ in range(12):
        schedule.run_due()
        clock.advance(hours(3))
    assert [n for n, _ in job.calls] == list(range(8))
    assert schedule.run_due() is None
    assert [r.state for r in store.rounds()] == ["issued"] * 8


def test_forever_keeps_going(store, clock):
    job = RecordingJob(store, clock)
    schedule = Schedule(store, job, 60, 0, clock=clock)
    for _ in range(20):
        schedule.run_due()
        clock.advance(60)
    assert [n for n, _ in job.calls] == list(range(20))


def test_restart_mid_window_does_not_reissue_a_round_or_restart_the_window(tmp_path, clock):
    path = str(tmp_path / "s.sqlite3")
    store = Store(path)
    job = RecordingJob(store, clock)
    Schedule(store, job, hours(3), hours(24), clock=clock).run_due()
    clock.advance(hours(4))
    Schedule(store, job, hours(3), hours(24), clock=clock).run_due()
    store.close()

    clock.advance(hours(1))  # 5 h after the start: rounds 0 and 1 are done, round 2 is due at 6 h
    store = Store(path)
    job2 = RecordingJob(store, clock)
    restarted = Schedule(store, job2, hours(3), hours(24), clock=clock)
    assert restarted.run_due() == restarted.due_at(2)
    assert job2.calls == []
    assert restarted.window["started_at"] == clock() - datetime.timedelta(hours=5)
    store.close()


def test_rounds_missed_while_down_are_issued_late_once_each(store, clock):
    job = RecordingJob(store, clock)
    schedule = Schedule(store, job, hours(3), hours(24), clock=clock)
    schedule.run_due()
    clock.advance(hours(10))  # down for rounds 1, 2 and 3
    schedule.run_due()
    schedule.run_due()
    assert [n for n, _ in job.calls] == [0, 1, 2, 3]  # the settled ones are not asked for again
    assert [r.n for r in store.rounds() if r.state == "issued"] == [0, 1, 2, 3]


def test_changed_configuration_does_not_move_the_stored_window(store, clock):
    Schedule(store, RecordingJob(store, clock), hours(3), hours(24), clock=clock).open()
    changed = Schedule(store, RecordingJob(store, clock), 60, 0, clock=clock)
    assert changed.open()["interval_s"] == hours(3)
    assert changed.total_rounds() == 8


def test_a_round_asking_for_a_retry_is_run_again_at_that_time(store, clock):
    job = RecordingJob(store, clock, fail={0})
    schedule = Schedule(store, job, hours(3), hours(24), clock=clock)
    assert schedule.run_due() == clock() + datetime.timedelta(seconds=30)
    clock.advance(10)
    schedule.run_due()
    assert len(job.calls) == 1  # not yet
    clock.advance(20)
    schedule.run_due()
    assert [n for n, _ in job.calls] == [0, 0]
    assert store.round(0).state == "issued"


def test_an_exception_in_a_round_keeps_the_loop_alive(store, clock):
    calls = []

    def broken(n, due_at):
        calls.append(n)
        raise RuntimeError("boom")

    schedule = Schedule(store, broken, hours(3), hours(24), clock=clock)
    next_at = schedule.run_due()
    assert calls == [0] and next_at == clock() + datetime.timedelta(seconds=60)


def test_start_runs_the_first_round_in_the_timer_thread_and_stop_cancels(store, clock):
    threads = []

    def job(n, due_at):
        threads.append(threading.current_thread().name)
        store.claim_round(n, due_at, 1, clock())
        store.finish_round(n, clock())
        return Outcome("issued", None)

    schedule = Schedule(store, job, hours(3), hours(24), clock=clock)
    schedule.start()
    wait_for(lambda: threads, message="round 0")
    schedule.stop(timeout=5)
    assert threads == ["schedule"]
    assert schedule.state()["state"] == "stopped"
    assert schedule.run_due() is None  # stopped: runs nothing
