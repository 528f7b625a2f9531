"""Run the service with a commit seam: number its durable commits (SQLite or PostgreSQL), and SIGKILL it at one.

    python tests/crashpoints/seam.py [the service's arguments]

is ``python -m stark_challenge [arguments]`` with one difference, made from outside the
package: every ``sqlite3`` connection the process opens (and every ``psycopg`` one, when
``DATABASE_URL`` is set) is of a subclass that notes the tables each transaction writes and,
when a ``commit`` that wrote something returns (SQLite with ``synchronous=FULL`` in WAL
mode: after the fsync of the WAL; PostgreSQL: once the server answered COMMIT, so the
transaction is durable on the server whatever happens to the process), numbers it and appends
one line to ``CRASH_COMMIT_LOG``: ``<n> <time.monotonic()> <what it wrote>``. With
``CRASH_AT_COMMIT=n``, the process kills itself with SIGKILL as commit n returns: the
transaction is on disk, and nothing the service would do next (answer a webhook, call
Stark Bank, log a line) happens. These two variables are read here, never by the
service, which carries no crash switch of its own.

Why not strace's fault injection (``-e inject=fdatasync:signal=SIGKILL:when=n``): strace
counts per thread, and the service commits from several (webhook handlers, the worker,
the schedule), so the n-th fsync of the process cannot be named that way. Each commit
counted on SQLite ends with one ``fdatasync`` of the WAL (``strace -f -e trace=fdatasync``
shows one per commit, and a few more at the first, which makes the new WAL), and a
transaction that wrote nothing, a read snapshot say, costs no fsync and is not counted.
"""

import os
import re
import runpy
import signal
import sqlite3
import sys
import threading
import time

# The statement kinds that write, and the table each names.
_WRITE = re.compile(r"\s*(insert(?:\s+or\s+\w+)?\s+into|update(?:\s+or\s+\w+)?|delete\s+from|replace\s+into|"
                    r"create\s+(?:unique\s+)?(?:table|index)(?:\s+if\s+not\s+exists)?)\s+(\w+)", re.IGNORECASE)


class _Counter:
    """The process's durable commits: how many, where to note them, and the one to die at."""

    def __init__(self, log_path, kill_at):
        self.lock = threading.Lock()
        self.n = 0
        self.log_path = log_path
        self.kill_at = kill_at

    def committed(self, wrote):
        """Number one durable commit, note it, and SIGKILL the process if it is the one."""
        with self.lock:
            self.n += 1
            if self.log_path:
                with open(self.log_path, "a") as log:
                    log.write("%d %.6f %s\n" % (self.n, time.monotonic(), _label(wrote)))
            if self.n == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)


def _label(wrote):
    """Name a transaction by what it wrote: "insert event; update transfer", or "schema"."""
    rows = [what for what in wrote if not what.startswith("create")]
    return "; ".join(rows) if rows else "schema"


def _connection_class(counter):
    class CountingConnection(sqlite3.Connection):
        """A connection that reports each durable commit to ``counter``."""

        def __init__(self, database, *args, **kwargs):
            super().__init__(database, *args, **kwargs)
            # A new database file: its first transaction (the schema) writes even if no row changes.
            self._fresh = not os.path.exists(database) or os.path.getsize(database) == 0
            self._changes = self.total_changes
            self._wrote = []

        def execute(self, sql, parameters=(), /):
            self._note(sql)
            if sql.strip().lower() != "commit":
                return super().execute(sql, parameters)
            cursor = super().execute(sql, parameters)
            if self.total_changes != self._changes or (self._fresh and self._wrote):
                counter.committed(self._wrote)
                self._fresh = False
            return cursor

        def executemany(self, sql, parameters, /):
            self._note(sql)
            return super().executemany(sql, parameters)

        def _note(self, sql):
            if sql.lstrip()[:5].lower() == "begin":
                self._changes, self._wrote = self.total_changes, []
                return
            _written(self._wrote, sql)

    return CountingConnection


def _written(wrote, sql):
    """Add to ``wrote`` what ``sql`` writes ("insert event"), if it writes."""
    match = _WRITE.match(sql)
    if match:
        what = "%s %s" % (match.group(1).split()[0].lower(), match.group(2))
        if what not in wrote:
            wrote.append(what)


def _postgres_class(counter, psycopg):
    class CountingPgCursor(psycopg.Cursor):
        """A cursor that tells its connection the rows each writing statement changed."""

        def execute(self, query, params=None, **kwargs):
            super().execute(query, params, **kwargs)
            self.connection._ran(query, self.rowcount)
            return self

        def executemany(self, query, params_seq, **kwargs):
            super().executemany(query, params_seq, **kwargs)
            self.connection._ran(query, self.rowcount)  # psycopg sums the rows of every execution

    class CountingPgConnection(psycopg.Connection):
        """A psycopg connection that reports to ``counter`` each commit of a transaction that changed rows,
        as COMMIT returns (the server has made it durable). The store's connections are in autocommit
        mode and run ``begin`` and ``commit`` as statements; every statement, ``Connection.execute`` and
        ``executemany`` alike, goes through a cursor of the connection's ``cursor_factory``."""

        _rows = 0  # rows the open transaction changed
        _wrote = ()

        @classmethod
        def connect(cls, *args, **kwargs):
            kwargs.setdefault("cursor_factory", CountingPgCursor)
            return super().connect(*args, **kwargs)

        def _ran(self, query, rowcount):
            text = query if isinstance(query, str) else ""
            verb = text.strip().lower()
            if verb.startswith("begin") or verb == "rollback":
                self._rows, self._wrote = 0, []
            elif verb == "commit":
                if self._rows:
                    counter.committed(self._wrote)
                self._rows, self._wrote = 0, []
            elif rowcount > 0 and _WRITE.match(text):
                self._rows += rowcount
                _written(self._wrote, text)

    return CountingPgConnection


def install(log_path, kill_at, postgres=False):
    """Make every sqlite3 connection of this process (and every psycopg one, with ``postgres``) count its
    durable commits (see the module docstring)."""
    counter = _Counter(log_path, kill_at)
    counting = _connection_class(counter)
    connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        kwargs.setdefault("factory", counting)
        return connect(*args, **kwargs)

    sqlite3.connect = counting_connect
    if not postgres:
        return
    import psycopg  # only then: it is a tenth of a second of the process's start

    psycopg.connect = _postgres_class(counter, psycopg).connect


if __name__ == "__main__":
    install(os.environ.get("CRASH_COMMIT_LOG"), int(os.environ.get("CRASH_AT_COMMIT") or 0),
            postgres=bool(os.environ.get("DATABASE_URL")))
    sys.path.pop(0)  # this file's folder: the service imports nothing from the harness
    sys.argv[0] = "stark_challenge"
    runpy.run_module("stark_challenge", run_name="__main__", alter_sys=True)
