"""Store: the service's durable state, in SQLite or PostgreSQL; the only module that speaks the tables' SQL.

The tables, and the invariant each one keeps:

``schedule``  one row: when the first round was issued, the interval and the window.
              Written once, so a restart keeps the same 24 h window.
``round``     one row per round ``n``: ``issuing`` while a create call may be out,
              ``issued`` once its invoices are recorded, ``failed`` after bounded retries.
              An ``issuing`` round without ``next_try_at`` has a call out, or had one
              when the process stopped; ``updated_at`` is when that call began. The
              row's insert grants the round to one instance, which holds it
              (``lease_owner``, ``lease_until``) while it issues it.
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
              and their moves: ``transfer_states``. A ``sending`` row is held by the
              instance making its create call (``lease_owner``) until ``lease_until``.

Two backends, one SQL: ``Store(path)`` is a SQLite file (``sqlite_db``), the embedded
default; ``Store("postgresql://...")`` is a PostgreSQL database (``postgres_db``) that
several instances share. The statements are written once, with ``?`` placeholders and
portable SQL (``on conflict do nothing``, ``returning``, ``filter``); the one place they
differ is a claim, which on PostgreSQL locks the rows it reads (``for update``, or
``for update skip locked`` to take only rows no other instance holds), where SQLite's
single writer already excludes everyone else.

Every verb is a transaction of its own, or joins the one a caller opened with
``atomic()``. ``add_event`` commits in groups (``group_commit``): the events that
concurrent callers hand in while a commit is under way are committed together in the
next one, and each call still returns only once its own event is committed.
Deduplication is a unique key and an insert that may fail, answered as a boolean,
never a check followed by an insert.

``Store(location, read_only=True)`` has the same verbs for reading, takes no lock, runs
no DDL and creates no file: ``status`` uses it while the service runs.

Threads: one connection, shared behind one re-entrant lock held for the length of a
transaction. A verb that returns has committed durably (SQLite: WAL and
``synchronous=FULL``; PostgreSQL: its own commit), so an acknowledgement given after
it is durable. StoreError on any failure; StoreUnavailable when a database server or
the connection to it is gone, and the next call connects again.
"""

import contextlib
import datetime
import json
import os
import secrets
import socket
import threading
from typing import NamedTuple, Optional

from . import transfer_states
from .errors import StoreError, StoreLocked, StoreUnavailable
from .group_commit import GroupCommit
from .postgres_db import is_url

__all__ = ["Store", "StoreLocked", "StoreError", "StoreUnavailable", "Round", "Transfer", "StoredEvent", "is_url"]

# An invoice's statuses (its log types) in the order of its life: a log that arrives after
# one of a later stage does not move the status back (Stark Bank does not promise the order
# of its events: an invoice's "overdue" can come after its "expired", "paid" after "credited").
# Unknown types rank with "created"; between equals, the later arrival wins.
_INVOICE_STAGE = {"created": 0, "registered": 0, "updated": 0, "overdue": 1, "paid": 2, "canceled": 2,
                  "expired": 2, "voided": 2, "credited": 3, "reversed": 4}

SCHEMA = (
    """create table if not exists schedule (
        id integer primary key check (id = 1),
        schedule_id text not null,      -- random, names this window in invoice tags
        started_at text not null,       -- UTC ISO time of round 0
        interval_s double precision not null,
        duration_s double precision not null        -- 0 = forever
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
        updated_at text not null,
        lease_owner text,               -- the instance issuing it (Store.owner)
        lease_until text                -- until when no other instance may claim it
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
        lease_owner text,               -- the instance whose create call it is, while 'sending'
        lease_until text,               -- after this, another instance may take the claim over
        unique (invoice_id, attempt)
    )""",
    "create index if not exists transfer_due on transfer (state, next_try_at)",
)
SCHEMA = tuple(ddl.replace("%s", ", ".join(f"'{n}'" for n in transfer_states.NAMES)) for ddl in SCHEMA)

# Columns added since the first version, added to an older database when it is opened.
ADDED_COLUMNS = (("round", "lease_owner", "text"), ("round", "lease_until", "text"),
                 ("transfer", "lease_owner", "text"), ("transfer", "lease_until", "text"))

# How long a claim (a round being issued, a transfer being sent) keeps other instances away
# unless renewed: longer than one create call (BANK_TIMEOUT, 15 s by default), so the holder's
# call is over when another instance takes the claim over and looks it up at Stark Bank.
LEASE_S = 60.0
# A lease bound that any real time is before: on a SQLite file (one process, by its lock
# file) a claim left by another owner belongs to a process that is gone.
_NEVER = "9999-12-31T23:59:59.999999+00:00"

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
    lease_owner: Optional[str] = None  # the instance that claimed it last
    lease_until: Optional[datetime.datetime] = None  # no other instance claims it before this


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
                    "updated_at": _time(row["updated_at"]), "lease_until": _time(row["lease_until"])})


def _transfer_of(row):
    errors = tuple(tuple(e) for e in json.loads(row["errors"])) if row["errors"] else ()
    return Transfer(**{**{name: row[name] for name in Transfer._fields}, "errors": errors})


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


class Store:
    """The state of one deployment, in SQLite or PostgreSQL. See the module docstring for the tables."""

    def __init__(self, location, exclusive=True, read_only=False, lease_s=LEASE_S):
        """Open the database at ``location`` (creating its tables if needed); with ``read_only``, open it to read.

        ``location`` is a SQLite file path or a PostgreSQL URL (``is_url``). For a
        file, ``exclusive`` holds its advisory lock for the life of the Store, so two
        service processes can never share one file (StoreLocked if taken); several
        instances share a PostgreSQL database, made safe by the claims in its rows.
        ``lease_s``: how long this Store's claims keep other instances away unless
        renewed (``Config.lease_s``). Raise StoreError if the database cannot be opened
        (StoreUnavailable if its server cannot be reached now).
        """
        self.path = location
        self.read_only = read_only
        self.lease_s = lease_s
        # Names this Store's claims (lease_owner): unique per process and per Store.
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock = threading.RLock()
        self._depth = 0  # nesting of atomic() blocks, guarded by _lock
        self._conn = None
        if is_url(location):
            from .postgres_db import PostgresDatabase

            self._conn = PostgresDatabase(location, read_only=read_only)
        else:
            from .sqlite_db import SqliteDatabase

            self._conn = SqliteDatabase(location, exclusive=exclusive, read_only=read_only)
        self.name = self._conn.name  # for messages: a URL's password hidden
        self._group = GroupCommit(self._lock, self._commit_events, self.name)
        if read_only:
            return
        try:
            with self.atomic():
                self._conn.lock_schema()
                for ddl in SCHEMA:
                    self._conn.execute(ddl)
                self._add_columns()
        except StoreError as e:
            self.close()
            if isinstance(e, StoreUnavailable):
                raise
            raise StoreError(f"{self.name}: cannot open the database ({str(e).removeprefix(self.name + ': ')})") from None

    def _add_columns(self):
        """Add the columns of ``ADDED_COLUMNS`` that a database made by an older version lacks."""
        present = {}
        for table, column, kind in ADDED_COLUMNS:
            if table not in present:
                present[table] = self._conn.columns(table)
            if column not in present[table]:
                self._conn.execute(f"alter table {table} add column {column} {kind}")

    def _until(self, now, lease_s):
        """Return (ISO) when a claim made at ``now`` for ``lease_s`` (default: the Store's) ends."""
        return _iso(now + datetime.timedelta(seconds=self.lease_s if lease_s is None else lease_s))

    def _held_elsewhere(self, owner, until, now):
        """Return True if a claim by ``owner`` until ``until`` keeps this Store away at ``now``.

        Never on a SQLite file: its lock keeps every other process away, so a claim of
        another owner was left by a process that is gone.
        """
        return (self.backend == "postgres" and owner not in (None, self.owner)
                and until is not None and until > now)

    def _expired_before(self, now):
        """Return the time before which a lease has expired: ``now`` where other instances may hold
        claims (PostgreSQL), never on a SQLite file, whose lock keeps every other process away."""
        return _iso(now) if self.backend == "postgres" else _NEVER

    @property
    def backend(self):
        """Return 'sqlite' or 'postgres'."""
        return self._conn.kind

    def close(self):
        """Close the connection (and release a SQLite file's lock). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    @contextlib.contextmanager
    def atomic(self):
        """Run the block in one transaction; nested blocks join the outer one.

        Commits when the outermost block ends, rolls back on any exception
        (BaseException included) and re-raises it; the database's own errors come
        out as StoreError. On a read-only Store it is a read transaction: one snapshot.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.begin()
            self._depth = 1
            try:
                yield
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise
            finally:
                self._depth = 0

    def _execute(self, sql, params=()):
        return self._conn.execute(sql, params)

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
                "insert into schedule (id, schedule_id, started_at, interval_s, duration_s)"
                " values (1, ?, ?, ?, ?) on conflict do nothing",
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

    def _round(self, n, lock=False):
        row = self._one(f"select {_ROUND_COLUMNS} from round where n = ?{self._conn.locked if lock else ''}", (n,))
        return _round_of(row) if row else None

    def round(self, n):
        """Return round ``n`` as a Round, or None if it was never attempted."""
        with self._lock:
            return self._round(n)

    def rounds(self):
        """Return every attempted round, in order."""
        with self._lock:
            return [_round_of(r) for r in self._all(f"select {_ROUND_COLUMNS} from round order by n")]

    def claim_round(self, n, due_at, planned, now, lease_s=None):
        """Mark round ``n`` as being issued by this Store and count the attempt; return the Round as it was before.

        Return None if the round is already ``issued`` or ``failed`` (nothing to do),
        or if another instance holds it (its lease has not expired: ``round(n)`` says
        until when). For a first attempt the Round returned is the new row before its
        claim: ``attempts == 0``; the row's insert is what grants the right to issue, so
        of instances racing for a round exactly one gets it. ``planned`` is used only on
        the first claim: a retry keeps the size drawn first. The claim clears
        ``next_try_at``, sets ``updated_at`` to ``now`` (a call is out) and holds the
        round for ``lease_s`` (default: the Store's; ``renew_round`` extends it before each call).
        """
        until = self._until(now, lease_s)
        with self.atomic():
            cur = self._conn.execute(
                "insert into round (n, due_at, state, planned, attempts, updated_at, lease_owner, lease_until)"
                " values (?, ?, 'issuing', ?, 1, ?, ?, ?) on conflict do nothing",
                (n, _iso(due_at), planned, _iso(now), self.owner, until),
            )
            if cur.rowcount == 1:
                return Round(n, due_at, "issuing", planned, 0, 0, 0, None, None, now)
            before = self._round(n, lock=True)
            if before.state != "issuing":
                return None
            if self._held_elsewhere(before.lease_owner, before.lease_until, now):
                return None
            self._conn.execute(
                "update round set attempts = attempts + 1, next_try_at = null, updated_at = ?,"
                " lease_owner = ?, lease_until = ? where n = ?",
                (_iso(now), self.owner, until, n),
            )
            return before

    def renew_round(self, n, now, lease_s=None):
        """Extend this Store's hold on round ``n`` (about to make another create call); return True if it holds it.

        False: another instance took the round over (this one was thought dead), or it is settled.
        """
        with self.atomic():
            cur = self._conn.execute(
                "update round set lease_until = ?, updated_at = ? where n = ? and state = 'issuing' and lease_owner = ?",
                (self._until(now, lease_s), _iso(now), n, self.owner),
            )
            return cur.rowcount == 1

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
                    "insert into invoice"
                    " (id, round_n, chunk, amount, name, tax_id, status, created_at, updated_at)"
                    " values (?, ?, ?, ?, ?, ?, ?, ?, ?) on conflict do nothing",
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
                " next_try_at = null, issued_at = ?, updated_at = ?, lease_owner = null, lease_until = null"
                " where n = ?",
                (count, total, _iso(now), _iso(now), n),
            )
            return self._round(n)

    def retry_round(self, n, error, next_try_at, now):
        """Leave round ``n`` to be tried again at ``next_try_at``, noting ``error``.

        The hold lasts until then: no other instance claims the round earlier.
        """
        with self.atomic():
            self._conn.execute(
                "update round set error = ?, next_try_at = ?, updated_at = ?, lease_until = ? where n = ?",
                (error, _iso(next_try_at), _iso(now), _iso(next_try_at), n),
            )

    def fail_round(self, n, error, now):
        """Give round ``n`` up for good, noting ``error``."""
        with self.atomic():
            self._conn.execute(
                "update round set state = 'failed', error = ?, next_try_at = null, updated_at = ?,"
                " lease_owner = null, lease_until = null where n = ?",
                (error, _iso(now), n),
            )

    # -- events -----------------------------------------------------------------

    def add_event(self, event, source, now, coming=0):
        """Store an event received from Stark Bank (an ``events.Event``); return True if new, False if already stored.

        ``source`` is 'webhook' or 'pull'. Idempotent and thread-safe, also across
        instances sharing a database: of concurrent deliveries of one event, exactly
        one gets True. Returns once the event is committed (a group commit, see the
        module docstring); inside a caller's ``atomic()`` it joins that transaction
        instead. ``coming``: how many other events callers are about to hand in; the
        commit waits for them, at most ``group_commit.GROUP_WAIT_S``.
        """
        body = json.dumps(event.body, separators=(",", ":"))
        row = (event.id, event.subscription, event.log_type, event.entity_id, body, source, _iso(now))
        if self._lock.acquire(blocking=False):  # free, or held by this very thread
            try:
                if self._depth:  # this thread's own transaction: the event joins it, alone
                    return self._insert_event(row)
            finally:
                self._lock.release()
        return self._group.submit(row, coming)

    def _insert_event(self, row):
        cur = self._execute(
            "insert into event (id, subscription, log_type, entity_id, body, source, received_at)"
            " values (?, ?, ?, ?, ?, ?, ?) on conflict (id) do nothing",
            row,
        )
        return cur.rowcount == 1

    def _commit_events(self, rows):
        """Insert event rows in one transaction; return True (new) or False (stored before) for each."""
        with self.atomic():
            return [self._insert_event(row) for row in rows]

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

    def hold_event(self, event_id):
        """Inside a transaction, hold a stored event for processing; return False if it is processed or held elsewhere.

        On PostgreSQL the row stays locked until the transaction ends, and an event
        another instance is processing is skipped, not waited for; on SQLite the
        single writer already excludes everyone else.
        """
        row = self._one(f"select 1 from event where id = ? and processed_at is null{self._conn.skip_locked}",
                        (event_id,))
        return row is not None

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
            row = self._one(f"select status from invoice where id = ?{self._conn.locked}", (invoice_id,))
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
                "insert into credit"
                " (invoice_id, event_id, amount, fee, net, state, created_at)"
                " values (?, ?, ?, ?, ?, 'queued', ?) on conflict do nothing",
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
        # "do nothing": the attempt number is unique per invoice, so a repeat queues nothing.
        cur = self._conn.execute(
            "insert into transfer"
            " (external_id, invoice_id, attempt, amount, state, next_try_at, created_at, updated_at)"
            " values (?, ?, ?, ?, 'pending', ?, ?, ?) on conflict do nothing",
            (external_id, invoice_id, attempt, amount, _iso(now), _iso(now), _iso(now)),
        )
        if cur.rowcount == 1:
            self._conn.notify()  # wake the other instances' workers when this commits

    def listen(self, on_work):
        """Have ``on_work()`` called whenever another instance queues a transfer; return what to ``stop()``, or None.

        PostgreSQL only (``LISTEN/NOTIFY``, on a connection of its own, from a thread);
        on a SQLite file there is no other instance, and None is returned.
        """
        return self._conn.listen(on_work)

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

    def next_claim_expiry(self):
        """Return when the earliest lease of a ``sending`` transfer ends (to take it over then), or None."""
        with self._lock:
            row = self._one("select min(lease_until) as until from transfer where state = 'sending'")
        return _time(row["until"])

    def next_transfer_due_at(self):
        """Return when the earliest pending transfer is due, or None if none is pending."""
        with self._lock:
            row = self._one("select min(next_try_at) as due from transfer where state = 'pending'")
        return _time(row["due"])

    def claim_transfer(self, external_id, now, lease_s=None):
        """Move a pending transfer to ``sending``, held by this Store, and count the try; return True if claimed.

        Written before the create call, so a crash mid-call leaves ``sending``: once
        the hold (``lease_s``) expires the transfer is taken over (``take_over_transfers``)
        and settled by its external id, never sent blindly.
        """
        with self.atomic():
            cur = self._conn.execute(
                "update transfer set state = 'sending', tries = tries + 1, updated_at = ?, lease_owner = ?,"
                " lease_until = ? where external_id = ? and state = 'pending'",
                (_iso(now), self.owner, self._until(now, lease_s), external_id),
            )
            return cur.rowcount == 1

    def claim_due_transfers(self, now, limit=100, lease_s=None):
        """Claim up to ``limit`` due pending transfers as ``claim_transfer`` does, in one statement; return them.

        Oldest due first. On PostgreSQL the rows another instance is claiming are
        skipped (``skip locked``), so instances claiming together take disjoint sets.
        """
        rows = self._claim(
            "state = 'pending' and next_try_at <= ?", (_iso(now),), "tries = tries + 1, state = 'sending'",
            now, limit, lease_s)
        return [_transfer_of(r) for r in rows]

    def take_over_transfers(self, now, limit=100, lease_s=None):
        """Hold the ``sending`` transfers whose holder's lease has expired; return them (tries unchanged).

        Their create call may have reached Stark Bank: the caller looks each one up by
        its external id before anything else. On a SQLite file every ``sending`` row
        is taken (the process that claimed it is gone, or it is this one's, settled).
        """
        rows = self._claim(
            "state = 'sending' and (lease_until is null or lease_until <= ?)", (self._expired_before(now),),
            "state = 'sending'", now, limit, lease_s)
        return [_transfer_of(r) for r in rows]

    def _claim(self, where, params, changes, now, limit, lease_s):
        # One statement: the rows matching ``where`` (oldest due first, locked rows skipped on
        # PostgreSQL) get ``changes`` and this Store's lease; the changed rows come back.
        with self.atomic():
            rows = self._all(
                f"update transfer set {changes}, updated_at = ?, lease_owner = ?, lease_until = ?"
                f" where external_id in (select external_id from transfer where {where}"
                f" order by next_try_at, external_id limit ?{self._conn.skip_locked})"
                f" returning {_TRANSFER_COLUMNS}, next_try_at",
                (_iso(now), self.owner, self._until(now, lease_s), *params, limit),
            )
        return sorted(rows, key=lambda r: (r["next_try_at"], r["external_id"]))

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
            found = self._all(f"select external_id, state from transfer where external_id in ({marks})"
                              f" order by external_id{self._conn.locked}", [ext for ext, _, _ in answers])
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
                "update transfer set transfer_id = ?, state = ?, updated_at = ?, lease_owner = null, lease_until = null"
                " where external_id = ?", rows
            )

    # The three ends of a claim below change a transfer only while this Store holds it
    # (``sending``, its lease_owner): a claim another instance took over, or one that a
    # Stark Bank answer recorded meanwhile, is left as it is. Each returns True if it changed it.

    def retry_transfer(self, external_id, errors, next_try_at, now):
        """Put a transfer this Store holds back to ``pending`` until ``next_try_at`` (same external id: idempotent)."""
        return self._end_claim(external_id, "pending", errors, now, next_try_at)

    def stall_transfer(self, external_id, errors, now):
        """Stop retrying a transfer this Store holds after its bounded tries; it is retried at the next start-up."""
        return self._end_claim(external_id, "stalled", errors, now)

    def reject_transfer(self, external_id, errors, now):
        """Record that Stark Bank refused a transfer this Store holds (4xx), with its error codes."""
        return self._end_claim(external_id, "rejected", errors, now)

    def _end_claim(self, external_id, state, errors, now, next_try_at=None):
        with self.atomic():
            cur = self._conn.execute(
                "update transfer set state = ?, errors = ?, next_try_at = coalesce(?, next_try_at), updated_at = ?,"
                " lease_owner = null, lease_until = null"
                " where external_id = ? and state = 'sending' and lease_owner = ?",
                (state, json.dumps(list(errors)), _iso(next_try_at), _iso(now), external_id, self.owner),
            )
            return cur.rowcount == 1

    def requeue_transfers(self, states, now):
        """Move every transfer in ``states`` back to ``pending``, due now; return their external ids.

        Only the latest attempt of an invoice: one an operator superseded by a later
        attempt (``queue_attempt``) stays as it is, or the invoice would be paid twice.
        """
        latest = ("not exists (select 1 from transfer later where later.invoice_id = transfer.invoice_id"
                  " and later.attempt > transfer.attempt)")
        with self.atomic():
            marks = ",".join("?" * len(states))
            rows = self._all(
                f"update transfer set state = 'pending', tries = 0, next_try_at = ?, updated_at = ?"
                f" where state in ({marks}) and {latest} returning external_id",
                (_iso(now), _iso(now), *states),
            )
            return sorted(r["external_id"] for r in rows)

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
                            f" order by attempt desc limit 1{self._conn.locked}", (invoice_id,))
            if row is None or row["attempt"] != after_attempt or row["state"] not in transfer_states.RETRYABLE:
                return False
            cur = self._conn.execute(
                "insert into transfer"
                " (external_id, invoice_id, attempt, amount, state, next_try_at, created_at, updated_at)"
                " values (?, ?, ?, ?, 'pending', ?, ?, ?) on conflict do nothing",
                (external_id, invoice_id, after_attempt + 1, row["amount"], _iso(now), _iso(now), _iso(now)),
            )
            if cur.rowcount == 1:
                self._conn.notify()
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
            row = self._one(f"select {_TRANSFER_COLUMNS} from transfer where external_id = ?{self._conn.locked}",
                            (external_id,))
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
        }

