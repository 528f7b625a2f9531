"""A sample of the crash enumeration (``make crash`` runs every point; see tests/crashpoints).

The story of the money path runs once without a kill on each backend (SQLite and
PostgreSQL, side by side), which must hold every invariant and lists its crash points;
then a few points of each, every k-th from an offset drawn from a seed, are run with the
service killed there, all at once. The seed changes from run to run (so the suite covers
the points over time) and is printed; ``CRASH_SEED=<seed>`` repeats a sample, and a
failure names the point to run alone with ``make crash POINT=<id>``. The restart's time is
printed, not asserted (``make crash`` holds it to 5 s): the suite checks behaviour, not
speed, on a machine it shares.
"""

import concurrent.futures
import os
import random
import sqlite3

import starkbank

from crashpoints import invariants, points, run, story
from support import make_config

SAMPLE = 2  # points per backend per suite run, on top of each backend's run without a kill


def test_a_sample_of_crash_points_holds_every_invariant(emulator_certificates, postgres, tmp_path, capsys):
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(10 ** 6))
    urls = {points.SQLITE: None, points.POSTGRES: postgres.new_url()}
    with concurrent.futures.ThreadPoolExecutor(SAMPLE * len(urls)) as pool:
        counts = {backend: pool.submit(run.count, emulator_certificates, base=str(tmp_path), database_url=url)
                  for backend, url in urls.items()}
        chosen = []
        for backend, counted in counts.items():
            found, problems, _, kept = counted.result()
            assert not problems, f"{backend}: the story without a kill (kept: {kept}): {problems}"
            assert {p.kind for p in found} == {points.COMMIT, points.CALL}
            # PostgreSQL's sample half a stride after SQLite's: the two cover different steps
            chosen += points.sample(found, SAMPLE, seed + (len(found) // SAMPLE // 2 if urls[backend] else 0))
        with capsys.disabled():
            print(f"\ncrash sample: seed {seed} (CRASH_SEED={seed} repeats it): {', '.join(p.id for p in chosen)}")
        runs = [pool.submit(run.run_point, p, emulator_certificates, base=str(tmp_path), timed=False,
                            database_url=postgres.new_url() if p.backend == points.POSTGRES else None)
                for p in chosen]
        results = [r.result() for r in runs]
    with capsys.disabled():
        for index, result in enumerate(results, 1):
            print(run.line(index, len(results), result))
    failed = [r for r in results if not r.held]
    assert not failed, (f"crash sample (seed {seed}): " + "; ".join(
        f"{run.line(1, 1, r)}; rerun it alone: make crash POINT={r.point.id}" for r in failed))


class _Settled:
    """What the invariants read of a run (``story.Run``), over a real emulator and store: a stand-in
    for a settled run, to show that each invariant finds what it is about."""

    def __init__(self, emulator, store):
        self.emu, self._store = emulator, store
        self.alarms = []  # what /status's ALARMS would list

    def rows(self, sql, params=()):
        conn = sqlite3.connect(self._store.path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def config(self):
        return make_config()

    def status_page(self):
        return {"alarms": self.alarms}

    def wait(self, predicate, what, timeout):
        """Settled already: what holds now holds (``story.Run.wait`` polls until a deadline)."""
        if not predicate():
            raise story.StoryStuck(f"{what}: not so")


def test_the_invariants_find_a_credit_paid_twice_a_second_round_and_an_open_transfer_without_alarm(
        emulator, sdk, store, clock):
    tags = ["stark-challenge", "round-0", "batch-s-0-0"]
    made = starkbank.invoice.create([starkbank.Invoice(amount=1000, tax_id="012.345.678-90", name="Arya Stark",
                                                       tags=tags) for _ in range(story.INVOICES)])
    starkbank.invoice.create([starkbank.Invoice(amount=1000, tax_id="012.345.678-90", name="Arya Stark",
                                                tags=["stark-challenge", "round-1", "batch-s-1-0"])])
    paid = emulator.pay(made[0].id)
    receiver = make_config()
    for external_id in ("stark-challenge-inv-1", "stark-challenge-inv-2"):  # one credit, two transfers
        starkbank.transfer.create([starkbank.Transfer(
            amount=paid["amount"] - paid["fee"], external_id=external_id, tags=[f"invoice-{paid['id']}"],
            name=receiver.transfer_name, tax_id=receiver.transfer_tax_id, bank_code=receiver.transfer_bank_code,
            branch_code=receiver.transfer_branch, account_number=receiver.transfer_account,
            account_type=receiver.transfer_account_type)])
    store.add_credit(paid["id"], "e1", paid["amount"], paid["fee"], "stark-challenge-inv-x", clock())

    settled = _Settled(emulator, store)
    problems = invariants.check(settled, 7.5)

    assert any(p.startswith("each credit forwarded once") and "2 transfers moved money" in p for p in problems)
    assert any(p.startswith("one round") and "round-1" in p for p in problems)
    assert any(p.startswith("nothing open without an alarm") and "pending, no alarm in /status" in p for p in problems)
    assert "restart under 5 s: the restart took 7.5 s" in problems
    # The open credit once an alarm names it (its transfer's external id) is open with an alarm.
    settled.alarms = [{"kind": "transfer_open", "subject": "stark-challenge-inv-x", "detail": "", "raised_at": ""}]
    assert not [p for p in invariants.check(settled, 0.1) if p.startswith("nothing open without an alarm")]
