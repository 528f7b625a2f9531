"""Transfer states: the life of a transfer we owe, in one table read by the schema, the store and the report.

=============  ====  =====  ======  ==================================================
state          rank  open   failed  may become
=============  ====  =====  ======  ==================================================
``pending``    0     yes    no      ``sending`` (claimed before the create call);
                                    what our lookup by tag finds
``sending``    0     yes    no      what the create call (or the lookup after it)
                                    answers; ``pending`` (no definite answer: sent
                                    again under the same external id, with backoff);
                                    ``exists``; ``rejected``; ``sending`` (an expired
                                    lease taken over, to settle it by lookup)
``exists``     0     yes    no      what our lookup by tag finds: Stark Bank refused
                                    the create because the external id exists, so
                                    it is looked up until found, never sent again
``created``    1     yes    no      ``processing``, ``success``, ``failed``
``processing`` 2     yes    no      ``success``, ``failed``
``success``    3     no     no      ``failed`` (only when confirmed)
``rejected``   0     no     yes     what our lookup finds (Stark Bank's facts win);
                                    refused for a reason other than a duplicate
                                    external id, on the external id's only create call
``failed``     4     no     yes     nothing: final
=============  ====  =====  ======  ==================================================

Rules the store keeps with this table (``allowed`` is the one check of every write):

- a status reported by Stark Bank (``created``, ``processing``, ``success``) moves a
  transfer only to a higher rank: logs arrive in any order, and ``failed`` (rank 4)
  is never left;
- a transfer log changes a transfer only when it carries the Stark Bank id we
  recorded for it (external ids are unique per workspace only);
- ``failed`` counts only when confirmed (Stark Bank, asked with ``transfer.get`` for
  our id, reports it failed, and no transfer of the invoice is ``MOVING``); then it
  is final, even after ``success``, and a first attempt queues the second one, once.

One rule for a new external id: an attempt without a definite answer is sent again
under the same external id (Stark Bank keeps at most one transfer per external id
that can move money); a new attempt (a new external id) is queued only once the
previous one is ``FINAL_UNPAID``: confirmed ``failed``, or ``rejected`` for a reason
that is not "the external id exists".

``open`` states are money not yet seen to move (the report's "pending"); ``failed``
states are money that never will. ``RETRYABLE``: when the latest attempt of a credit
is in one of these, an operator may queue one more attempt (``transfers retry``).
"""

from typing import NamedTuple

__all__ = ["TransferState", "TRANSFER_STATES", "NAMES", "OPEN", "FAILED", "REPORTED", "RETRYABLE", "MOVING",
           "FINAL_UNPAID", "UNANSWERED", "rank", "moves", "allowed"]


class TransferState(NamedTuple):
    """One state of a transfer: its name, its rank among Stark Bank's statuses, and where it may go."""

    name: str
    rank: int  # order of Stark Bank's statuses; a reported status only moves a transfer up
    open: bool  # the money has not been seen to move yet
    failed: bool  # the money will not move
    next: frozenset  # the states it may become


def _state(name, rank, is_open, failed, next_states):
    return TransferState(name, rank, is_open, failed, frozenset(next_states.split()))


_FOUND = "created processing success failed"  # what a create answer or a lookup may report

TRANSFER_STATES = (
    _state("pending", 0, True, False, "sending " + _FOUND),
    _state("sending", 0, True, False, "sending pending exists rejected " + _FOUND),
    _state("exists", 0, True, False, _FOUND),
    _state("created", 1, True, False, "processing success failed"),
    _state("processing", 2, True, False, "success failed"),
    _state("success", 3, False, False, "failed"),
    _state("rejected", 0, False, True, _FOUND),
    _state("failed", 4, False, True, ""),
)

_BY_NAME = {s.name: s for s in TRANSFER_STATES}
NAMES = tuple(_BY_NAME)
OPEN = tuple(s.name for s in TRANSFER_STATES if s.open)
FAILED = tuple(s.name for s in TRANSFER_STATES if s.failed)
REPORTED = tuple(_FOUND.split())  # the statuses a create answer or a lookup records
# Final and moved no money: only after these may a new external id be sent for the credit.
FINAL_UNPAID = ("rejected", "failed")
RETRYABLE = FINAL_UNPAID  # an operator may queue one more attempt after these
# Open without a Stark Bank id: the create call's outcome is not known yet.
UNANSWERED = ("pending", "sending", "exists")
# Stark Bank's statuses of a transfer whose money moved or may still move.
MOVING = ("created", "processing", "success")


def rank(name):
    """Return the rank of a state; 0 for a status this table does not know."""
    state = _BY_NAME.get(name)
    return state.rank if state else 0


def moves(current, reported, confirmed_failed=False):
    """Return True if a status Stark Bank reported moves a transfer in state ``current``.

    ``failed`` moves only when ``confirmed_failed``; any other status only to a higher rank.
    """
    if reported == "failed":
        return confirmed_failed and "failed" in _BY_NAME[current].next
    return rank(reported) > rank(current) and reported in _BY_NAME[current].next


def allowed(current, target, confirmed_failed=False):
    """Return True if a transfer in state ``current`` may be written as ``target``: the store's one check.

    A status Stark Bank reports follows ``moves``; any other move must be in the table.
    """
    if current not in _BY_NAME or target not in _BY_NAME:
        return False
    if target in REPORTED:
        return moves(current, target, confirmed_failed)
    return target in _BY_NAME[current].next
