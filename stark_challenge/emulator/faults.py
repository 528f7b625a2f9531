"""Injected API failures: answer the next N matching calls with an error, or drop them.

Four kinds of rule, matched by HTTP method and path prefix (query string ignored), each
used up after `count` matching calls, oldest rule first:

- fail: answer `status` (default 500) without doing anything;
- drop ("fail after"): do the work, then close the connection without answering. The
  client sees a connection error and cannot know the write happened: the ambiguous
  failure a timeout produces.
- fail after: do the work, then answer `status` (default 500) as if it had failed: a
  server error that hides a write it made.
- slow ("answer late"): wait `delay_s`, then do the work and answer as usual, whether or
  not the client is still there: with a delay above the client's timeout, the client
  gives up while Stark Bank carries the call out (a real timeout).

Thread-safe: one lock around the rules.
"""

import threading

__all__ = ["Faults", "FAIL", "DROP", "FAIL_AFTER", "SLOW"]

FAIL = "fail"
DROP = "drop"
FAIL_AFTER = "fail_after"
SLOW = "slow"


class Faults:
    """A list of pending failure rules; `take` consumes the first that matches."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rules = []  # [kind, method, path prefix, remaining count, status, delay_s]

    def add(self, kind, method, path_prefix, count=1, status=500, delay_s=0.0):
        """Add a rule for the next count calls of method on paths starting with path_prefix."""
        if kind not in (FAIL, DROP, FAIL_AFTER, SLOW):
            raise ValueError("kind must be %r, %r, %r or %r" % (FAIL, DROP, FAIL_AFTER, SLOW))
        if not isinstance(delay_s, (int, float)) or not 0 <= delay_s <= 3600:
            raise ValueError("delay_s must be seconds from 0 to 3600")
        if not isinstance(count, int) or count < 1:
            raise ValueError("count must be a positive integer")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        with self._lock:
            self._rules.append([kind, method.upper(), path_prefix, count, status, delay_s])

    def clear(self):
        """Forget every rule not used up yet."""
        with self._lock:
            self._rules.clear()

    def take(self, method, path):
        """Consume one use of the first rule matching this call; return (kind, status) or None.

        For a SLOW rule, the second item is the delay in seconds."""
        with self._lock:
            for rule in self._rules:
                kind, rule_method, prefix, _, status, delay_s = rule
                if rule_method == method and path.startswith(prefix):
                    rule[3] -= 1
                    if rule[3] == 0:
                        self._rules.remove(rule)
                    return kind, (delay_s if kind == SLOW else status)
        return None
