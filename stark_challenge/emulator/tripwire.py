"""Tripwire: number the API calls, and stop the caller at the n-th one, before or after it is carried out.

For crash tests, which enumerate the moments a client can die instead of picking a few:
the API asks `Tripwire.before` once a call has passed its latency and its injected
faults and is about to be carried out, and `Tripwire.after` once it was carried out
(or answered with its injected error), before the answer leaves. Armed with
``arm(n, phase, action)``, the n-th call runs ``action()`` at that phase; the caller
kills its client there (SIGKILL). A call tripped ``before`` is then dropped without
being carried out (the client died before Stark Bank acted); one tripped ``after``
keeps its effect and its answer is dropped (Stark Bank acted, the client never knew).

Calls are numbered from 1 while counting is on (``pause`` and ``resume`` leave out the
calls a test makes itself), and each number is recorded with the call's kind
(``"POST /v2/transfer"``, ``"GET /v2/transfer/:id"``, ``"GET /v2/transfer?tags"``) and
the moment it was numbered (``time.monotonic``), so that a test can name and order its
crash points. Disarmed, it only counts. It imports nothing
from the service. Thread-safe: one lock around the count, the record and the arming.
"""

import re
import threading
import time
from urllib.parse import parse_qs

__all__ = ["Tripwire", "BEFORE", "AFTER", "call_kind"]

BEFORE = "before"
AFTER = "after"

# Stark Bank's ids are long digit strings; a kind names the route, not the entity.
_ID = re.compile(r"/\d{6,}(?=/|$)")


def call_kind(method, path, query=""):
    """Return a call's kind: method, path with ids as ``:id``, and the query's parameter names."""
    names = sorted(name for name in parse_qs(query, keep_blank_values=True) if name not in ("limit", "cursor"))
    return "%s %s%s" % (method, _ID.sub("/:id", path), "?" + ",".join(names) if names else "")


class Tripwire:
    """The count and record of API calls, and the one armed trip; see the module docstring."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counting = True
        self._calls = []  # (kind, time.monotonic() when numbered) of call n at index n - 1
        self._armed = None  # (n, phase, action)
        self._tripped = None  # (n, phase, kind) once the armed trip ran

    def arm(self, n, phase, action):
        """Run ``action()`` at ``phase`` (BEFORE or AFTER) of call ``n`` (1-based); replaces any armed trip."""
        if phase not in (BEFORE, AFTER):
            raise ValueError("phase must be %r or %r" % (BEFORE, AFTER))
        if not isinstance(n, int) or n < 1:
            raise ValueError("n must be a positive integer")
        with self._lock:
            self._armed = (n, phase, action)

    def disarm(self):
        """Forget the armed trip, if it has not run."""
        with self._lock:
            self._armed = None

    def pause(self):
        """Stop numbering calls (the ones that follow are a test's own) until ``resume``."""
        with self._lock:
            self._counting = False

    def resume(self):
        """Number calls again, going on from the last number."""
        with self._lock:
            self._counting = True

    def calls(self):
        """Return (kind, time.monotonic() when numbered) of each call numbered so far: call n at index n - 1."""
        with self._lock:
            return list(self._calls)

    @property
    def tripped(self):
        """(n, phase, kind) of the trip that ran, or None."""
        with self._lock:
            return self._tripped

    def before(self, method, path, query=""):
        """Number a call about to be carried out; return its ticket for ``after``, or None to drop it unperformed."""
        with self._lock:
            if not self._counting:
                return 0
            kind = call_kind(method, path, query)
            self._calls.append((kind, time.monotonic()))
            n = len(self._calls)
            action = self._take(n, BEFORE, kind)
        if action is None:
            return n
        action()
        return None

    def after(self, ticket):
        """Mark the call of ``ticket`` carried out; return True if its answer must be dropped."""
        if not ticket:
            return False
        with self._lock:
            action = self._take(ticket, AFTER, self._calls[ticket - 1][0])
        if action is None:
            return False
        action()
        return True

    def _take(self, n, phase, kind):
        """Return the armed action if it is for call n at phase (it is then used up), else None; lock held."""
        if self._armed is None or self._armed[:2] != (n, phase):
            return None
        action, self._armed = self._armed[2], None
        self._tripped = (n, phase, kind)
        return action
