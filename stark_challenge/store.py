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
              the latest attempt is ``rejected`` or ``failed``. Every attempt stays in
              the table. A ``sending`` row holds a lease (``lease_owner``, the instance
              making its create call, until ``lease_until``): only its holder finishes
              it; once it runs out, any instance takes it over and settles it by lookup
              at Stark Bank. Stark Bank's logs change a row only when they carry the
              ``transfer_id`` recorded for it. Its states and their moves:
              ``transfer_states``, checked by ``_move``, the one writer of a state.
``alarm``     the standing alarms (``vocabulary.ALARMS``), resolved when they no longer hold.
``schema_version`` the version of these tables: a new database is created at
              ``SCHEMA_VERSION``; an older SQLite file is brought to it in place, step by
              step (``_UPGRADES``), when the service opens it.

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
from .config import LEASE_S
from .errors import StoreError, StoreLocked, StoreUnavailable
from .group_commit import GroupCommit
from .postgres_db import is_url
from .vocabulary import ALARMS, INVALID_CODES, NOT_OURS_CODES, ROUND_STATES

__all__ = ["Store", "StoreLocked", "StoreError", "StoreUnavailable", "Round", "Transfer", "StoredEvent", "is_url"]

# An invoice's statuses (its log types) in the order of its life: a log that arrives after
# one of a later stage does not move the status back (Stark Bank does not promise the order
# of its events: an invoice's "overdue" can come after its "expired", "paid" after "credited").
# Unknown types rank with "created"; between equals, the later arrival wins.
_INVOICE_STAGE = {"created": 0, "registered": 0, "updated": 0, "overdue": 1, "paid": 2, "canceled": 2,
                  "expired": 2, "voided": 2, "credited": 3, "reversed": 4}

# Events deleted per transaction by ``prune_events``: short, so webhooks wait little on it.
PRUNE_BATCH = 500

_TRANSFER_DDL = """create table if not exists %(table)s (
        external_id text primary key,
        invoice_id text not null references credit (invoice_id),
        attempt integer not null,
        amount integer not null,        -- cents
        state text not null check (state in (%(states)s)),  -- transfer_states.py
        transfer_id text unique,
        tries integer not null default 0,
        next_try_at text not null,      -- pending: when to send; exists, created, processing: when to ask
        errors text,                    -- JSON list of [code, message]: the last error
        lease_owner text,               -- sending: the instance whose create call may be out
        lease_until text,               -- sending: after this, the claim is settled by lookup
        created_at text not null,
        updated_at text not null,
        unique (invoice_id, attempt)
    )"""
_SCHEMA_NAMES = {"rounds": ", ".join(f"'{n}'" for n in ROUND_STATES),
                 "states": ", ".join(f"'{n}'" for n in transfer_states.NAMES), "table": "transfer"}

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
        state text not null check (state in (%(rounds)s)),
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
        outcome text,                   -- for people: what processing it did
        outcome_code text               -- vocabulary.OUTCOMES: what the metrics and the status count
    )""",
    "create index if not exists event_pending on event (processed_at) where processed_at is null",
    "create index if not exists event_outcome on event (outcome_code)",
    "create index if not exists event_received on event (received_at)",  # retention: oldest first
    """create table if not exists credit (
        invoice_id text primary key,
        event_id text not null,
        amount integer not null,        -- cents credited (the invoice's amount)
        fee integer not null,           -- cents
        net integer not null,           -- amount - fee, what is forwarded
        created_at text not null
    )""",
    _TRANSFER_DDL,
    "create index if not exists transfer_due on transfer (state, next_try_at)",
    """create table if not exists alarm (
        kind text not null,             -- vocabulary.ALARMS
        subject text not null,          -- the external id or invoice id it is about
        detail text not null,
        raised_at text not null,
        resolved_at text,               -- null while it stands
        primary key (kind, subject)
    )""",
    """create table if not exists schema_version (
        id integer primary key check (id = 1),
        version integer not null
    )""",
)
SCHEMA = tuple(ddl % _SCHEMA_NAMES if "%(" in ddl else ddl for ddl in SCHEMA)
# The schema this code writes; ``_UPGRADES`` brings an older database to it, in order.
SCHEMA_VERSION = 2


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
    errors: tuple  # ((code, message), ...): the last error
    next_try_at: Optional[datetime.datetime] = None  # pending: when to send; exists/created/processing: to ask
    lease_owner: Optional[str] = None  # sending: whose create call may be out
    lease_until: Optional[datetime.datetime] = None  # sending: when the claim is settled by lookup
    created_at: Optional[datetime.datetime] = None
    updated_at: Optional[datetime.datetime] = None


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
    times = {name: _time(row[name]) for name in ("next_try_at", "lease_until", "created_at", "updated_at")}
    return Transfer(**{**{name: row[name] for name in Transfer._fields}, "errors": errors, **times})


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
            self._check_version()
            return
        try:
            with self.atomic():
                self._conn.lock_schema()
                self._bring_schema_up_to_date()
        except StoreError as e:
            self.close()
            if isinstance(e, StoreUnavailable):
                raise
            raise StoreError(f"{self.name}: cannot open the database ({str(e).removeprefix(self.name + ': ')})") from None

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

    # -- schema -----------------------------------------------------------------

    def _has_table(self, name):
        return self._conn.has_table(name)

    def _bring_schema_up_to_date(self):
        """Create the schema, or upgrade an older one in place, step by step; in the caller's transaction.

        A SQLite file without a ``schema_version`` row but with a ``transfer`` table was
        written before versions were recorded: version 0. No released version wrote
        PostgreSQL tables without one, so such a database is refused rather than guessed at.
        """
        row = self._one("select version from schema_version") if self._has_table("schema_version") else None
        if row is not None:
            version = row["version"]
        elif self._has_table("transfer"):
            if self.backend == "postgres":
                raise StoreError(f"{self.name}: holds this service's tables but no schema version (not written by "
                                 "a released version); give the service a new database")
            version = 0
        else:
            for ddl in SCHEMA:
                self._conn.execute(ddl)
            self._conn.execute("insert into schema_version (id, version) values (1, ?)", (SCHEMA_VERSION,))
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.name}: written by a newer version of stark_challenge (schema {version})")
        for step in _UPGRADES[version:]:
            step(self)
        for ddl in SCHEMA:  # tables and indexes new in this version
            self._conn.execute(ddl)
        self._conn.execute("insert into schema_version (id, version) values (1, ?)"
                           " on conflict (id) do update set version = excluded.version", (SCHEMA_VERSION,))

    def _check_version(self):
        """Raise StoreError unless the database holds the schema this code reads (a read-only Store upgrades nothing)."""
        try:
            with self.atomic():
                has = self._has_table("schema_version")
                version = self._one("select version from schema_version")["version"] if has else 0
        except StoreError:
            self.close()
            raise
        if version != SCHEMA_VERSION:
            self.close()
            raise StoreError(f"{self.name}: written by another version of stark_challenge (schema {version}, this one "
                             f"reads {SCHEMA_VERSION}); start the service once to upgrade it")

    def schema_version(self):
        """Return the version of the schema the database holds."""
        with self._lock:
            return self._one("select version from schema_version")["version"]

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
        invoice already recorded is left as it is. Return how many were new. One whose
        credit was recorded first (its ``credited`` event, confirmed by Stark Bank, beat
        this record) is recorded ``credited``, with the credit's fee.
        """
        with self.atomic():
            added = 0
            for inv in invoices:
                cur = self._conn.execute(
                    "insert into invoice"
                    " (id, round_n, chunk, amount, name, tax_id, status, fee, created_at, updated_at)"
                    " values (?, ?, ?, ?, ?, ?, coalesce((select 'credited' from credit where invoice_id = ?), ?),"
                    " (select fee from credit where invoice_id = ?), ?, ?) on conflict do nothing",
                    (inv["id"], n, chunk, inv["amount"], inv["name"], inv["tax_id"], inv["id"],
                     inv.get("status") or "created", inv["id"], _iso(now), _iso(now)),
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

    def pending_events(self, limit=100, ours_first=False, skip_held=False):
        """Return up to ``limit`` stored events not yet processed, oldest first.

        ``ours_first``: events that need no lookup of an unknown invoice come before the
        ``credited`` events of invoices our store does not hold, so a flood of those
        never holds up our own credits. ``skip_held``: leave out, on PostgreSQL, the
        events another instance holds for processing at this moment (``hold_event``),
        so that workers reading together share the pending events out instead of all
        reading the same page; on SQLite nothing else holds one.
        """
        order = "received_at, id"
        if ours_first:
            order = ("case when subscription = 'invoice' and log_type = 'credited' and not exists"
                     " (select 1 from invoice i where i.id = event.entity_id) then 1 else 0 end, " + order)
        with self._lock:
            rows = self._all(
                "select id, subscription, log_type, body, source from event"
                f" where processed_at is null order by {order} limit ?{self._conn.skip_locked if skip_held else ''}",
                (limit,),
            )
        return [_event_of(r) for r in rows]

    def finish_event(self, event_id, outcome, now):
        """Mark an event processed with its ``outcome`` (``vocabulary.Outcome``); return True if it was pending.

        The code goes to its own column (what the metrics and the status count), the
        text beside it for people, cut to 200 characters.
        """
        with self.atomic():
            cur = self._conn.execute(
                "update event set processed_at = ?, outcome = ?, outcome_code = ?"
                " where id = ? and processed_at is null",
                (_iso(now), outcome.text[:200], outcome.code, event_id),
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

    def event_received_at(self, event_id):
        """Return when an event was stored (aware UTC), or None if it is not."""
        with self._lock:
            row = self._one("select received_at from event where id = ?", (event_id,))
        return _time(row["received_at"]) if row else None

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
        (``_INVOICE_STAGE``: ``created`` or ``paid`` after ``credited``, a redelivery say;
        ``overdue`` after ``expired``) leaves the status as it is.
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
        """
        net = amount - fee
        with self.atomic():
            cur = self._conn.execute(
                "insert into credit (invoice_id, event_id, amount, fee, net, created_at)"
                " values (?, ?, ?, ?, ?, ?) on conflict (invoice_id) do nothing",
                (invoice_id, event_id, amount, fee, net, _iso(now)),
            )
            if cur.rowcount == 0:
                return False
            self._insert_transfer(external_id, invoice_id, 1, net, now)
            return True

    def credit(self, invoice_id):
        """Return the credit of an invoice as a dict (amount, fee, net in cents; event_id), or None."""
        return self.credits([invoice_id]).get(invoice_id)

    def credits(self, invoice_ids):
        """Return {invoice id: credit dict (as ``credit`` returns it)} for those of ``invoice_ids`` credited; one read."""
        invoice_ids = list(invoice_ids)
        if not invoice_ids:
            return {}
        with self._lock:
            rows = self._all(
                "select invoice_id, amount, fee, net, event_id from credit"
                f" where invoice_id in ({','.join('?' * len(invoice_ids))})",
                invoice_ids,
            )
        return {r["invoice_id"]: {k: r[k] for k in r.keys() if k != "invoice_id"} for r in rows}

    def _insert_transfer(self, external_id, invoice_id, attempt, amount, now):
        """Insert attempt ``attempt`` of an invoice's transfer, ``pending`` and due now; return True if inserted.

        The attempt number is unique per invoice: a repeat inserts nothing.
        """
        cur = self._conn.execute(
            "insert into transfer"
            " (external_id, invoice_id, attempt, amount, state, next_try_at, created_at, updated_at)"
            " values (?, ?, ?, ?, 'pending', ?, ?, ?) on conflict do nothing",
            (external_id, invoice_id, attempt, amount, _iso(now), _iso(now), _iso(now)),
        )
        if cur.rowcount == 1:
            self._conn.notify()  # wake the other instances' workers when this commits
        return cur.rowcount == 1

    def listen(self, on_work):
        """Have ``on_work()`` called whenever another instance queues a transfer; return what to ``stop()``, or None.

        PostgreSQL only (``LISTEN/NOTIFY``, on a connection of its own, from a thread);
        on a SQLite file there is no other instance, and None is returned.
        """
        return self._conn.listen(on_work)

    def _move(self, external_id, target, now, *, expect=None, owner=None, confirmed_failed=False, count_try=False,
              row=None, **columns):
        """Write a transfer's state: the one place that does, checked against ``transfer_states.allowed``.

        ``target`` None (or the current state) keeps the state and writes ``columns``
        only. ``expect``: the states it must be in; ``owner``: it must be ``sending``
        under this lease owner (a claim is finished only by its holder). Leaving
        ``sending`` clears the lease. ``columns``: errors (a list), next_try_at,
        lease_until (datetimes), transfer_id, lease_owner. Compare-and-set on the
        state read, in the caller's transaction (on PostgreSQL the row is locked from the
        read to the commit). ``row``: the transfer's ``state`` and ``lease_owner`` as the
        caller read them, locked, in this transaction (``_locked_transfers``), to save the
        read. Return True if written.
        """
        if row is None:
            row = self._one(f"select state, lease_owner from transfer where external_id = ?{self._conn.locked}",
                            (external_id,))
        if row is None:
            return False
        current = row["state"]
        if expect is not None and current not in expect:
            return False
        if owner is not None and (current != "sending" or row["lease_owner"] != owner):
            return False
        if target is not None and target == current == "sending" and "lease_owner" not in columns:
            return False  # a claim is written again only with a new lease
        target = target or current
        if target != current and not transfer_states.allowed(current, target, confirmed_failed):
            return False
        sets = {"state": target, "updated_at": _iso(now)}
        if current == "sending" and target != "sending":
            sets.update(lease_owner=None, lease_until=None)
        for name, value in columns.items():
            if name == "errors":
                value = json.dumps([list(e) for e in value]) if value is not None else None
            elif name in ("next_try_at", "lease_until"):
                value = _iso(value)
            sets[name] = value
        assignments = ", ".join(f"{name} = ?" for name in sets) + (", tries = tries + 1" if count_try else "")
        where, params = "external_id = ? and state = ?", [external_id, current]
        if owner is not None:
            where, params = where + " and lease_owner = ?", params + [owner]
        cur = self._conn.execute(f"update transfer set {assignments} where {where}", [*sets.values(), *params])
        return cur.rowcount == 1

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

    def transfers_to_check(self, now, limit=100, states=("sending", "exists", "created", "processing")):
        """Return up to ``limit`` open transfers in ``states`` to ask Stark Bank about, oldest check first.

        Those ``exists``, ``created`` or ``processing`` whose ``next_try_at`` is past,
        and those ``sending`` whose lease ran out (``lease_until`` past).
        """
        asked = [s for s in states if s in ("exists", "created", "processing")]
        clauses, params = [], []
        if asked:
            clauses.append(f"(state in ({','.join('?' * len(asked))}) and next_try_at <= ?)")
            params += [*asked, _iso(now)]
        if "sending" in states:
            clauses.append("(state = 'sending' and lease_until <= ?)")
            params.append(_iso(now))
        if not clauses:
            return []
        with self._lock:
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer where {' or '.join(clauses)}"
                             " order by next_try_at, external_id limit ?", (*params, limit))
        return [_transfer_of(r) for r in rows]

    def next_check_at(self, states=("sending", "exists")):
        """Return when the earliest check of an open transfer in ``states`` is due (``transfers_to_check``), or None."""
        asked = [s for s in states if s != "sending"]
        with self._lock:
            times = []
            if asked:
                times.append(self._one(f"select min(next_try_at) as at from transfer where state in"
                                       f" ({','.join('?' * len(asked))})", asked)["at"])
            if "sending" in states:
                times.append(self._one("select min(lease_until) as at from transfer where state = 'sending'")["at"])
        times = [_time(t) for t in times if t]
        return min(times) if times else None

    def claim_transfers(self, external_ids, now, owner, lease_until):
        """Move pending transfers to ``sending`` under a lease, counting the try, in one transaction; return those.

        Written before the create call, so a crash mid-call leaves ``sending``: once
        ``lease_until`` is past, the claim is settled by lookup at Stark Bank, never sent
        blindly. One commit for a batch that goes in one create call.
        """
        with self.atomic():
            rows = self._locked_transfers(external_ids)
            claimed = {ext for ext, row in rows.items()
                       if self._move(ext, "sending", now, expect=("pending",), count_try=True, lease_owner=owner,
                                     lease_until=lease_until, row=row)}
        return [ext for ext in external_ids if ext in claimed]

    def _locked_transfers(self, external_ids):
        """In the caller's transaction, read and lock the transfers ``external_ids``; return {external id: row}.

        One read for all of them, in one order (PostgreSQL), so two callers never
        deadlock; each row holds ``state`` and ``lease_owner``, ready for ``_move``.
        """
        external_ids = sorted(set(external_ids))
        if not external_ids:
            return {}
        rows = self._all("select external_id, state, lease_owner from transfer"
                         f" where external_id in ({','.join('?' * len(external_ids))})"
                         f" order by external_id{self._conn.locked}", external_ids)
        return {r["external_id"]: r for r in rows}

    def claim_transfer(self, external_id, now, owner="", lease_until=None):
        """Claim one pending transfer as ``claim_transfers`` does; return True if this call claimed it."""
        return bool(self.claim_transfers([external_id], now, owner, lease_until or now))

    def claim_due_transfers(self, now, limit, owner, lease_until):
        """Claim up to ``limit`` due pending transfers as ``claim_transfers`` does; return them, oldest due first.

        On PostgreSQL the due rows another instance is claiming are skipped
        (``for update skip locked``), so instances claiming together take disjoint sets
        instead of waiting on each other; SQLite's single writer excludes everyone else.
        """
        with self.atomic():
            rows = self._all("select external_id from transfer where state = 'pending' and next_try_at <= ?"
                             f" order by next_try_at, external_id limit ?{self._conn.skip_locked}",
                             (_iso(now), limit))
            claimed = self.claim_transfers([r["external_id"] for r in rows], now, owner, lease_until)
            found = self._transfers_of(claimed)
            return [found[ext] for ext in claimed]

    def _transfers_of(self, external_ids):
        """Return {external id: Transfer} of those of ``external_ids`` stored; one read."""
        if not external_ids:
            return {}
        rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer"
                         f" where external_id in ({','.join('?' * len(external_ids))})", list(external_ids))
        return {r["external_id"]: _transfer_of(r) for r in rows}

    def take_over(self, external_id, now, owner, lease_until, expired_only=True):
        """Take the lease of a ``sending`` transfer whose lease ran out; return True if taken.

        ``expired_only=False`` takes any lease: at start-up, when the process that held
        it is gone. The new holder then settles it by lookup; the old one can no
        longer finish it.
        """
        with self.atomic():
            row = self._one("select lease_until from transfer where external_id = ? and state = 'sending'"
                            f"{self._conn.locked}", (external_id,))
            if row is None or (expired_only and row["lease_until"] is not None and _time(row["lease_until"]) > now):
                return False
            return self._move(external_id, "sending", now, expect=("sending",), lease_owner=owner,
                              lease_until=lease_until)

    def transfer_created(self, external_id, transfer_id, status, now, check_at=None, owner=None):
        """Record Stark Bank's id and status for a transfer it made; return True if recorded.

        See ``transfers_created``.
        """
        return bool(self.transfers_created([(external_id, transfer_id, status)], now, check_at, owner))

    def transfers_created(self, answers, now, check_at=None, owner=None):
        """Record create answers or lookups ((external id, Stark Bank id, status) tuples) in one transaction.

        Return the external ids recorded. A status only moves a transfer up
        (``transfer_states``): a bare ``created`` leaves a ``success`` that beat the
        answer, and a ``failed`` found this way is recorded as ``created`` (a failure
        counts only once confirmed: ``apply_transfer_status``). ``check_at``: when to ask
        Stark Bank about it if nothing is heard (default: now). ``owner``: the claim's lease
        holder, when it is ``sending``.
        """
        recorded = []
        with self.atomic():
            rows = self._locked_transfers([external_id for external_id, _, _ in answers])
            for external_id, transfer_id, status in answers:
                status = status if status in transfer_states.MOVING else "created"
                row = rows.pop(external_id, None) or self._one(  # read again: a repeat of one external id
                    f"select state, lease_owner from transfer where external_id = ?{self._conn.locked}", (external_id,))
                if row is None:
                    continue
                target = status if transfer_states.allowed(row["state"], status) else None
                if self._move(external_id, target, now, owner=owner if row["state"] == "sending" else None,
                              transfer_id=transfer_id, next_try_at=check_at or now, row=row):
                    recorded.append(external_id)
        return recorded

    def retry_transfer(self, external_id, errors, next_try_at, now, owner=None):
        """Put a transfer back to ``pending`` until ``next_try_at``, same external id; return True if written.

        From ``sending`` (no definite answer; ``owner``: the lease holder) or ``pending``.
        """
        with self.atomic():
            return self._move(external_id, "pending", now, expect=("sending", "pending"), owner=owner,
                              errors=errors, next_try_at=next_try_at)

    def settle_transfer(self, external_id, state, errors, now, owner=None, next_try_at=None):
        """Record a definite create refusal: ``rejected``, or ``exists`` (looked up from ``next_try_at``)."""
        with self.atomic():
            return self._move(external_id, state, now, owner=owner, errors=errors, next_try_at=next_try_at or now)

    def note_check(self, external_id, errors, next_try_at, now):
        """Record that Stark Bank was asked about an open transfer and when to ask again; its state stays."""
        with self.atomic():
            return self._move(external_id, None, now, errors=errors, next_try_at=next_try_at)

    def attempts(self, invoice_id):
        """Return every Transfer attempt of an invoice, by attempt number (empty if it has none)."""
        with self._lock:
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer where invoice_id = ? order by attempt",
                             (invoice_id,))
        return [_transfer_of(r) for r in rows]

    def queue_attempt(self, invoice_id, after_attempt, external_id, now):
        """Queue attempt ``after_attempt + 1`` of an invoice's transfer, ``pending``; return True if queued.

        Only while attempt ``after_attempt`` is still the latest and its state is one
        ``transfer_states.FINAL_UNPAID`` names, checked in the same transaction as the
        insert; the unique (invoice, attempt) key makes two concurrent calls insert one
        row. False: another attempt came first, or the state moved meanwhile.
        """
        with self.atomic():
            row = self._one("select attempt, state, amount from transfer where invoice_id = ?"
                            f" order by attempt desc limit 1{self._conn.locked}", (invoice_id,))
            if row is None or row["attempt"] != after_attempt or row["state"] not in transfer_states.FINAL_UNPAID:
                return False
            return self._insert_transfer(external_id, invoice_id, after_attempt + 1, row["amount"], now)

    def credit_outcomes(self):
        """Return {outcome code: events} of the processed ``credited`` invoice events (for the metrics)."""
        with self._lock:
            rows = self._all("select outcome_code, count(*) as n from event where subscription = 'invoice'"
                             " and log_type = 'credited' and processed_at is not null group by outcome_code")
        return {r["outcome_code"]: r["n"] for r in rows}

    def apply_transfer_status(self, external_id, transfer_id, status, errors, now, retry_external_id=None,
                              confirmed_failed=False, check_at=None):
        """Record a status Stark Bank reported for one of our transfers; return the Transfer, or None.

        Nothing changes unless ``transfer_id`` is the Stark Bank id recorded for the
        transfer (``transfer_created``). Whether the status moves it is
        ``transfer_states.allowed``; a confirmed failure of a first attempt queues the
        second one under ``retry_external_id`` in the same transaction (once: the
        attempt number is unique per invoice). ``check_at``: when to ask Stark Bank
        about it next if it stays open.
        """
        with self.atomic():
            current = self.transfer(external_id)
            if current is None:
                return None
            if current.transfer_id is None or current.transfer_id != transfer_id:
                return current
            columns = {"next_try_at": check_at or now}
            if errors:
                columns["errors"] = errors
            self._move(external_id, status if transfer_states.allowed(current.state, status, confirmed_failed)
                       else None, now, confirmed_failed=confirmed_failed, **columns)
            if status == "failed" and confirmed_failed and current.attempt == 1 and retry_external_id:
                # Also when already 'failed': a repeat inserts nothing.
                self._insert_transfer(retry_external_id, current.invoice_id, 2, current.amount, now)
            return self.transfer(external_id)

    # -- alarms -----------------------------------------------------------------

    def sync_alarms(self, kind, standing, now):
        """Make the alarms of ``kind`` those of ``standing`` ({subject: detail}); return the ones newly raised.

        An alarm no longer standing is resolved; one raised again after its resolution
        counts as new. Returned as [(subject, detail)], for their one ERROR line.
        """
        if kind not in ALARMS:
            raise ValueError(f"unknown alarm kind {kind!r}")
        with self.atomic():
            rows = self._all("select subject from alarm where kind = ? and resolved_at is null", (kind,))
            open_now = {r["subject"] for r in rows}
            for subject in open_now - set(standing):
                self._conn.execute("update alarm set resolved_at = ? where kind = ? and subject = ?",
                                   (_iso(now), kind, subject))
            raised = [(subject, detail) for subject, detail in sorted(standing.items()) if subject not in open_now]
            for subject, detail in raised:
                self._conn.execute(
                    "insert into alarm (kind, subject, detail, raised_at) values (?, ?, ?, ?)"
                    " on conflict (kind, subject) do update set detail = excluded.detail,"
                    " raised_at = excluded.raised_at, resolved_at = null",
                    (kind, subject, detail, _iso(now)),
                )
            return raised

    def alarms(self):
        """Return the standing alarms as dicts (kind, subject, detail, raised_at), oldest first."""
        with self._lock:
            rows = self._all("select kind, subject, detail, raised_at from alarm where resolved_at is null"
                             " order by raised_at, kind, subject")
        return [dict(r) for r in rows]

    def open_transfers_since(self, before):
        """Return the open transfers created before ``before`` (aware UTC)."""
        with self._lock:
            marks = ",".join("?" * len(transfer_states.OPEN))
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer where state in ({marks}) and created_at < ?",
                             (*transfer_states.OPEN, _iso(before)))
        return [_transfer_of(r) for r in rows]

    def credits_failed(self):
        """Return {invoice id: detail} of credits whose latest attempt is ``FAILED`` (failed or
        rejected): nothing forwarded and no attempt left (a first failure queues the second
        itself), so a person must look."""
        marks = ",".join("?" * len(transfer_states.FAILED))
        with self._lock:
            rows = self._all(f"select {_TRANSFER_COLUMNS} from transfer t where state in ({marks}) and attempt ="
                             " (select max(attempt) from transfer where invoice_id = t.invoice_id)"
                             " order by invoice_id", tuple(transfer_states.FAILED))
        return {t.invoice_id: f"attempt {t.attempt} ({t.external_id}, {t.amount} cents) {t.state}"
                              + (f": {t.errors[-1][1]}" if t.errors else "")
                for t in map(_transfer_of, rows)}

    def credits_reversed(self):
        """Return {invoice id: detail} of our credited invoices that Stark Bank then reversed
        (a ``reversed`` log: the payer got money back), with what we forwarded or owe."""
        with self._lock:
            rows = self._all("select c.invoice_id, c.net, t.external_id, t.state from credit c"
                             " join invoice i on i.id = c.invoice_id"
                             " left join transfer t on t.invoice_id = c.invoice_id"
                             " where i.status = 'reversed' order by c.invoice_id, t.attempt")
        found = {}
        for r in rows:
            found.setdefault(r["invoice_id"], [r["net"], []])[1].append(f"{r['external_id']} {r['state']}")
        return {invoice: f"credit of {net} cents; transfers: {', '.join(attempts)}"
                for invoice, (net, attempts) in found.items()}

    def invoices_moving_twice(self):
        """Return {invoice id: [external ids]} of invoices with more than one attempt moving or paid."""
        marks = ",".join("?" * len(transfer_states.MOVING))
        with self._lock:
            rows = self._all(f"select invoice_id, external_id from transfer where state in ({marks}) and invoice_id in"
                             f" (select invoice_id from transfer where state in ({marks}) group by invoice_id"
                             " having count(*) > 1) order by invoice_id, attempt",
                             (*transfer_states.MOVING, *transfer_states.MOVING))
        found = {}
        for r in rows:
            found.setdefault(r["invoice_id"], []).append(r["external_id"])
        return found

    def credits_refused(self, codes):
        """Return {invoice id: outcome text} of ``credited`` events processed with one of ``codes`` and no credit."""
        marks = ",".join("?" * len(codes))
        with self._lock:
            rows = self._all(f"select entity_id, outcome from event where subscription = 'invoice'"
                             f" and log_type = 'credited' and outcome_code in ({marks}) and entity_id != ''"
                             " and not exists (select 1 from credit c where c.invoice_id = event.entity_id)"
                             " order by received_at", tuple(codes))
        return {r["entity_id"]: r["outcome"] for r in rows}

    # -- reports ----------------------------------------------------------------

    def _count_and_sum(self, table, column):
        # {value of column: {"count": rows, "amount": cents}}; table and column are this module's literals.
        rows = self._all(f"select {column} as k, count(*) as count, coalesce(sum(amount), 0) as amount"
                         f" from {table} group by {column}")
        return {r["k"]: {"count": r["count"], "amount": r["amount"]} for r in rows}

    def summary(self):
        """Return a dict of the numbers an operator wants: rounds, invoices, credits, transfers, events, alarms."""
        not_ours = ",".join("?" * len(NOT_OURS_CODES))
        invalid = ",".join("?" * len(INVALID_CODES))
        with self.atomic():  # one snapshot, also on a read-only Store
            rounds = dict(tuple(r) for r in self._all("select state, count(*) from round group by state"))
            invoices = self._count_and_sum("invoice", "status")
            credited = self._one(
                "select count(*) as count, coalesce(sum(amount), 0) as amount, coalesce(sum(fee), 0) as fee,"
                " coalesce(sum(net), 0) as net from credit"
            )
            transfers = self._count_and_sum("transfer", "state")
            events = self._one(
                "select count(*) as received, count(*) filter (where processed_at is null) as pending,"
                " max(received_at) filter (where source = 'webhook') as last_webhook_at,"
                # Genuine events that are not about our money, and events with bad data (vocabulary.OUTCOMES).
                f" count(*) filter (where outcome_code in ({not_ours})) as not_ours,"
                f" count(*) filter (where outcome_code in ({invalid})) as invalid from event",
                (*NOT_OURS_CODES, *INVALID_CODES),
            )
            schedule = self._one("select started_at, interval_s, duration_s from schedule")
            latest = self._all(
                "select t.state, t.attempt from transfer t where t.attempt = (select max(attempt)"
                " from transfer l where l.invoice_id = t.invoice_id)")
            alarms = self._all("select kind, subject, detail, raised_at from alarm where resolved_at is null"
                               " order by raised_at, kind, subject")
        return {
            # credits that needed more than one attempt, and those whose latest attempt is stuck
            "attempts": {"retried": sum(1 for r in latest if r["attempt"] > 1),
                         "stuck": sum(1 for r in latest if r["state"] in transfer_states.RETRYABLE)},
            "schedule": dict(schedule) if schedule else None,
            "rounds": {state: rounds.get(state, 0) for state in ("issued", "issuing", "failed")},
            "invoices": invoices,
            "credits": dict(credited),
            "transfers": transfers,
            "transferred": transfers.get("success", {"amount": 0})["amount"],
            "events": dict(events),
            "alarms": [dict(r) for r in alarms],
            "storage": self._storage(),
        }

    def _storage(self):
        """Return the database's size: bytes in use, bytes free, the oldest event's time.

        SQLite: the file's pages in use and those it keeps free for reuse; the
        write-ahead log beside it is left out (it comes and goes with checkpoints, and
        is cut back to ``sqlite_db.WAL_LIMIT_BYTES`` after each). PostgreSQL: the
        database's size on the server (``pg_database_size``), free_bytes 0: the space
        its tables keep for reuse is the server's to manage (VACUUM), not measured here.
        """
        oldest = self._one("select min(received_at) as at from event")["at"]
        if self.backend == "postgres":
            size = self._one("select pg_database_size(current_database()) as size")["size"]
            return {"bytes": int(size), "free_bytes": 0, "oldest_event_at": oldest}
        page = self._one("pragma page_size")[0]
        pages, free = self._one("pragma page_count")[0], self._one("pragma freelist_count")[0]
        return {"bytes": (pages - free) * page, "free_bytes": free * page, "oldest_event_at": oldest}

# Error codes with which Stark Bank refuses a create because a transfer with the external id exists.
DUPLICATE_CODES = frozenset({"invalidExternalId", "duplicatedExternalId", "externalIdAlreadyUsed"})


def _to_version_1(store):
    """Version 0 -> 1: outcome codes, transfer leases and the ``exists`` state, alarms; dead credit columns out.

    Events keep their outcome text; the code is derived once from the wording older
    versions wrote (``_LEGACY_OUTCOMES``). ``stalled`` transfers go back to ``pending``
    (sent again under the same external id); a ``rejected`` one whose refusal was the
    duplicate external id becomes ``exists`` (a transfer with that id exists: it is looked
    up, never sent again). Credits ``skipped`` by older versions queued nothing: removed.
    """
    conn = store._conn
    conn.execute("alter table event add column outcome_code text")
    rows = conn.execute("select id, outcome from event where outcome is not null").fetchall()
    conn.executemany("update event set outcome_code = ? where id = ?",
                     [(_legacy_code(r["outcome"]), r["id"]) for r in rows])
    conn.execute("delete from credit where state = 'skipped'"
                 " and not exists (select 1 from transfer t where t.invoice_id = credit.invoice_id)")
    conn.execute("alter table credit drop column reason")
    conn.execute("alter table credit drop column state")
    now = _iso(datetime.datetime.now(datetime.timezone.utc))
    conn.execute("update transfer set state = 'pending', tries = 0, next_try_at = ? where state = 'stalled'", (now,))
    conn.execute(_TRANSFER_DDL % {**_SCHEMA_NAMES, "table": "transfer_next"})
    columns = ("external_id, invoice_id, attempt, amount, state, transfer_id, tries, next_try_at, errors,"
               " created_at, updated_at")
    conn.execute(f"insert into transfer_next ({columns}) select {columns} from transfer")
    conn.execute("drop table transfer")
    conn.execute("alter table transfer_next rename to transfer")
    for row in conn.execute("select external_id, errors from transfer where state = 'rejected'").fetchall():
        codes = {str(e[0]) for e in json.loads(row["errors"] or "[]") if e}
        if codes & DUPLICATE_CODES:
            conn.execute("update transfer set state = 'exists', next_try_at = ? where external_id = ?",
                         (now, row["external_id"]))


# Older versions wrote an event's outcome as prose only: (its first words, the code). Read once, by _to_version_1.
_LEGACY_OUTCOMES = (
    ("credit queued", "credit_queued"),
    ("credit already recorded", "credit_known"),
    ("not issued here: Stark Bank has no such invoice", "not_ours_unknown_invoice"),
    ("not issued here: the invoice lacks the tag", "not_ours_missing_tag"),
    ("not issued here: Stark Bank reports it", "not_ours_not_paid"),
    ("not issued here", "not_ours_unknown_invoice"),
    ("invalid: credited invoice without a fee", "invalid_missing_fee"),
    ("invalid: credited invoice without integer", "invalid_not_integer"),
    ("invalid: amount", "invalid_amount"),
    ("invalid: fee", "invalid_fee"),
    ("invalid", "invalid_malformed"),
    ("transfer not ours", "transfer_not_ours"),
    ("transfer failed not confirmed", "transfer_failed_unconfirmed"),
    ("transfer ", "transfer_status"),
    ("invoice ", "invoice_status"),
    ("ignored", "ignored"),
)


def _legacy_code(text):
    if text.startswith("invoice ") and text.endswith("(not ours)"):
        return "invoice_not_ours"
    return next((code for prefix, code in _LEGACY_OUTCOMES if text.startswith(prefix)), "ignored")


def _to_version_2(store):
    """Version 1 -> 2: a round's lease (``lease_owner``, ``lease_until``), for instances sharing a database."""
    for column in ("lease_owner", "lease_until"):
        store._conn.execute(f"alter table round add column {column} text")


# _UPGRADES[n] brings version n to n + 1. Versions 0 and 1 only ever existed in SQLite files:
# a PostgreSQL database is created at the current version.
_UPGRADES = (_to_version_1, _to_version_2)
