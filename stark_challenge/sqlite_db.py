"""SQLite connections for the store: open one database file privately and run its transactions.

Owns the file side of the embedded backend: the database and its side files made
private (0600), the advisory lock file that keeps a second service process away
(two schedulers on one file would issue a round twice), the pragmas (WAL,
``synchronous=FULL``, foreign keys), the read-only opening used by ``status`` while
the service runs, and SQLite's errors turned into ``StoreError``. It runs no SQL of
the service's tables: the verbs and the schema are ``store``'s.

Threads: one connection, opened with ``check_same_thread=False``; the store
serialises its use behind its own lock. Writes from other processes wait on the
busy timeout.
"""

import fcntl
import os
import sqlite3
import urllib.parse

from .errors import StoreError, StoreLocked

__all__ = ["SqliteDatabase", "SIDE_FILES"]

# Seconds a writer waits for another process's lock before SQLite gives up.
BUSY_TIMEOUT_S = 5.0
# SQLite's page cache, per connection, in KiB. The service holds one connection (``status``
# opens its own, in its own process), so this is the most the cache can take of its memory,
# however large the database grows. Set here rather than left to the library's build.
CACHE_KIB = 2048
# After a checkpoint the write-ahead log is cut back to this, so a burst of writes does
# not leave a large file behind for good.
WAL_LIMIT_BYTES = 4 * 1024 * 1024

# SQLite creates these next to the database, with the database file's mode; the
# advisory lock file is ours. All hold or reveal payers' names and tax ids.
SIDE_FILES = ("-wal", "-shm", "-journal", ".lock")


class SqliteDatabase:
    """One SQLite file, as the store uses it: ``execute``, ``begin``/``commit``/``rollback``.

    Every method raises StoreError (never ``sqlite3.Error``) naming the file.
    """

    kind = "sqlite"
    # One writer at a time (``begin immediate``): a claim needs no row lock to be exclusive.
    skip_locked = ""
    locked = ""

    def __init__(self, path, exclusive=True, read_only=False):
        """Open (creating if needed) the database at ``path``; with ``read_only``, open it to read.

        With ``exclusive``, hold an advisory lock on ``path + ".lock"`` until ``close``,
        so two service processes can never run on one file; raise StoreLocked if it is
        taken. Raise StoreError if the file cannot be opened. ``read_only``: see
        ``_open_read_only``.
        """
        self.name = path
        self.read_only = read_only
        self._lock_file = None
        self.connection = None
        if read_only:
            self.connection = _open_read_only(path)
            return
        try:
            _make_private(path, SIDE_FILES)
            if exclusive:
                self._lock_file = os.fdopen(os.open(path + ".lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")
                try:
                    fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._lock_file.close()
                    self._lock_file = None
                    raise StoreLocked(f"{path}: another stark_challenge process is using this database") from None
            self.connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self.connection.row_factory = sqlite3.Row
            # journal_mode cannot change inside a transaction: set it before any.
            self.connection.execute("pragma journal_mode = wal")
            self.connection.execute("pragma synchronous = full")
            self.connection.execute("pragma foreign_keys = on")
            self.connection.execute(f"pragma cache_size = -{CACHE_KIB}")  # negative: KiB, not pages
            self.connection.execute(f"pragma journal_size_limit = {WAL_LIMIT_BYTES}")
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"{path}: cannot open the database ({e})") from None
        except OSError as e:
            self.close()
            raise StoreError(f"{path}: cannot open the database ({e.strerror})") from None

    def close(self):
        """Close the connection and release the lock file. Idempotent."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _conn(self):
        if self.connection is None:
            raise StoreError(f"{self.name}: the database is closed")
        return self.connection

    def execute(self, sql, params=()):
        """Run one statement (``?`` placeholders); return the cursor."""
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"{self.name}: {e}") from e

    def executemany(self, sql, rows):
        """Run one statement once per row of parameters; return the cursor."""
        try:
            return self._conn().executemany(sql, rows)
        except sqlite3.Error as e:
            raise StoreError(f"{self.name}: {e}") from e

    def begin(self):
        """Start a transaction: a write one (the file's write lock taken now), or a snapshot when read-only."""
        try:
            self._conn().execute("begin" if self.read_only else "begin immediate")
        except sqlite3.Error as e:
            raise StoreError(f"{self.name}: cannot start a transaction ({e})") from e

    def commit(self):
        self.execute("commit")

    def rollback(self):
        """Roll the open transaction back; nothing happens if none is open."""
        if self.connection is not None:
            self.connection.rollback()

    def lock_schema(self):
        """Nothing to do: ``begin immediate`` already keeps other writers out of the schema's transaction."""

    def notify(self):
        """Nothing to do: one process works on a file, and its worker is woken in-process."""

    def listen(self, on_notify):
        """Return None: nothing to listen to (see ``notify``)."""
        return None

    def has_table(self, name):
        """Return True if the database holds a table called ``name``."""
        return self.execute("select 1 from sqlite_master where type = 'table' and name = ?",
                            (name,)).fetchone() is not None


def _make_private(path, side_files):
    """Create the database file at ``path`` with mode 0600 unless it exists; narrow it and its side files to 0600.

    Explicit, not left to the umask: outside systemd (whose unit sets UMask=0077) the
    usual umask 022 would leave payers' names and tax ids readable by every local user.
    SQLite gives the -wal and -shm files it creates the database file's mode. Files
    owned by another user are left as they are. Raise OSError if ``path`` cannot be created.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _narrow(fd)
    finally:
        os.close(fd)
    for suffix in side_files:
        try:
            fd = os.open(path + suffix, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            _narrow(fd)
        finally:
            os.close(fd)


def _narrow(fd):
    st = os.fstat(fd)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, 0o600)


def _open_read_only(path):
    """Return a read-only connection to the database at ``path`` (safe while the service runs).

    Nothing is written, and no file is created: while the service runs, its ``-wal``
    and ``-shm`` files exist and a ``mode=ro`` connection reads through them without
    blocking the writer (WAL). When they do not exist, the service is stopped and
    every write is in the main file; a ``mode=ro`` open would then create the two
    files, owned by whoever runs ``status`` (root, say), and the service's own user
    could not write them at its next start, so the file is opened ``immutable``.
    Raise StoreError if the file does not exist or is not a database.
    """
    if not os.path.exists(path):
        raise StoreError(f"{path}: no such database (set DATABASE_PATH)")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    if not os.path.exists(path + "-wal"):
        uri += "&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("select count(*) from schedule").fetchone()
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot read the database ({e})") from None
    return conn
