"""A sample of the crash enumeration (``make crash`` runs every point; see tests/crashpoints).

The story of the money path runs once without a kill, which must hold every invariant
and lists its crash points; then a few of them, every k-th from an offset drawn from a
seed, are run with the service killed there. The seed changes from run to run (so the
suite covers the points over time) and is printed; ``CRASH_SEED=<seed>`` repeats a
sample, and a failure names the point to run alone with ``make crash POINT=<id>``.
"""

import os
import random

from crashpoints import points, run

SAMPLE = 2  # points per suite run: about 4 s each, on top of the story's one run without a kill


def test_a_sample_of_crash_points_holds_every_invariant(emulator_certificates, tmp_path, capsys):
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(10 ** 6))
    found, problems, _, kept = run.count(emulator_certificates, base=str(tmp_path))
    assert not problems, f"the story without a kill (kept: {kept}): {problems}"
    assert {p.kind for p in found} == {points.COMMIT, points.CALL}
    chosen = points.sample(found, SAMPLE, seed)
    with capsys.disabled():
        print(f"\ncrash sample: seed {seed} (CRASH_SEED={seed} repeats it): "
              f"{', '.join(p.id for p in chosen)} of {len(found)} points")
    for point in chosen:
        result = run.run_point(point, emulator_certificates, base=str(tmp_path))
        assert result.held, (f"crash point {point.id} (seed {seed}): {run.line(1, 1, result)}; "
                             f"rerun it alone: make crash POINT={point.id}")
