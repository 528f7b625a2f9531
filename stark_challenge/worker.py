"""Worker: the background thread that turns stored events into transfers.

One pass (``run_once``) does, in order:

1. pull undelivered events from Stark Bank, when due (at start-up, then every
   ``EVENT_POLL_INTERVAL``): each is stored exactly like a pushed one (same event-id
   dedup), processed, and only then marked delivered at Stark Bank. A pull that
   fails is tried again with exponential backoff and jitter (never later than the
   next regular pull), so a failure at start-up is not left for the whole interval;
2. process the stored events not yet processed (``events.process``), a batch of
   them in one transaction; if one of them fails, the batch is rolled back and done
   again one event per transaction, so the failing event stays pending and is tried
   again, without holding up the others. ``events.process`` calls no bank: before
   the batch, what it needs from Stark Bank (``events.question``: is this unknown
   invoice ours and paid, which transfer did our create call make, did our transfer
   really fail) is asked here with our own credentials and handed in as
   ``events.Facts``. An event whose question Stark Bank does not answer stays
   pending and is asked again with backoff (bounded, with jitter); the others go on;
3. send the transfers that are due (``transfers.Sender``), up to 100 in one create call;
4. delete a few batches of events older than ``EVENT_RETENTION``, when due (``retention``).

``events.accept`` calls ``wake()`` after storing a new event, so a credit is forwarded at
once; otherwise the thread sleeps until the next due transfer or pull. Passes start at
most once per ``gather_s`` (50 ms): events that arrive while one runs, or just after,
wait for the rest of that time and are then processed together, in one transaction,
their transfers in one create call, instead of one pass (one commit, one call) each. Errors are
caught per pass and per item, logged with the id, and the loop carries on.
``recover()`` runs once before the loop: it settles what a crash left half-done.
"""

import collections
import datetime
import logging
import random
import threading
import time

from . import events, vocabulary
from .errors import BankError, StoreError, StoreUnavailable
from .timing import backoff, utcnow
from .metrics import Counters
from .transfers import CHECK_AFTER_S, CHECK_EVERY_S, CHECKS_PER_PASS, Sender

__all__ = ["Worker"]

_RECONCILE_ROUNDS = 20  # pages of checks in one reconciliation pass; what is left waits for the next
_RATE_LIMITED = "held back by the rate limit on lookups of unknown invoice ids"

logger = logging.getLogger(__name__)

IDLE_WAKE_S = 30.0  # wake at least this often, to notice due retries and pulls
ERROR_PAUSE_S = 5.0  # after a pass failed as a whole
PULL_RETRY_BASE_S = 2.0  # first wait after a failed pull; doubles per failure
PULL_RETRY_MAX_S = 300.0
ASK_RETRY_BASE_S = 2.0  # first wait before asking Stark Bank again about an event; doubles per failure
ASK_RETRY_MAX_S = 300.0
GATHER_S = 0.05  # passes start at least this far apart, so a busy intake gives batches
RECONCILE_INTERVAL_S = 300.0  # the reconciliation pass: open transfers quiet for long asked about, alarms
ALARM_AFTER_S = 3600.0  # a transfer open this long, or an invoice of ours not found this long, is an alarm
NOT_OURS_REMEMBERED = 10_000  # invoice ids Stark Bank said are not ours, kept to answer again without asking
UNKNOWN_LOOKUPS_PER_S = 2.0  # invoice lookups for ids our store does not hold, on average...
UNKNOWN_LOOKUPS_BURST = 10  # ... and at most this many at once


class Worker:
    """Processes stored events and sends transfers, in one thread. See the module docstring."""

    def __init__(self, store, bank, instance_tag, poll_interval_s, clock=utcnow, sender=None, rng=None,
                 counters=None, gather_s=GATHER_S, reconcile_interval_s=RECONCILE_INTERVAL_S,
                 reconcile_after_s=CHECK_AFTER_S, alarm_after_s=ALARM_AFTER_S, lease_s=None,
                 monotonic=time.monotonic, retention=None, idle_s=IDLE_WAKE_S):
        self._store = store
        self._bank = bank
        self._tag = instance_tag
        self._poll_interval_s = poll_interval_s  # 0 = pull only at start-up
        self._clock = clock
        self.counters = counters or Counters()  # event pulls and their failures (and the sender's calls)
        lease = {"lease_s": lease_s} if lease_s else {}
        self._sender = sender or Sender(store, bank, instance_tag, clock, counters=self.counters,
                                        check_after_s=reconcile_after_s,
                                        check_every_s=min(reconcile_interval_s, CHECK_EVERY_S), **lease)
        self._check_after = datetime.timedelta(seconds=reconcile_after_s)
        self._reconcile_every = datetime.timedelta(seconds=reconcile_interval_s)
        self._next_reconcile_at = None  # None: at the first pass
        self._alarm_after = datetime.timedelta(seconds=alarm_after_s)
        self._not_ours = collections.OrderedDict()  # invoice id -> Stark Bank's answer that it is not ours
        self._monotonic = monotonic
        self._tokens = float(UNKNOWN_LOOKUPS_BURST)  # lookups of unknown invoice ids that may be made now
        self._tokens_at = monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._listener = None  # the store's notifications of other instances' work, if any
        self._rng = rng or random.Random()  # jitter of the pull retries
        self._next_pull_at = None  # None: pull on the next pass until one succeeded, then never
        self._pulled_once = False  # a pull succeeded
        self._pull_failures = 0  # failed pulls in a row
        self._waiting = {}  # event id -> (when to ask again, failures in a row): questions Stark Bank left unanswered
        self._page_full = False  # the last process_events took a full batch: more may be pending
        self._gather_s = gather_s  # the least time between the starts of two passes of the thread
        # The longest sleep between passes: shorter where other instances share the database,
        # whose claims this one must take over when they die, and whose work it cannot see coming.
        self._idle_s = idle_s
        self._retention = retention  # a retention.Retention, or None to keep every event
        self.last_pass_at = None  # for /health
        self.last_error = None

    # -- one pass ---------------------------------------------------------------

    def recover(self):
        """Settle transfers a crash left in flight; log what was resumed. Safe to call again."""
        pending = len(self._store.pending_events(limit=10_000))
        if pending:
            logger.info("recovery: %d stored events not yet processed; processing them", pending)
        settled = self._sender.recover()
        if settled:
            logger.info("recovery: %d transfers settled by lookup", settled)
        if not (pending or settled):
            logger.info("recovery: no events or transfers left half-done")

    def run_once(self):
        """Do one pass (pull if due, process events, send transfers); return seconds until the next."""
        if self._pull_due():
            self.pull_events()
        # A batch of events, then a batch of transfers (one create call), in turn: with a
        # backlog of events, the credits of the first batch are forwarded while the rest
        # wait, not after all of them. Another batch of events at once only while batches
        # come full or transfers went out (events that arrived meanwhile, e.g. a fast
        # 'success'); events that trickle in later wake the thread for the next pass. One
        # create call at a time, so stop() waits for at most one call: the sender's
        # one-by-one fallbacks also stop once it is asked to.
        self.process_events()
        while not self._stop.is_set():
            sent = self._sender.send_due(stopping=self._stop.is_set)
            if not (sent or self._page_full) or self._stop.is_set():
                break
            self.process_events()
        if not self._stop.is_set():
            self._sender.check_due(states=("sending", "exists"))  # expired claims, and ids Stark Bank said exist
        if not self._stop.is_set() and (self._next_reconcile_at is None or self._clock() >= self._next_reconcile_at):
            self.reconcile()
        if self._retention is not None and not self._stop.is_set():
            self._retention.run_if_due()
        self.last_pass_at = self._clock()
        return self._seconds_to_next()

    def reconcile(self):
        """The reconciliation pass: ask Stark Bank about the open transfers quiet for long; raise and resolve alarms."""
        self._next_reconcile_at = self._clock() + self._reconcile_every
        for _ in range(_RECONCILE_ROUNDS):  # each round asks about one page of due transfers
            if self._stop.is_set() or self._sender.check_due() < CHECKS_PER_PASS:
                break
        self.check_alarms()

    def check_alarms(self):
        """Bring the store's alarms up to date (``vocabulary.ALARMS``); log each new one as an ERROR, once."""
        now = self._clock()
        standing = {
            "transfer_open": {t.external_id: f"invoice {t.invoice_id}, {t.amount} cents, {t.state} since "
                                             f"{t.created_at.isoformat(timespec='seconds')}"
                                             + (f"; last error: {t.errors[-1][1]}" if t.errors else "")
                              for t in self._store.open_transfers_since(now - self._alarm_after)},
            "credit_refused": self._store.credits_refused(vocabulary.INVALID_CODES),
            "invoice_not_found": self._store.credits_refused(("not_ours_not_found",)),
            "credit_unpaid": self._store.credits_refused(("not_ours_not_paid",)),
            "attempts_moving": {invoice: "attempts " + ", ".join(ids)
                                for invoice, ids in self._store.invoices_moving_twice().items()},
            "credit_failed": self._store.credits_failed(),
            "credit_reversed": self._store.credits_reversed(),
        }
        for kind, found in standing.items():
            for subject, detail in self._store.sync_alarms(kind, found, now):
                logger.error("ALARM %s: %s: %s (%s)", kind, subject, detail, vocabulary.ALARMS[kind])

    def _pull_due(self):
        if self._next_pull_at is None:
            return not self._pulled_once
        return self._clock() >= self._next_pull_at

    def _seconds_to_next(self):
        now = self._clock()
        candidates = [self._idle_s]
        for due in (self._store.next_transfer_due_at(), self._store.next_check_at(("sending", "exists")),
                    self._next_reconcile_at):
            if due is not None:
                candidates.append((due - now).total_seconds())
        if self._next_pull_at is not None:
            candidates.append((self._next_pull_at - now).total_seconds())
        if self._waiting:
            candidates.append((min(at for at, _ in self._waiting.values()) - now).total_seconds())
        return max(0.0, min(candidates))

    def process_events(self, limit=100):
        """Process up to ``limit`` stored events; return how many were processed.

        The batch is applied in one transaction (one commit, one fsync, instead of one
        per event), each event still marked processed with its own effects.
        If any event of the batch raises, the whole batch is rolled back and its events
        are processed again one transaction each: an event whose processing fails (the
        store refused, say) is logged and left pending for a later pass, and the events
        after it are still processed. Lines an event logged in a rolled-back batch are
        logged again when it is processed on its own.
        """
        now = self._clock()
        later = {event_id for event_id, (at, _) in self._waiting.items() if at > now}
        pending = [e for e in self._store.pending_events(limit + len(later), ours_first=True, skip_held=True)
                   if e.id not in later][:limit]
        self._page_full = len(pending) == limit  # more may be waiting
        if not pending:
            return 0
        facts, unanswered = self._ask_bank(pending)
        for event_id, reason in unanswered.items():
            self._wait(event_id, reason, quiet=reason == _RATE_LIMITED)
        pending = [e for e in pending if e.id not in unanswered]
        if not pending:
            return 0
        try:
            with self._store.atomic():
                outcomes = [events.process(self._store, event, self._tag, self._clock(), facts) for event in pending]
        except Exception:  # the loop boundary: one bad event must not hold up the others
            return self._process_one_by_one(pending, facts)
        return sum(self._done(event, outcome) for event, outcome in zip(pending, outcomes))

    def _process_one_by_one(self, pending, facts):
        processed = 0
        for event in pending:
            try:
                outcome = events.process(self._store, event, self._tag, self._clock(), facts)
            except Exception:  # the loop boundary: one bad event must not hold up the others
                logger.exception("event %s: processing failed; will retry", event.id)
                continue
            processed += self._done(event, outcome)
        return processed

    def _done(self, event, outcome):
        """Log an event's outcome; return 1 if it was processed, 0 if it still waits for Stark Bank."""
        if outcome is None:
            self._wait(event.id, "an answer it needs is missing")
            return 0
        self._waiting.pop(event.id, None)
        logger.debug("event %s (%s %s): %s", event.id, event.subscription, event.log_type, outcome)
        return 1

    def _wait(self, event_id, reason, quiet=False):
        """Leave an event pending and ask again later, with exponential backoff (capped) and jitter.

        ``quiet``: logged at DEBUG (a lookup held back by the rate limit, not a failure).
        """
        _, failures = self._waiting.get(event_id, (None, 0))
        delay = backoff(failures + 1, ASK_RETRY_BASE_S, ASK_RETRY_MAX_S, self._rng)
        self._waiting[event_id] = (self._clock() + datetime.timedelta(seconds=delay), failures + 1)
        logger.log(logging.DEBUG if quiet else logging.WARNING,
                   "event %s: left pending (%s; %d in a row), asking Stark Bank again in %.1f s",
                   event_id, reason, failures + 1, delay)

    def _ask_bank(self, pending):
        """Ask Stark Bank what ``pending`` events need (``events.question``).

        Return (events.Facts, {event id: why it is unanswered}). Each question is asked
        once per batch. Calls are made outside any store transaction, with our own
        credentials. Invoice ids our store does not hold are answered from what Stark
        Bank said before (not ours), else asked within a rate limit: a flood of them
        waits its turn while our own events go on.
        """
        invoices, transfers, not_created = {}, {}, set()
        errors = {}  # Question -> None if Stark Bank answered it, else why not
        unanswered = {}
        for event in pending:
            for _ in range(3):  # a lookup that finds our transfer may lead to a get of its failure
                asked = events.question(self._store, event)
                if asked is not None and asked not in errors:
                    try:
                        errors[asked] = self._answer(asked, event, invoices, transfers, not_created)
                        if errors[asked] is None:
                            continue
                    except BankError as e:
                        errors[asked] = e
                if asked is not None and errors[asked] is not None:
                    unanswered[event.id] = (errors[asked] if errors[asked] is _RATE_LIMITED
                                            else f"{asked.kind} {asked.key}: {errors[asked]}")
                break
        check_at = self._clock() + self._check_after
        return events.Facts(invoices, transfers, frozenset(not_created), check_at), unanswered

    def _answer(self, asked, event, invoices, transfers, not_created):
        """Answer one Question into the dicts; return None, or why it stays unanswered. Raise BankError."""
        if asked.kind == "invoice":
            if asked.key in self._not_ours:
                invoices[asked.key] = self._not_ours[asked.key]
                return None
            if not self._take_token():
                return _RATE_LIMITED
            found = self._bank.get("invoice", asked.key)
            if found is None and events.carries_tag(event, self._tag):
                if self._within_grace(event):
                    return "Stark Bank does not find this invoice with our tag yet"
            elif found is None or self._tag not in (found.get("tags") or []):
                self._remember_not_ours(asked.key, found)
            elif found.get("status") != "paid" and self._within_grace(event):
                # Ours, credited, but a lagging read shows it before the payment: not final yet.
                return "Stark Bank does not report this invoice of ours paid yet"
            invoices[asked.key] = found
        elif asked.kind == "transfer":
            found = self._bank.get("transfer", asked.key)
            status = found["status"] if found else None
            transfers[asked.key] = self._sender.confirm_failure(found) if status == "failed" else status
        elif asked.kind == "lookup":
            transfer = self._store.transfer(asked.key)
            if transfer is not None and transfer.transfer_id is None and not self._sender.lookup(transfer):
                if self._within_grace(event):  # our own new transfer may not be listed yet
                    return "Stark Bank does not list our transfer with this external id yet"
                not_created.add(asked.key)
        return None

    def _within_grace(self, event):
        """Return True while a read that does not find our own entity (or shows our credited invoice not paid)
        counts as "not yet" for ``event``.

        That is ``reconcile_after_s`` from the event's arrival: reads may lag writes.
        """
        received = self._store.event_received_at(event.id) or self._clock()
        return self._clock() - received < self._check_after

    def _remember_not_ours(self, invoice_id, answer):
        self._not_ours[invoice_id] = answer
        while len(self._not_ours) > NOT_OURS_REMEMBERED:
            self._not_ours.popitem(last=False)

    def _take_token(self):
        """Return True if a lookup of an unknown invoice id may be made now (a token bucket)."""
        now = self._monotonic()
        self._tokens = min(UNKNOWN_LOOKUPS_BURST, self._tokens + (now - self._tokens_at) * UNKNOWN_LOOKUPS_PER_S)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def pull_events(self):
        """Fetch undelivered events from Stark Bank, store and process them, mark them delivered.

        Return how many were new. Stark Bank errors are logged and the pull is
        tried again with backoff (see the module docstring).
        """
        now = self._clock()
        self.counters.add("stark_challenge_event_pulls_total")
        try:
            found = self._bank.undelivered_events()
        except BankError as e:
            self.counters.add("stark_challenge_event_pull_failures_total")
            self._pull_failures += 1
            cap = min(PULL_RETRY_MAX_S, self._poll_interval_s or PULL_RETRY_MAX_S)  # never later than the next pull
            delay = backoff(self._pull_failures, PULL_RETRY_BASE_S, cap, self._rng)
            self._next_pull_at = now + datetime.timedelta(seconds=delay)
            logger.warning("pull of undelivered events failed (%d in a row), trying again in %.1f s: %s",
                           self._pull_failures, delay, e)
            return 0
        self._pull_failures = 0
        self._pulled_once = True
        self._next_pull_at = (now + datetime.timedelta(seconds=self._poll_interval_s)
                              if self._poll_interval_s else None)
        new = 0
        for event in found:
            try:
                checked = events.check_shape({"event": event})
            except ValueError as e:
                logger.error("pulled event %s is malformed (%s); left undelivered", event.get("id"), e)
                continue
            new += events.accept(self._store, checked, "pull", self._clock(), self.wake)
        if found:
            logger.info("pulled %d undelivered events from Stark Bank, %d new", len(found), new)
        while self.process_events():
            pass
        for event in found:
            if self._stop.is_set():  # what is left unmarked is pulled again, and deduplicated
                break
            if not self._store.event_processed(str(event.get("id"))):
                continue
            try:
                self._bank.mark_delivered(event["id"])
            except BankError as e:
                logger.warning("event %s: could not mark it delivered (%s); it will be pulled again", event["id"], e)
        return new

    # -- the thread -------------------------------------------------------------

    def wake(self):
        """Ask the thread to run a pass now (``events.accept`` calls it after storing a new event)."""
        self._wake.set()

    def start(self):
        """Run ``recover`` and then passes in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="worker", daemon=True)
        self._thread.start()
        try:  # woken when another instance queues a transfer; polling stays the fallback
            self._listener = self._store.listen(self.wake)
        except StoreError as e:
            logger.warning("not listening for other instances' work (%s); polling instead", e)

    def _loop(self):
        recovered = False
        while not self._stop.is_set():
            self._wake.clear()
            began = time.monotonic()
            try:
                if not recovered:  # tried again before each pass until it succeeds (the database may be down)
                    recovered = self._recover_once()
                delay = self.run_once()
                self.last_error = None
            except StoreUnavailable as e:  # the database server is away: no traceback, it reconnects on its own
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning("worker pass failed, the database is unavailable (%s); trying again in %.0f s",
                               e, ERROR_PAUSE_S)
                delay = ERROR_PAUSE_S
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                logger.exception("worker pass failed; trying again in %.0f s", ERROR_PAUSE_S)
                delay = ERROR_PAUSE_S
            self._wake.wait(delay)
            # Woken soon after the pass began: let what else arrives meanwhile join the next.
            self._stop.wait(max(0.0, self._gather_s - (time.monotonic() - began)))

    def _recover_once(self):
        """Run ``recover``; return True if it succeeded, else log why (the loop goes on and tries it again)."""
        try:
            self.recover()
            return True
        except StoreUnavailable as e:
            logger.warning("recovery failed, the database is unavailable (%s); trying it again before the next pass",
                           e)
        except Exception:
            logger.exception("recovery failed; continuing with the normal loop, and trying it again before the next"
                             " pass")
        return False

    def stop(self, timeout=10.0):
        """Finish the current item, stop the thread and wait for it up to ``timeout`` s. Idempotent.

        ``timeout=0`` only asks: the thread stops after its current item.
        """
        self._stop.set()
        self._wake.set()
        if self._listener is not None:
            self._listener.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def state(self):
        """Return a dict describing the worker, for /health."""
        return {
            "alive": bool(self._thread and self._thread.is_alive()),
            "last_pass_at": self.last_pass_at.isoformat() if self.last_pass_at else None,
            "last_error": self.last_error,
        }
