"""Vocabulary: the names the service writes and reads back, each defined once.

- ids and tags: a transfer's external id (``external_id``), the tag that names its
  invoice (``invoice_tag``) and the tags a transfer carries (``transfer_tags``);
- round states (``ROUND_STATES``);
- event outcomes: a code (``Outcome.code``, stored in its own column, grouped by the
  metrics and the status) and its prose for people (``Outcome.text``); nothing reads
  the prose back;
- alarm kinds (``ALARMS``).

Pure data and pure functions; imports nothing of the service.
"""

from typing import NamedTuple

__all__ = ["external_id", "invoice_tag", "transfer_tags", "ROUND_STATES", "Outcome",
           "OUTCOMES", "NOT_OURS_CODES", "INVALID_CODES", "CREDIT_CODES", "ALARMS"]


def external_id(instance_tag, invoice_id, attempt):
    """Return the external id of a transfer for an invoice: ``<tag>-inv-<id>``, ``-2`` for the second attempt.

    Our own prefix, never the bare ``invoice-<id>`` (reported to clash with Stark Bank's
    own use). Deterministic, so Stark Bank itself refuses a repeat.
    """
    base = f"{instance_tag}-inv-{invoice_id}"
    return base if attempt == 1 else f"{base}-{attempt}"


_INVOICE_TAG = "invoice-"


def invoice_tag(invoice_id):
    """Return the tag every transfer attempt of an invoice carries, to find them all at Stark Bank."""
    return _INVOICE_TAG + str(invoice_id)


def transfer_tags(instance_tag, invoice_id, external_id_):
    """Return the tags of a transfer: deployment, invoice, and its own external id (to find it again)."""
    return [instance_tag, invoice_tag(invoice_id), external_id_]


ROUND_STATES = ("issuing", "issued", "failed")


class Outcome(NamedTuple):
    """What processing an event did: a stable ``code`` and a line of ``text`` for people."""

    code: str
    text: str


# code -> (metrics outcome label, metrics reason) for credited events; other codes: (None, None).
OUTCOMES = {
    "credit_queued": ("queued", None),
    "credit_known": (None, None),  # the credit was recorded before
    "not_ours_unknown_invoice": ("not_ours", "unknown_invoice"),
    "not_ours_missing_tag": ("not_ours", "missing_tag"),
    "not_ours_not_paid": ("not_ours", "not_paid"),
    "not_ours_not_found": ("not_ours", "not_found"),  # ours by its tag, but Stark Bank never found it
    "invalid_missing_fee": ("invalid", "missing_fee"),
    "invalid_not_integer": ("invalid", "not_integer"),
    "invalid_amount": ("invalid", "amount_not_positive"),
    "invalid_fee": ("invalid", "fee_out_of_range"),
    "invalid_malformed": ("invalid", "malformed"),
    "invoice_status": (None, None),  # another log of an invoice of ours
    "invoice_not_ours": (None, None),  # another log of an invoice we did not issue
    "transfer_status": (None, None),  # a log of a transfer of ours, applied
    "transfer_failed_unconfirmed": (None, None),  # a 'failed' log Stark Bank does not confirm yet: re-checked
    "transfer_not_ours": (None, None),
    "ignored": (None, None),  # a subscription the service does not act on
}
NOT_OURS_CODES = tuple(c for c, (label, _) in OUTCOMES.items() if label == "not_ours") + ("transfer_not_ours",)
INVALID_CODES = tuple(c for c, (label, _) in OUTCOMES.items() if label == "invalid")
CREDIT_CODES = tuple(c for c, (label, _) in OUTCOMES.items() if label in ("not_ours", "invalid"))

# Alarm kind -> what a person must look at.
ALARMS = {
    "transfer_open": "a transfer is still open after the alarm threshold",
    "credit_refused": "a genuine credit of ours failed the amount checks: nothing was forwarded",
    "invoice_not_found": "Stark Bank never found an invoice that carries our tag: nothing was forwarded",
    "credit_unpaid": "a credit of an invoice of ours that Stark Bank still reports not paid: nothing was forwarded",
    "attempts_moving": "two transfer attempts of one invoice are both moving or paid",
    "credit_failed": "every transfer attempt of a credit failed at Stark Bank (insufficient balance, say): "
                     "nothing was forwarded; 'transfers retry' sends one more",
    "credit_reversed": "Stark Bank reversed the payment of an invoice whose credit we forward: "
                       "what was forwarded already left",
}
