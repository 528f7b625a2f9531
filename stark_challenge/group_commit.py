"""Group commit: rows handed in by concurrent callers go to the database together, in one transaction.

The store's ``add_event`` uses it. While one commit is under way, the rows other
callers hand in wait; the first of them leads the next commit and takes all of them
(one fsync, one round trip for all), and every caller still returns only once its
own row is committed, with its own answer. A caller that knows more rows are on
their way (webhooks whose signatures are being checked) says so, and its commit waits
for them, at most ``GROUP_WAIT_S``.

It never runs SQL itself: ``commit(rows)`` (the store's) inserts a group in one
transaction and returns one answer per row, or raises StoreError for all of them.

Threads: any number of callers. The leader waits for joiners outside the store's
lock (so the worker is not held up), then takes the store's lock for the commit;
each other caller waits on a lock of its own until the leader has its answer.
"""

import threading

from .errors import StoreError

__all__ = ["GroupCommit", "GROUP_WAIT_S"]

# The longest a commit waits for the rows its caller said are on their way.
GROUP_WAIT_S = 0.002


class _Waiting:
    """A row handed to ``GroupCommit.submit``, until the commit that holds it is done."""

    __slots__ = ("row", "answer", "error", "done", "committed")

    def __init__(self, row):
        self.row = row
        self.answer = None  # what commit() answered for this row
        self.error = None  # the StoreError of a commit that failed
        self.done = False  # set, under the store's lock, once its commit succeeded or failed
        self.committed = threading.Lock()  # held until then: its caller, if not the leader, waits on it
        self.committed.acquire()


class GroupCommit:
    """Commits the rows of concurrent callers in groups. See the module docstring."""

    def __init__(self, store_lock, commit, name):
        self._store_lock = store_lock  # held for the length of each commit
        self._commit = commit  # (rows) -> [answer per row], one transaction; raises StoreError
        self._name = name  # the database, for error messages
        self._waiting = []  # rows handed in and not yet committed (_Waiting)
        # Guards _waiting and _leading; the leader of a group waits on it for rows to join.
        self._joined = threading.Condition(threading.Lock())
        self._leading = False  # a caller is gathering _waiting for its commit

    def pending(self):
        """Return how many rows wait for a commit (for tests and metrics)."""
        with self._joined:
            return len(self._waiting)

    def submit(self, row, coming=0):
        """Hand ``row`` in; return its answer once the commit that holds it is done.

        ``coming``: how many other rows callers are about to hand in; the commit waits
        for them, at most ``GROUP_WAIT_S``. Raise StoreError if that commit failed.
        """
        waiting = _Waiting(row)
        with self._joined:
            self._waiting.append(waiting)
            following = self._leading  # a commit is being gathered: this row goes with it
            if following:
                self._joined.notify()  # the leader waits on _joined for its group to fill
            else:
                # Lead the next commit: wait (outside the store's lock) for the rows said
                # to be coming, at most GROUP_WAIT_S.
                self._leading = True
                self._joined.wait_for(lambda: len(self._waiting) > coming, GROUP_WAIT_S if coming else 0)
        if following:
            waiting.committed.acquire()  # released by the leader once the group's commit is done
        else:
            with self._store_lock:
                with self._joined:
                    group, self._waiting, self._leading = self._waiting, [], False
                try:
                    self._commit_group(group)  # marks every row done, committed or failed
                finally:
                    for other in group:
                        if other is not waiting:
                            other.committed.release()
        if waiting.error is not None:
            raise waiting.error
        return waiting.answer

    def _commit_group(self, group):
        """Commit the rows of ``group`` in one transaction; mark each done, with its answer or the error."""
        error = None
        try:
            for waiting, answer in zip(group, self._commit([w.row for w in group])):
                waiting.answer = answer
        except StoreError as e:
            error = e
        except BaseException as e:  # no caller may wait for an answer that never comes
            error = StoreError(f"{self._name}: rows not stored ({type(e).__name__})")
            raise
        finally:
            for waiting in group:
                waiting.error, waiting.done = error, True
