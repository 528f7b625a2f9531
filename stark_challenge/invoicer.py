"""Invoicer: build a round of random invoices and issue it through ``bank``, recorded in ``store``.

A round is issued in one ``create`` call per 100 invoices (Stark Bank's limit per
call; a round of 8-12 is one call). Every invoice carries three tags:

- the deployment's ``INSTANCE_TAG``: only credits of invoices carrying it are forwarded;
- ``round-<n>``: names the round, for people searching Stark Bank's dashboard;
- ``batch-<schedule id>-<n>-<chunk>``: names exactly one create call, so that after an
  ambiguous failure (a timeout: the call may or may not have created the invoices)
  the retry asks Stark Bank for that tag first and re-creates only if nothing carries it.

Invoices have no idempotency key at Stark Bank, so the lookup must not race the call
it is about: when the process stopped during a create call (the round is left
``issuing`` with no retry time), the next attempt waits until ``BANK_TIMEOUT`` after
that call began, by when Stark Bank has either created the batch or dropped it.

``Invoicer.issue_round`` is called by the scheduler's thread only; it is not meant
to run twice at once (the store's lock file keeps other processes away).
"""

import datetime
import logging
import random
from typing import NamedTuple, Optional

from . import logs
from .bank import MAX_PER_CALL
from .errors import BankRejected, BankUnavailable
from .people import random_amount, random_person
from .report import reais
from .taxid import mask_tax_id
from .timing import backoff

__all__ = ["Invoicer", "Outcome", "build_invoices", "round_tags"]

logger = logging.getLogger(__name__)

DUE_AFTER = datetime.timedelta(days=2)  # payers get two days, like a PIX charge
EXPIRATION_S = 7 * 86400  # then a week more before the invoice expires
# A round is tried at most this many times; between tries, exponential backoff.
MAX_ATTEMPTS = 6
MAX_BACKOFF_S = 1800.0


class Outcome(NamedTuple):
    """What became of one call to ``issue_round``."""

    state: str  # 'issued', 'retry', 'failed' or 'done' (settled earlier)
    retry_at: Optional[datetime.datetime]  # when to call again, for 'retry'


def round_tags(instance_tag, schedule_id, n, chunk):
    """Return the tags of the invoices of chunk ``chunk`` of round ``n`` (see the module docstring)."""
    return [instance_tag, f"round-{n}", f"batch-{schedule_id}-{n}-{chunk}"]


def build_invoices(rng, count, now, tags):
    """Return ``count`` random invoices as dicts for ``Bank.create_invoices``. Pure.

    Amounts are integer cents; due two days from ``now`` (aware UTC); expiring a week after.
    """
    invoices = []
    for _ in range(count):
        person = random_person(rng)
        invoices.append({
            "amount": random_amount(rng),
            "name": person.name,
            "tax_id": person.tax_id,
            "due": now + DUE_AFTER,
            "expiration_s": EXPIRATION_S,
            "tags": list(tags),
        })
    return invoices


class Invoicer:
    """Issues rounds: claims the round in the store, creates its invoices, records them."""

    def __init__(self, bank, store, config, schedule_id, clock, rng=None, retry_base_s=30.0):
        self._bank = bank
        self._store = store
        self._config = config
        self._schedule_id = schedule_id
        self._clock = clock  # () -> aware UTC datetime
        self._rng = rng or random.Random()
        self._retry_base_s = retry_base_s  # first backoff; doubles per attempt

    def issue_round(self, n, due_at):
        """Issue round ``n`` unless it was settled before; return an Outcome.

        Never creates a round's invoices twice: the attempt is recorded before the
        call, and a retry looks the batch up by its tag before creating anything
        (after an interrupted call, only once that call is over: see the module
        docstring). BankUnavailable and BankRejected are handled here (retry with
        backoff, then give up after MAX_ATTEMPTS); other errors propagate.
        """
        now = self._clock()
        wait_until = self._interrupted_call_over_at(n, now)
        if wait_until is not None:
            return Outcome("retry", wait_until)
        planned = self._rng.randint(self._config.invoice_min, self._config.invoice_max)
        before = self._store.claim_round(n, due_at, planned, now)
        if before is None:
            return Outcome("done", None)
        attempt = before.attempts + 1
        try:
            self._issue_chunks(n, before.planned, reconcile=before.attempts > 0)
        except (BankUnavailable, BankRejected) as e:
            return self._retry_or_fail(n, attempt, e)
        issued = self._store.finish_round(n, self._clock())
        late = (now - due_at).total_seconds()
        logger.info(
            "round %d issued: %d invoice%s, total %s%s",
            n, issued.count, "" if issued.count == 1 else "s", reais(issued.total),
            f" ({late:.0f} s late)" if late >= 60 else "",
            extra=logs.fields(round=n, invoices=issued.count, amount_cents=issued.total),
        )
        return Outcome("issued", None)

    def _interrupted_call_over_at(self, n, now):
        """Return when the create call of round ``n`` that the last process left out is surely over,
        or None if there is none or it is over by ``now``."""
        current = self._store.round(n)
        if current is None or current.state != "issuing" or current.next_try_at is not None:
            return None
        over_at = current.updated_at + datetime.timedelta(seconds=self._config.bank_timeout_s)
        if over_at <= now:
            return None
        logger.info("round %d: a create call was out when the service stopped; looking the batch up at %s",
                    n, over_at.isoformat(timespec="seconds"))
        return over_at

    def _issue_chunks(self, n, planned, reconcile):
        recorded = self._store.recorded_chunks(n)
        chunks = (planned + MAX_PER_CALL - 1) // MAX_PER_CALL
        for chunk in range(chunks):
            if chunk in recorded:
                continue
            tags = round_tags(self._config.instance_tag, self._schedule_id, n, chunk)
            if reconcile:
                found = self._bank.find_invoices(tags[-1])
                if found:
                    logger.info("round %d chunk %d: found %d invoices created by an earlier attempt", n, chunk, len(found))
                    self._store.record_invoices(n, chunk, found, self._clock())
                    continue
            size = min(MAX_PER_CALL, planned - chunk * MAX_PER_CALL)
            invoices = build_invoices(self._rng, size, self._clock(), tags)
            created = self._bank.create_invoices(invoices)
            self._store.record_invoices(n, chunk, created, self._clock())
            for inv in created:
                logger.debug("invoice %s: %s to %s", inv["id"], reais(inv["amount"]), mask_tax_id(inv["tax_id"]),
                             extra=logs.fields(invoice_id=inv["id"], amount_cents=inv["amount"], round=n))

    def _retry_or_fail(self, n, attempt, error):
        now = self._clock()
        codes = ", ".join(error.codes)
        detail = f"{error}" + (f" [{codes}]" if codes and codes not in str(error) else "")
        if attempt >= MAX_ATTEMPTS:
            self._store.fail_round(n, detail, now)
            logger.error("round %d failed after %d attempts, giving up: %s", n, attempt, detail,
                         extra=logs.fields(round=n))
            return Outcome("failed", None)
        delay = backoff(attempt, self._retry_base_s, MAX_BACKOFF_S, self._rng)
        retry_at = now + datetime.timedelta(seconds=delay)
        self._store.retry_round(n, detail, retry_at, now)
        logger.warning("round %d attempt %d failed, retrying in %.0f s: %s", n, attempt, delay, detail)
        return Outcome("retry", retry_at)
