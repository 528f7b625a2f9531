"""Timing: the service's clock (aware UTC) and the one backoff every bounded retry waits by.

Every component takes its clock through its constructor (tests pass a fake one);
``utcnow`` is the real one they default to.
"""

import datetime

__all__ = ["utcnow", "backoff"]


def utcnow():
    """Return the current time, timezone-aware UTC."""
    return datetime.datetime.now(datetime.timezone.utc)


def backoff(attempt, base_s, cap_s, rng):
    """Return seconds to wait after failed ``attempt`` (1, 2, ...): exponential, capped, with jitter.

    ``base_s * 2 ** (attempt - 1)``, at most ``cap_s``, then 50-100% of that drawn from
    ``rng`` (one ``rng.random()`` call), so that many waiters do not retry in step.
    """
    return min(cap_s, base_s * 2 ** max(0, attempt - 1)) * (0.5 + rng.random() / 2)
