"""PostgreSQL connections for the store: connect through psycopg 3, run transactions, survive the server's faults.

Owns the server side of the store: ``psycopg`` (the optional ``[postgres]`` extra,
imported here only, and only when a ``DATABASE_URL`` is used), the connection's
timeouts, the one place where the store's ``?`` placeholders become psycopg's
``%s``, result rows readable like ``sqlite3.Row``, and the server's errors turned
into ``StoreError`` (``StoreUnavailable`` when the server or the connection is
gone: restarted, a killed backend, a timeout). It runs no SQL of the service's
tables: the verbs and the schema are ``store``'s.

Faults: a broken connection is dropped, and the next statement or transaction
connects again on its own, at most once per ``RECONNECT_PAUSE_S`` (in between,
StoreUnavailable at once, so handler threads do not queue behind a dead server). A
transaction is never replayed here: its caller got the error and decides.

Every connection sets ``connect_timeout``, ``statement_timeout`` (lock waits
included), ``idle_in_transaction_session_timeout`` and ``tcp_user_timeout``, so a
stuck server or network cannot hang a thread for longer than those.

The URL's password is never in an error or a name this module gives out: ``name``
is the URL with it hidden. Threads: one connection, used behind the store's lock.
"""

import functools
import logging
import threading
import time
import urllib.parse

from .errors import StoreError, StoreUnavailable

__all__ = ["PostgresDatabase", "Listener", "display_url", "is_url", "WORK_CHANNEL"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5  # libpq's connect_timeout: whole seconds
STATEMENT_TIMEOUT_S = 10.0  # any statement, waits for row locks included
IDLE_IN_TRANSACTION_S = 30.0  # a transaction left open by a stuck process releases its locks after this
TCP_USER_TIMEOUT_S = 10.0  # unacknowledged data on a dead network path
RECONNECT_PAUSE_S = 0.5  # after a failed connect, the next attempt waits at least this long
# Key of the transaction-level advisory lock that serialises schema creation and upgrades:
# instances starting together would otherwise race on "create table if not exists".
SCHEMA_LOCK_KEY = 0x5374_6B43  # "StkC"
# Notified in the transaction that queues a transfer, so that every instance's worker wakes.
WORK_CHANNEL = "stark_challenge_work"
LISTEN_POLL_S = 1.0  # how often a listener looks up from its wait, to notice stop()

_SCHEMES = ("postgresql://", "postgres://")


def is_url(location):
    """Return True if ``location`` is a PostgreSQL URL (``postgresql://`` or ``postgres://``)."""
    return isinstance(location, str) and location.startswith(_SCHEMES)


def display_url(url):
    """Return ``url`` with its password (userinfo or ``password=`` parameter) replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hosts}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{k}={'***' if k == 'password' else v}" for k, v in query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@functools.lru_cache(maxsize=1024)
def _translate(sql):
    """Return the store's ``?`` statement in psycopg's style (the store's SQL has no ``?`` in its literals)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Row:
    """A result row read as ``sqlite3.Row`` reads: by position, by column name, ``keys()``, ``dict(row)``."""

    __slots__ = ("_values", "_index")

    def __init__(self, values, index):
        self._values = values
        self._index = index  # column name -> position

    def __getitem__(self, key):
        return self._values[self._index[key] if isinstance(key, str) else key]

    def keys(self):
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor):
    index = {column.name: n for n, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


class PostgresDatabase:
    """One PostgreSQL database, as the store uses it: ``execute``, ``begin``/``commit``/``rollback``.

    Every method raises StoreError (StoreUnavailable for a fault of the server or
    the connection), never a psycopg error.
    """

    kind = "postgres"
    # Several instances claim from one table: each takes the rows no other holds, without waiting.
    skip_locked = " for update skip locked"
    locked = " for update"

    def __init__(self, url, read_only=False, application_name="stark_challenge"):
        """Connect to the database at ``url`` (a libpq URI); with ``read_only``, every transaction only reads.

        Raise StoreError if psycopg is not installed or the URL is not valid,
        StoreUnavailable if the server cannot be reached.
        """
        self.name = display_url(url)
        self.read_only = read_only
        self._url = url
        self._password = urllib.parse.urlsplit(url).password or ""
        self._application_name = application_name
        self.connection = None
        self._next_connect_at = 0.0  # monotonic: no connect attempt before this
        self._in_transaction = False
        self._notify = False  # the open transaction wakes the listeners when it commits
        self._closed = False  # close() was called: never connect again
        try:
            import psycopg
        except ImportError:
            raise StoreError("DATABASE_URL: PostgreSQL needs psycopg, the [postgres] extra "
                             "(pip install 'stark-challenge[postgres]')") from None
        self._psycopg = psycopg
        try:
            self._params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as e:
            raise StoreError(f"DATABASE_URL: not a valid PostgreSQL URL ({self._clean(e)})") from None
        self._connect()

    def _clean(self, error):
        """Return the error's first line with the URL's password hidden, should the server ever quote it."""
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return text.replace(self._password, "***") if self._password else text

    def _options(self):
        options = [self._params.get("options") or "",
                   f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}",
                   f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_S * 1000)}"]
        if self.read_only:
            options.append("-c default_transaction_read_only=on")
        return " ".join(o for o in options if o)

    def open_connection(self):
        """Return a new autocommit psycopg connection with the timeouts set; raise psycopg.Error."""
        return self._psycopg.connect(
            self._url, autocommit=True, row_factory=_row_factory, options=self._options(),
            connect_timeout=CONNECT_TIMEOUT_S, application_name=self._application_name,
            tcp_user_timeout=int(TCP_USER_TIMEOUT_S * 1000),
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
        )

    def _connect(self):
        if time.monotonic() < self._next_connect_at:
            raise StoreUnavailable(f"{self.name}: the database is unavailable (reconnecting)")
        psycopg = self._psycopg
        try:
            self.connection = self.open_connection()
        except psycopg.Error as e:
            self.connection = None
            self._next_connect_at = time.monotonic() + RECONNECT_PAUSE_S
            raise StoreUnavailable(f"{self.name}: cannot connect to the database ({self._clean(e)})") from None

    def _conn(self):
        """Return the connection, connecting again first if the last one broke (outside a transaction only)."""
        if self.connection is None or self.connection.closed:
            if self._closed:
                raise StoreError(f"{self.name}: the database is closed")
            if self._in_transaction:
                raise StoreUnavailable(f"{self.name}: the connection was lost during a transaction")
            self._connect()
        return self.connection

    def _translated(self, error):
        """Return the StoreError for a psycopg error; a fault of the server or the connection drops the connection."""
        psycopg = self._psycopg
        conn = self.connection
        lost = conn is None or conn.closed or conn.broken
        if lost or isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
            if lost:
                self._drop()
            return StoreUnavailable(f"{self.name}: {self._clean(error)}")
        return StoreError(f"{self.name}: {self._clean(error)}")

    def _drop(self):
        conn, self.connection = self.connection, None
        if conn is not None:
            try:
                conn.close()
            except self._psycopg.Error:  # already broken: nothing more to release
                pass

    def close(self):
        """Close the connection; the store connects no more. Idempotent."""
        self._closed = True
        self._drop()

    def execute(self, sql, params=()):
        """Run one statement (``?`` placeholders); return the cursor.

        Outside a transaction, a statement that finds the connection broken (the
        server restarted, the backend was killed, since the last one) is run once more
        on a new connection: nothing of it was done. Inside one, the error is raised.
        """
        retry = not self._in_transaction
        while True:
            conn = self._conn()
            try:
                return conn.execute(_translate(sql), tuple(params))
            except self._psycopg.Error as e:
                error = self._translated(e)
                if not (retry and self.connection is None and isinstance(error, StoreUnavailable)):
                    raise error from None
                retry = False

    def executemany(self, sql, rows):
        """Run one statement once per row of parameters; return the cursor."""
        conn = self._conn()
        try:
            cursor = conn.cursor()
            cursor.executemany(_translate(sql), [tuple(r) for r in rows])
            return cursor
        except self._psycopg.Error as e:
            raise self._translated(e) from None

    def begin(self):
        """Start a transaction (read committed; a read-only one sees one snapshot)."""
        self.execute("begin isolation level repeatable read read only" if self.read_only else "begin")
        self._in_transaction = True

    def commit(self):
        try:
            if self._notify:
                self.execute("select pg_notify(?, '')", (WORK_CHANNEL,))
            self.execute("commit")
        finally:
            self._in_transaction = self._notify = False

    def rollback(self):
        """Roll the open transaction back; a lost connection has rolled it back already."""
        self._in_transaction = self._notify = False
        conn = self.connection
        if conn is None or conn.closed:
            return
        try:
            conn.execute("rollback")
        except self._psycopg.Error:  # the connection broke meanwhile: the server rolled it back
            self._drop()

    def lock_schema(self):
        """Serialise the schema's transaction with every other instance's (transaction-level advisory lock)."""
        self.execute("select pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))

    def notify(self):
        """Have every listener woken (``WORK_CHANNEL``): inside a transaction, once, when it commits."""
        if self._in_transaction:
            self._notify = True  # sent once per transaction, however many rows ask (a NOTIFY locks at commit)
        else:
            self.execute("select pg_notify(?, '')", (WORK_CHANNEL,))

    def listen(self, on_notify):
        """Start and return a Listener calling ``on_notify()`` for each notification on ``WORK_CHANNEL``."""
        return Listener(self, WORK_CHANNEL, on_notify).start()

    def has_table(self, name):
        """Return True if the connection's schema holds a table called ``name``."""
        return self.execute("select 1 from information_schema.tables where table_schema = current_schema()"
                            " and table_name = ?", (name,)).fetchone() is not None


class Listener:
    """A thread that ``LISTEN``s on a connection of its own and calls ``on_notify()`` for each notification.

    The connection is made again after a fault (at most once per second); each time it
    listens again, ``on_notify()`` is also called once, for what may have been notified
    while it was away. ``listening`` is True while it waits for notifications.
    """

    def __init__(self, database, channel, on_notify):
        self._database = database
        self._channel = channel
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._thread = None
        self.listening = False

    def start(self):
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        psycopg = self._database._psycopg
        while not self._stop.is_set():
            try:
                with self._database.open_connection() as conn:
                    conn.execute(f"listen {self._channel}")  # a literal of this module
                    self.listening = True
                    self._on_notify()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL_S, stop_after=1):
                            self._on_notify()
            except psycopg.Error as e:
                if self.listening:
                    logger.warning("listening for new work stopped (%s); polling until it is back",
                                   self._database._clean(e))
            finally:
                self.listening = False
            self._stop.wait(RECONNECT_PAUSE_S * 2)

    def stop(self, timeout=5.0):
        """Stop listening and wait for the thread (at most ``timeout`` s). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
