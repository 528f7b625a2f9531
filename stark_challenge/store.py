"""Store: the service's durable state in one SQLite file; the only module that speaks SQL.

The tables, and the invariant each one keeps:

``schedule``  one row: when the first round was issued, the interval and the window.
              Written once, so a restart keeps the same 24 h window.
``round``     one row per round ``n``: ``issuing`` while a create call may be out,
              ``issued`` once its invoices are recorded, ``failed`` after bounded retries.
              An ``issuing`` round without ``next_try_at`` has a call out, or had one
              when the process stopped; ``updated_at`` is when that call began.
``invoice``   every invoice this deployment issued, with its round and last known status.
``event``     every Stark Bank event received (webhook or pull), keyed by the event id:
              a redelivered event is recognised here and not processed again.
``credit``    one row per credited invoice of ours (recorded in ``invoice``, or confirmed
              by Stark Bank), keyed by the invoice id (not the event id: each log of
              the same invoice comes in a new event). The row and its transfer are
              written in the same transaction, so a credit is queued for payment
              exactly once, whatever the redeliveries.
``transfer``  the transfers owed: keyed by ``external_id`` (which Stark Bank also
              refuses to repeat), one row per attempt, unique by (invoice, attempt):
              attempt 2 is queued automatically after Stark Bank confirmed the first
              ``failed``; any later one only by an operator (``queue_attempt``) once
              the latest attempt is ``rejected``, ``failed`` or ``stalled``. Every
              attempt stays in the table. Stark Bank's logs change a
              row only when they carry the ``transfer_id`` recorded for it. Its states
              and their moves: ``transfer_states``.

Every verb is a transaction of its own (``BEGIN IMMEDIATE``), or joins the one a
caller opened with ``atomic()``. ``add_event`` commits in groups: the events that
concurrent callers hand in while a commit is under way go to disk together in the
next one (one fsync for all of them), and each call still returns only once its own
event is committed. A caller that knows more events are on their way (webhooks whose
signatures are being checked) says so, and the commit waits for them, at most
``GROUP_WAIT_S``: the fsync, about 0.1 ms of CPU, is most of an insert's cost. Deduplication is a unique key and an insert that may
fail, answered as a boolean, never a check followed by an insert.

``Store(path, read_only=True)`` has the same verbs for reading, takes no lock, runs
no DDL and creates no file: ``status`` uses it while the service runs.

Threads: one connection, shared behind one re-entrant lock held for the length of a
transaction; writes from other processes wait on SQLite's busy timeout. WAL mode and
``synchronous=FULL``: a verb that returns has committed to disk, so an acknowledgement
given after it is durable.
"""

import contextlib
import datetime
import fcntl
import json
import os
import sqlite3
import threading
import urllib.parse
from typing import NamedTuple, Optional

from . import transfer_states
from .errors import StarkChallengeError

__all__ = ["Store", "StoreLocked", "StoreError", "Round", "Transfer", "StoredEvent"]

# An invoice's statuses (its log types) in the order of its life: a log that arrives after
# one of a later stage does not move the status back (Stark Bank does not promise the order
# of its events: an invoice's "overdue" can come after its "expired", "paid" after "credited").
# Unknown types rank with "created"; between equals, the later arrival wins.
_INVOICE_STAGE = {"created": 0, "registered": 0, "updated": 0, "overdue": 1, "paid": 2, "canceled": 2,
                  "expired": 2, "voided": 2, "credited": 3, "reversed": 4}

# Seconds a writer waits for another process's lock before SQLite gives up.
BUSY_TIMEOUT_S = 5.0
# The longest an event's commit waits for the events its caller said are on their way.
GROUP_WAIT_S = 0.002
# SQLite's page cache, per connection, in KiB. The service holds one connection (``status``
# opens its own, in its own process), so this is the most the cache can take of its memory,
# however large the database grows. Set here rather than left to the library's build.
CACHE_KIB = 2048
# After a checkpoint the write-ahead log is cut back to this, so a burst of writes does
# not leave a large file behind for good.
WAL_LIMIT_BYTES = 4 * 1024 * 1024
# Events deleted per transaction by ``prune_events``: short, so webhooks wait little on it.
PRUNE_BATCH = 500

SCHEMA = (
    """create table if not exists schedule (
        id integer primary key check (id = 1),
        schedule_id text not null,      -- random, names this window in invoice tags
        started_at text not null,       -- UTC ISO time of round 0
        interval_s real not null,
        duration_s real not null        -- 0 = forever
    )""",
    """create table if not exists round (
        n integer primary key,
        due_at text not null,
        state text not null check (state in ('issuing', 'issued', 'failed')),
        planned integer not null,       -- invoices to issue, drawn once
        attempts integer not null default 0,
        count integer not null default 0,
        total integer not null default 0,   -- cents
        error text,
        next_try_at text,
        issued_at text,
        updated_at text not null
    )""",
    """create table if not exists invoice (
        id text primary key,
        round_n integer not null references round (n),
        chunk integer not null,
        amount integer not null,        -- cents, as issued
        name text not null,
        tax_id text not null,
        status text not null,
        fee integer,                    -- cents, when credited
        created_at text not null,
        updated_at text not null
    )""",
    "create index if not exists invoice_round on invoice (round_n, chunk)",
    """create table if not exists event (
        id text primary key,
        subscription text not null,
        log_type text not null,
        entity_id text not null,
        body text not null,             -- the event as JSON
        source text not null check (source in ('webhook', 'pull')),
        received_at text not null,
        processed_at text,
        outcome text
    )""",
    "create index if not exists event_pending on event (processed_at) where processed_at is null",
    "create index if not exists event_received on event (received_at)",  # retention: oldest first
    """create table if not exists credit (
        invoice_id text primary key,
        event_id text not null,
        amount integer not null,        -- cents credited (the invoice's amount)
        fee integer not null,           -- cents
        net integer not null,           -- amount - fee, what is forwarded
        state text not null check (state in ('queued', 'skipped')),
        reason text,
        created_at text not null
    )""",
    """create table if not exists transfer (
        external_id text primary key,
        invoice_id text not null references credit (invoice_id),
        attempt integer not null,
        amount integer not null,        -- cents
        state text not null check (state in (%s)),  -- transfer_states.py
        transfer_id text unique,
        tries integer not null default 0,
        next_try_at text not null,
        errors text,                    -- JSON list of [code, message]
        created_at text not null,
        updated_at text not null,
        unique (invoice_id, attempt)
    )""",
    "create index if not exists transfer_due on transfer (state, next_try_at)",
)
SCHEMA = tuple(ddl.replace("%s", ", ".join(f"'{n}'" for n in transfer_states.NAMES)) for ddl in SCHEMA)

class StoreError(StarkChallengeError):
    """The database cannot be opened or written."""


class StoreLocked(StoreError):
    """Another process already runs the service on this database."""


class Round(NamedTuple):
    """A round of invoices as stored."""

    n: int  # 0-based round number
    due_at: datetime.datetime
    state: str  # 'issuing', 'issued' or 'failed'
    planned: int  # invoices to issue
    attempts: int  # create attempts so far
    count: int  # invoices recorded
    total: int  # cents recorded
    error: Optional[str]
    next_try_at: Optional[datetime.datetime]  # None while an attempt is under way
    updated_at: Optional[datetime.datetime]  # when the last attempt began or ended


class Transfer(NamedTuple):
    """A transfer owed to the configured account, as stored."""

    external_id: str  # our idempotency key at Stark Bank
    invoice_id: str
    attempt: int  # 1; 2 after Stark Bank failed the first; more only by an operator's retry
    amount: int  # cents
    state: str
    transfer_id: Optional[str]  # Stark Bank's id, once known
    tries: int  # create calls made
    errors: tuple  # ((code, message), ...)


class StoredEvent(NamedTuple):
    """An event received from Stark Bank and not yet processed."""

    id: str
    subscription: str
    log_type: str
    body: dict  # the event JSON (camelCase, as Stark Bank sends it)
    source: str  # 'webhook' or 'pull'


def _round_of(row):
    return Round(**{**dict(row), "due_at": _time(row["due_at"]), "next_try_at": _time(row["next_try_at"]),
                    "updated_at": _time(row["updated_at"])})


def _transfer_of(row):
    errors = tuple(tuple(e) for e in json.loads(row["errors"])) if row["errors"] else ()
    return Transfer(**{**dict(row), "errors": errors})


def _event_of(row):
    return StoredEvent(**{**dict(row), "body": json.loads(row["body"])})


_ROUND_COLUMNS = ", ".join(Round._fields)
_TRANSFER_COLUMNS = ", ".join(Transfer._fields)


def _iso(moment):
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("naive datetime: times must be timezone-aware UTC")
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def _time(text):
    return datetime.datetime.fromisoformat(text) if text else None


# SQLite creates these next to the database, with the database file's mode; the
# advisory lock file is ours. All hold or reveal payers' names and tax ids.
SIDE_FILES = ("-wal", "-shm", "-journal", ".lock")


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


class _Waiting:
    """An event row handed to ``Store.add_event``, until the commit that holds it is done."""

    __slots__ = ("row", "new", "error", "done", "committed")

    def __init__(self, row):
        self.row = row
        self.new = False  # True once inserted as a new event
        self.error = None  # the StoreError of a commit that failed
        self.done = False  # set, under the store's lock, once its commit succeeded or failed
        self.committed = threading.Lock()  # held until then: its caller, if not the leader, waits on it
        self.committed.acquire()


class Store:
    """The SQLite state of one deployment. See the module docstring for the tables."""

    def __init__(self, path, exclusive=True, read_only=False):
        """Open (creating if needed) the database at ``path``; with ``read_only``, open it to read.

        With ``exclusive``, hold an advisory lock on ``path + ".lock"`` for the life of
        the Store, so two service processes can never run on one database (two
        schedulers would issue a round twice); raise StoreLocked if it is taken.
        Raise StoreError if the file cannot be opened. ``read_only``: see ``_open_read_only``.
        """
        self.path = path
        self.read_only = read_only
        self._lock = threading.RLock()
        self._depth = 0  # nesting of atomic() blocks, guarded by _lock
        self._waiting = []  # events handed to add_event and not yet committed (_Waiting)
        # Guards _waiting and _leading; the leader of a group waits on it for events to join.
        self._joined = threading.Condition(threading.Lock())
        self._leading = False  # a caller is gathering _waiting for its commit
        self._lock_file = None
        self._conn = None
        if read_only:
            self._conn = _open_read_only(path)
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
            self._conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            # journal_mode cannot change inside a transaction: set it before any.
            self._conn.execute("pragma journal_mode = wal")
            self._conn.execute("pragma synchronous = full")
            self._conn.execute("pragma foreign_keys = on")
            self._conn.execute(f"pragma cache_size = -{CACHE_KIB}")  # negative: KiB, not pages
            self._conn.execute(f"pragma journal_size_limit = {WAL_LIMIT_BYTES}")
            with self.atomic():
                for ddl in SCHEMA:
                    self._conn.execute(ddl)
        except sqlite3.Error as e:
            self.close()
            raise StoreError(f"{path}: cannot open the database ({e})") from None
        except OSError as e:
            self.close()
            raise StoreError(f"{path}: cannot open the database ({e.strerror})") from None

    def close(self):
        """Close the connection and release the lock file. Idempotent."""
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
                self._conn = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    @contextlib.contextmanager
    def atomic(self):
        """Run the block in one transaction; nested blocks join the outer one.

        Commits when the outermost block ends, rolls back on any exception
        (BaseException included) and re-raises it; SQLite's own errors come out as
        StoreError. On a read-only Store it is a read transaction: one snapshot.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if self._conn is None:
                raise StoreError(f"{self.path}: the database is closed")
            try:
                self._conn.execute("begin" if self.read_only else "begin immediate")
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: cannot start a transaction ({e})") from e
            self._depth = 1
            try:
                yield
                self._conn.execute("commit")
            except BaseException as e:
                self._conn.rollback()
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"{self.path}: {e}") from e
                raise
            finally:
                self._depth = 0

    def _execute(self, sql, params):
        if self._conn is None:
            raise StoreError(f"{self.path}: the database is closed")
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from e

    def _one(self, sql, params=()):
        return self._execute(sql, params).fetchone()

    def _all(self, sql, params=()):
        return self._execute(sql, params).fetchall()

    def ping(self):
        """Return True if the database answers a trivial query."""
        try:
            with self._lock:
                return tuple(self._one("select 1")) == (1,)
        except StoreError:
            return False

    # -- schedule ---------------------------------------------------------------

    def start_schedule(self, schedule_id, started_at, interval_s, duration_s):
        """Record the schedule unless one exists; return the stored one as a dict.

        Idempotent: the first call wins, so a restart keeps the original window.
        """
        with self.atomic():
            self._conn.execute(
                "insert or ignore into schedule (id, schedule_id, started_at, interval_s, duration_s)"
                " values (1, ?, ?, ?, ?)",
                (schedule_id, _iso(started_at), interval_s, duration_s),
            )
            return self.schedule()

    def schedule(self):
        """Return the stored schedule as a dict, or None before the first start."""
        with self._lock:
            row = self._one("select schedule_id, started_at, interval_s, duration_s from schedule")
        if row is None:
            return None
        return {**dict(row), "started_at": _time(row["started_at"])}

    # -- rounds -----------------------------------------------------------------

    def _round(self, n):
        row = self._one(f"select {_ROUND_COLUMNS} from round where n = ?", (n,))
        return _round_of(row) if row else None

    def round(self, n):
        """Return round ``n`` as a Round, or None if it was never attempted."""
        with self._lock:
            return self._round(n)

    def rounds(self):
        """Return every attempted round, in order."""
        with self._lock:
            return [_round_of(r) for r in self._all(f"select {_ROUND_COLUMNS} from round order by n")]

    def claim_round(self, n, due_at, planned, now):
        """Mark round ``n`` as being issued and count the attempt; return the Round as it was before the claim.

        Return None if the round is already ``issued`` or ``failed`` (nothing to do).
        For a first attempt the Round returned is the new row before its claim: ``attempts == 0``.
        ``planned`` is used only on the first claim: a retry keeps the size drawn first.
        The claim clears ``next_try_at`` and sets ``updated_at`` to ``now``: a call is out.
        """
        with self.atomic():
            before = self._round(n)
            if before is not None and before.state != "issuing":
                return None
            if before is None:
                self._conn.execute(
                    "insert into round (n, due_at, state, planned, attempts, updated_at)"
                    " values (?, ?, 'issuing', ?, 1, ?)",
                    (n, _iso(due_at), planned, _iso(now)),
                )
                return Round(n, due_at, "issuing", planned, 0, 0, 0, None, None, now)
            self._conn.execute(
                "update round set attempts = attempts + 1, next_try_at = null, updated_at = ? where n = ?",
                (_iso(now), n),
            )
            return before

    def recorded_chunks(self, n):
        """Return the set of chunk numbers of round ``n`` whose invoices are recorded."""
        with self._lock:
            return {r["chunk"] for r in self._all("select distinct chunk from invoice where round_n = ?", (n,))}

    def record_invoices(self, n, chunk, invoices, now):
        """Record the invoices Stark Bank created for chunk ``chunk`` of round ``n``.

        ``invoices`` are dicts with id, amount, name, tax_id, status. Idempotent: an
        invoice already recorded is left as it is. Return how many were new.
        """
        with self.atomic():
            added = 0
            for inv in invoices:
                cur = self._conn.execute(
                    "insert or ignore into invoice"
                    " (id, round_n, chunk, amount, name, tax_id, status, created_at, updated_at)"
                    " values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (inv["id"], n, chunk, inv["amount"], inv["name"], inv["tax_id"],
                     inv.get("status") or "created", _iso(now), _iso(now)),
                )
                added += cur.rowcount
            return added

    def finish_round(self, n, now):
        """Mark round ``n`` issued, with the count and total of its recorded invoices; return the Round."""
        with self.atomic():
            count, total = self._one(
                "select count(*), coalesce(sum(amount), 0) from invoice where round_n = ?", (n,)
            )
            self._conn.execute(
                "update round set state = 'issued', count = ?, total = ?, error = null,"
                " next_try_at = null, issued_at = ?, updated_at = ? where n = ?",
                (count, total, _iso(now), _iso(now), n),
            )
            return self._round(n)

    def retry_round(self, n, error, next_try_at, now):
        """Leave round ``n`` to be tried again at ``next_try_at``, noting ``error``."""
        with self.atomic():
            self._conn.execute(
                "update round set error = ?, next_try_at = ?, updated_at = ? where n = ?",
                (error, _iso(next_try_at), _iso(now), n),
            )

    def fail_round(self, n, error, now):
        """Give round ``n`` up for good, noting ``error``."""
        with self.atomic():
            self._conn.execute(
                "update round set state = 'failed', error = ?, next_try_at = null, updated_at = ?"
                " where n = ?",
                (error, _iso(now), n),
            )

    # -- events -----------------------------------------------------------------

    def add_event(self, event, source, now, coming=0):
        """Store an event received from Stark Bank (an ``events.Event``); return True if new, False if already stored.

        ``source`` is 'webhook' or 'pull'. Idempotent and thread-safe: of two concurrent
        deliveries of one event, exactly one gets True. Returns once the event is
        committed to disk (a group commit, see the module docstring); inside a
        caller's ``atomic()`` it joins that transaction instead. ``coming``: how many
        other events callers are about to hand in; the commit waits for them, at most
        ``GROUP_WAIT_S``.
        """
        body = json.dumps(event.body, separators=(",", ":"))
        waiting = _Waiting((event.id, event.subscription, event.log_type, event.entity_id, body, source, _iso(now)))
        if self._lock.acquire(blocking=False):  # free, or held by this very thread
            try:
                if self._depth:  # this thread's own transaction: the event joins it, alone
                    return self._insert_event(waiting.row)
            finally:
                self._lock.release()
        with self._joined:
            self._waiting.append(waiting)
            following = self._leading  # a commit is being gathered: this event goes with it
            if following:
                self._joined.notify()  # the leader waits on _joined for its group to fill
            else:
                # Lead the next commit: wait (outside the store's lock, so the worker is not
                # held up) for the events said to be coming, at most GROUP_WAIT_S.
                self._leading = True
                self._joined.wait_for(lambda: len(self._waiting) > coming, GROUP_WAIT_S if coming else 0)
        if following:
            waiting.committed.acquire()  # released by the leader once the group's commit is done
        else:
            with self._lock:
                with self._joined:
                    group, self._waiting, self._leading = self._waiting, [], False
                try:
                    self._commit_events(group)  # marks every event done, committed or failed
                finally:
                    for other in group:
                        if other is not waiting:
                            other.committed.release()
        if waiting.error is not None:
            raise waiting.error
        return waiting.new

    def _insert_event(self, row):
        cur = self._execute(
            "insert into event (id, subscription, log_type, entity_id, body, source, received_at)"
            " values (?, ?, ?, ?, ?, ?, ?) on conflict (id) do nothing",
            row,
        )
        return cur.rowcount == 1

    def _commit_events(self, group):
        """Insert the events of ``group`` (``_Waiting``) in one transaction; mark each done, with its result or the error."""
        error = None
        try:
            with self.atomic():
                for waiting in group:
                    waiting.new = self._insert_event(waiting.row)
        except StoreError as e:
            error = e
        except BaseException as e:  # no caller may wait for an answer that never comes
            error = StoreError(f"{self.path}: events not stored ({type(e).__name__})")
            raise
        finally:
            for waiting in group:
                waiting.error, waiting.done = error, True

    def pending_events(self, limit=100):
        """Return up to ``limit`` stored events not yet processed, oldest first."""
        with self._lock:
            rows = self._all(
                "select id, subscription, log_type, body, source from event"
                " where processed_at is null order by received_at, id limit ?",
                (limit,),
            )
        return [_event_of(r) for r in rows]

    def finish_event(self, event_id, outcome, now):
        """Mark an event processed with a short ``outcome``; return True if it was pending."""
        with self.atomic():
            cur = self._conn.execute(
                "update event set processed_at = ?, outcome = ? where id = ? and processed_at is null",
                (_iso(now), outcome, event_id),
            )
            return cur.rowcount == 1

    def prune_events(self, before, limit=PRUNE_BATCH):
        """Delete up to ``limit`` processed events received before ``before``, oldest first; return how many.

        Only events (and the bodies they hold) are ever deleted: rounds, invoices,
        credits and transfers are the money's record and stay. An event not yet
        processed is kept whatever its age. One short transaction per call: the
        caller repeats it until it returns less than ``limit``.
        """
        with self.atomic():
            cur = self._conn.execute(
                "delete from event where id in (select id from event where processed_at is not null"
                " and received_at < ? order by received_at limit ?)",
                (_iso(before), limit),
            )
            return cur.rowcount

    def event_processed(self, event_id):
        """Return True if the event is stored and processed."""
        with self._lock:
            row = self._one("select processed_at from event where id = ?", (event_id,))
        return bool(row and row["processed_at"])

    def recent_events(self, limit=20):
        """Return the ``limit`` events received last, newest first, as dicts (``stored_event``'s, without body)."""
        with self._lock:
            rows = self._all(
                "select id, subscription, log_type, entity_id, source, received_at, processed_at, outcome"
                " from event order by received_at desc, id desc limit ?", (limit,))
        return [dict(r) for r in rows]

    def stored_event(self, event_id):
        """Return the stored event ``event_id`` as a dict (id, subscription, log_type, entity_id, source,
        received_at, processed_at, outcome and ``body``, the event as received), or None."""
        with self._lock:
            row = self._one(
                "select id, subscription, log_type, entity_id, source, received_at, processed_at, outcome, body"
                " from event where id = ?", (event_id,))
        return None if row is None else {**dict(row), "body": json.loads(row["body"])}

    # -- invoices ---------------------------------------------------------------

    def update_invoice(self, invoice_id, status, now, fee=None):
        """Record a new status (and fee, when known) of one of our invoices; return True if known.

        Logs can arrive in any order: one of an earlier stage than the status recorded
        (``_INVOICE_STAGE``: ``paid`` after ``credited``, ``overdue`` after ``expired``)
        leaves the status as it is.
        """
        with self.atomic():
            row = self._one("select status from invoice where id = ?", (invoice_id,))
            if row is None:
                return False
            moves = _INVOICE_STAGE.get(status, 0) >= _INVOICE_STAGE.get(row[0], 0)
            self._conn.execute("update invoice set status = ?, fee = coalesce(?, fee), updated_at = ? where id = ?",
                               (status if moves else row[0], fee, _iso(now), invoice_id))
            return True

    def has_invoice(self, invoice_id):
        """Return True if a round of ours issued the invoice (it is in the invoice table)."""
        with self._lock:
            return self._one("select 1 from invoice where id = ?", (invoice_id,)) is not None

    # -- credits and transfers --------------------------------------------------

    def add_credit(self, invoice_id, event_id, amount, fee, external_id, now):
        """Record a credited invoice and queue its transfer; return True if new.

        The net amount is ``amount - fee``. The credit row and its first transfer
        (``external_id``, attempt 1, state ``pending``) are written in one transaction:
        a credit is queued exactly once. False means the invoice was credited before.
        (Databases of older versions may hold ``skipped`` credits, which queued nothing.)
        """
        net = amount - fee
        with self.atomic():
            cur = self._conn.execute(
                "insert or ignore into credit"
                " (invoice_id, event_id, amount, fee, net, state, created_at)"
                " values (?, ?, ?, ?, ?, 'queued', ?)",
                (invoice_id, event_id, amount, fee, net, _iso(now)),
            )
            if cur.rowcount == 0:
                return False
            self._insert_transfer(external_id, invoice_id, 1, net, now)
            return True

    def credit(self, invoice_id):
        """Return the credit of an invoice as a dict (amount, fee, net in cents; state, reason), or None."""
        with self._lock:
            row = self._one(
                "select amount, fee, net, state, reason, event_id from credit where invoice_id = ?", (invoice_id,)
            )
        if row is None:
            return None
        return dict(row)

    def credits(self, invoice_ids):
        """Return {invoice id: credit dict (as ``credit`` returns it)} for those of ``invoice_ids`` credited; one read."""
        invoice_ids = list(invoice_ids)
        if not invoice_ids:
            return {}
        with self._lock:
            rows = self._all(
                "select invoice_id, amount, fee, net, state, reason, event_id from credit"
                f" where invoice_id in ({','.join('?' * len(invoice_ids))})",
                invoice_ids,
            )
        return {r["invoice_id"]: {k: r[k] for k in r.keys() if k != "invoice_id"} for r in rows}

    def _insert_transfer(self, external_id, invoice_id, attempt, amount, now):
        # "or ignore": the attempt number is unique per invoice, so a repeat queues nothing.
        self._conn.execute(
            "insert or ignore into transfer"
            " (external_id, invoice_id, attempt, amount, state, next_try_at, created_at, updated_at)"
            " values (?, ?, ?, ?, 'pending', ?, ?, ?)",
            (external_id, invoice_id, attempt, amount, _iso(now), _iso(now), _iso(now)),
        )

    def transfer(self, external_id):
        """Return the Transfer with this external id, or None."""
        with self._lock:
            row = self._one(f"select {_TRANSFER_COLUMNS} from transfer where external_id = ?", (external_id,))
        return _transfer_of(row) if row else None

    def transfers(self, states=None):
        """Return every Transfer (in ``states`` when given), oldest first."""
        where, params = "", ()
        if states is not None:
            where, params = f" where state in ({','.join('?' * len(states))})", tuple(states)
        with self._lock:
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer{where} order by created_at, external_id",
                             params)
        return [_transfer_of(r) for r in rows]

    def due_transfers(self, now, limit=100):
        """Return up to ``limit`` pending transfers whose next try is due, oldest first."""
        with self._lock:
            rows = self._all(
                f"select {_TRANSFER_COLUMNS} from transfer"
                " where state = 'pending' and next_try_at <= ? order by next_try_at, external_id limit ?",
                (_iso(now), limit),
            )
        return [_transfer_of(r) for r in rows]

    def next_transfer_due_at(self):
        """Return when the earliest pending transfer is due, or None if none is pending."""
        with self._lock:
            row = self._one("select min(next_try_at) as due from transfer where state = 'pending'")
        return _time(row["due"])

    def claim_transfer(self, external_id, now):
        """Move a pending transfer to ``sending`` and count the try; return True if this call claimed it.

        Written before the create call, so a crash mid-call leaves ``sending``: the
        transfer is then settled by its external id at start-up, never sent blindly.
        """
        with self.atomic():
            cur = self._conn.execute(
                "update transfer set state = 'sending', tries = tries + 1, updated_at = ?"
                " where external_id = ? and state = 'pending'",
                (_iso(now), external_id),
            )
            return cur.rowcount == 1

    def claim_transfers(self, external_ids, now):
        """Claim several pending transfers as ``claim_transfer`` does, in one transaction; return those claimed.

        One commit for a batch that goes to Stark Bank in one create call: a crash
        during the call leaves every one of them ``sending``, none of them ``pending``.
        """
        with self.atomic():
            return [ext for ext in external_ids if self.claim_transfer(ext, now)]

    def transfer_created(self, external_id, transfer_id, status, now):
        """Record Stark Bank's id and status for a transfer it accepted.

        A bare ``created`` does not move a transfer back from a state ranked higher
        (say ``success`` from an event that beat the create answer): see ``transfer_states``.
        """
        self.transfers_created([(external_id, transfer_id, status)], now)

    def transfers_created(self, answers, now):
        """Record several create answers as ``transfer_created`` does, in one transaction.

        ``answers`` are (external id, Stark Bank id, status) tuples, external ids
        distinct; one we do not hold is skipped. Two statements whatever their number,
        for the answer to a batch.
        """
        answers = list(answers)
        if not answers:
            return
        with self.atomic():
            marks = ",".join("?" * len(answers))
            found = self._all(f"select external_id, state from transfer where external_id in ({marks})",
                              [ext for ext, _, _ in answers])
            states = {r["external_id"]: r["state"] for r in found}
            at, rows = _iso(now), []
            for external_id, transfer_id, status in answers:
                if external_id not in states:
                    continue
                status = status if status in transfer_states.REPORTED else "created"
                current = states[external_id]
                keep = status == "created" and transfer_states.rank(current) > transfer_states.rank("created")
                rows.append((transfer_id, current if keep else status, at, external_id))
            self._conn.executemany(
                "update transfer set transfer_id = ?, state = ?, updated_at = ? where external_id = ?", rows
            )

    def retry_transfer(self, external_id, errors, next_try_at, now):
        """Put a transfer back to ``pending`` until ``next_try_at`` (same external id, so idempotent)."""
        with self.atomic():
            self._conn.execute(
                "update transfer set state = 'pending', errors = ?, next_try_at = ?, updated_at = ?"
                " where external_id = ?",
                (json.dumps(list(errors)), _iso(next_try_at), _iso(now), external_id),
            )

    def stall_transfer(self, external_id, errors, now):
        """Stop retrying a transfer after its bounded tries; it is retried at the next start-up."""
        with self.atomic():
            self._conn.execute(
                "update transfer set state = 'stalled', errors = ?, updated_at = ? where external_id = ?",
                (json.dumps(list(errors)), _iso(now), external_id),
            )

    def reject_transfer(self, external_id, errors, now):
        """Record that Stark Bank refused a transfer (4xx) with its error codes."""
        with self.atomic():
            self._conn.execute(
                "update transfer set state = 'rejected', errors = ?, updated_at = ? where external_id = ?",
                (json.dumps(list(errors)), _iso(now), external_id),
            )

    def requeue_transfers(self, states, now):
        """Move every transfer in ``states`` back to ``pending``, due now; return their external ids.

        Only the latest attempt of an invoice: one an operator superseded by a later
        attempt (``queue_attempt``) stays as it is, or the invoice would be paid twice.
        """
        latest = ("not exists (select 1 from transfer later where later.invoice_id = transfer.invoice_id"
                  " and later.attempt > transfer.attempt)")
        with self.atomic():
            marks = ",".join("?" * len(states))
            rows = self._all(f"select external_id from transfer where state in ({marks}) and {latest}", states)
            ids = [r["external_id"] for r in rows]
            self._conn.execute(
                f"update transfer set state = 'pending', tries = 0, next_try_at = ?, updated_at = ?"
                f" where state in ({marks}) and {latest}",
                (_iso(now), _iso(now), *states),
            )
            return ids

    def attempts(self, invoice_id):
        """Return every Transfer attempt of an invoice, by attempt number (empty if it has none)."""
        with self._lock:
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer where invoice_id = ? order by attempt",
                             (invoice_id,))
        return [_transfer_of(r) for r in rows]

    def queue_attempt(self, invoice_id, after_attempt, external_id, now):
        """Queue attempt ``after_attempt + 1`` of an invoice's transfer, ``pending``; return True if queued.

        Only while attempt ``after_attempt`` is still the latest and its state is one
        ``transfer_states.RETRYABLE`` names, checked in the same transaction as the
        insert; the unique (invoice, attempt) key makes two concurrent calls insert one
        row. False: another attempt came first, or the state moved meanwhile.
        """
        with self.atomic():
            row = self._one("select attempt, state, amount from transfer where invoice_id = ?"
                            " order by attempt desc limit 1", (invoice_id,))
            if row is None or row["attempt"] != after_attempt or row["state"] not in transfer_states.RETRYABLE:
                return False
            cur = self._conn.execute(
                "insert or ignore into transfer"
                " (external_id, invoice_id, attempt, amount, state, next_try_at, created_at, updated_at)"
                " values (?, ?, ?, ?, 'pending', ?, ?, ?)",
                (external_id, invoice_id, after_attempt + 1, row["amount"], _iso(now), _iso(now), _iso(now)),
            )
            return cur.rowcount == 1

    def credit_outcomes(self):
        """Return {outcome: events} of the processed ``credited`` invoice events (for the metrics)."""
        with self._lock:
            rows = self._all("select outcome, count(*) as n from event where subscription = 'invoice'"
                             " and log_type = 'credited' and processed_at is not null group by outcome")
        return {r["outcome"]: r["n"] for r in rows}

    def apply_transfer_status(self, external_id, transfer_id, status, errors, now, retry_external_id=None,
                              confirmed_failed=False):
        """Record a status Stark Bank reported for one of our transfers; return the Transfer, or None.

        Nothing changes unless ``transfer_id`` is the Stark Bank id recorded for the
        transfer (``transfer_created``). Whether the status moves it is
        ``transfer_states.moves``; a confirmed failure of a first attempt queues the
        second one under ``retry_external_id`` in the same transaction (once: the
        attempt number is unique per invoice).
        """
        with self.atomic():
            row = self._one(f"select {_TRANSFER_COLUMNS} from transfer where external_id = ?", (external_id,))
            if row is None:
                return None
            current = _transfer_of(row)
            if current.transfer_id is None or current.transfer_id != transfer_id:
                return current
            if transfer_states.moves(current.state, status, confirmed_failed):
                self._conn.execute(
                    "update transfer set state = ?, errors = ?, updated_at = ? where external_id = ?",
                    (status, json.dumps(list(errors)) if errors else row["errors"], _iso(now), external_id),
                )
            if status == "failed" and confirmed_failed and current.attempt == 1 and retry_external_id:
                # Also when already 'failed' (the lookup that settled it saw the failure first);
                # a repeat inserts nothing.
                self._insert_transfer(retry_external_id, current.invoice_id, 2, current.amount, now)
            row = self._one(f"select {_TRANSFER_COLUMNS} from transfer where external_id = ?", (external_id,))
            return _transfer_of(row)

    # -- reports ----------------------------------------------------------------

    def _count_and_sum(self, table, column):
        # {value of column: {"count": rows, "amount": cents}}; table and column are this module's literals.
        rows = self._all(f"select {column} as k, count(*) as count, coalesce(sum(amount), 0) as amount"
                         f" from {table} group by {column}")
        return {r["k"]: {"count": r["count"], "amount": r["amount"]} for r in rows}

    def summary(self):
        """Return a dict of the numbers an operator wants: rounds, invoices, credits, transfers, events."""
        with self.atomic():  # one snapshot, also on a read-only Store
            rounds = dict(tuple(r) for r in self._all("select state, count(*) from round group by state"))
            invoices = self._count_and_sum("invoice", "status")
            credited = self._one(
                "select count(*) as count, coalesce(sum(amount), 0) as amount, coalesce(sum(fee), 0) as fee,"
                " coalesce(sum(net), 0) as net from credit where state = 'queued'"
            )
            skipped = self._one("select count(*) from credit where state = 'skipped'")[0]
            transfers = self._count_and_sum("transfer", "state")
            events = self._one(
                "select count(*) as received, count(*) filter (where processed_at is null) as pending,"
                " max(received_at) filter (where source = 'webhook') as last_webhook_at,"
                # Genuine events that are not about our money, and events with bad data (see events.py).
                " count(*) filter (where outcome like 'not issued here%' or outcome = 'transfer not ours')"
                " as not_ours,"
                " count(*) filter (where outcome like 'invalid%') as invalid from event"
            )
            schedule = self._one("select started_at, interval_s, duration_s from schedule")
            latest = self._all(
                "select t.state, t.attempt from transfer t where t.attempt = (select max(attempt)"
                " from transfer l where l.invoice_id = t.invoice_id)")
        return {
            # credits that needed more than one attempt, and those whose latest attempt is stuck
            "attempts": {"retried": sum(1 for r in latest if r["attempt"] > 1),
                         "stuck": sum(1 for r in latest if r["state"] in transfer_states.RETRYABLE)},
            "schedule": dict(schedule) if schedule else None,
            "rounds": {state: rounds.get(state, 0) for state in ("issued", "issuing", "failed")},
            "invoices": invoices,
            "credits": {**dict(credited), "skipped": skipped},
            "transfers": transfers,
            "transferred": transfers.get("success", {"amount": 0})["amount"],
            "events": dict(events),
            "storage": self._storage(),
        }

    def _storage(self):
        """Return the database's size: bytes in use, bytes free (pages the file keeps for reuse), the oldest event's time.

        The write-ahead log beside it is left out: it comes and goes with checkpoints,
        and is cut back to ``WAL_LIMIT_BYTES`` after each.
        """
        page = self._one("pragma page_size")[0]
        pages, free = self._one("pragma page_count")[0], self._one("pragma freelist_count")[0]
        oldest = self._one("select min(received_at) from event")[0]
        return {"bytes": (pages - free) * page, "free_bytes": free * page, "oldest_event_at": oldest}


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
