"""In-memory rows of one kind and the ids they carry: the emulator's storage.

`Table` keeps rows by id in creation order, each with a sequence number that the API's
paging cursors use. `Ids` draws fresh 16-digit ids, never repeated, from a seeded
random.Random. Neither locks: `Table` is used under the ledger's lock; `Ids` has its own
lock because workspaces share one.
"""

import itertools
import threading

__all__ = ["Table", "Ids"]


class Table:
    """Rows by id in creation order, each with a sequence number for paging cursors."""

    def __init__(self):
        self._rows = {}
        self._sequence = {}
        self._counter = itertools.count(1)

    def add(self, row):
        self._rows[row["id"]] = row
        self._sequence[row["id"]] = next(self._counter)

    def get(self, row_id):
        return self._rows.get(row_id)

    def remove(self, row_id):
        self._sequence.pop(row_id, None)
        return self._rows.pop(row_id, None)

    def rows(self):
        return [(self._sequence[row_id], row) for row_id, row in self._rows.items()]


class Ids:
    """Fresh 16-digit ids drawn from a random.Random, never repeated; shared by workspaces; thread-safe."""

    def __init__(self, id_random):
        self._random = id_random
        self._used = set()
        self._lock = threading.Lock()

    def new(self):
        with self._lock:
            while True:
                new = str(self._random.randrange(10 ** 15, 10 ** 16))
                if new not in self._used:
                    self._used.add(new)
                    return new
