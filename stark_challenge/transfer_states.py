"""Transfer states: the life of a transfer we owe, in one table read by the schema, the store and the report.

=============  ====  =====  ======  ==================================================
state          rank  open   failed  may become
=============  ====  =====  ======  ==================================================
``pending``    0     yes    no      ``sending`` (claimed before the create call);
                                    what our lookup by tag finds; ``failed``
``sending``    0     yes    no      what the create call (or the lookup after it)
                                    answers; ``pending`` (retry with backoff);
                                    ``stalled``; ``rejected`` (Stark Bank refused it)
``stalled``    0     yes    no      ``pending`` (at the next start-up); what our
                                    lookup finds; ``failed``
``created``    1     yes    no      ``processing``, ``success``, ``failed``
``processing`` 2     yes    no      ``success``, ``failed``
``success``    3     no     no      ``failed`` (only when confirmed)
``rejected``   0     no     yes     what our lookup finds (a refused duplicate exists)
``failed``     4     no     yes     nothing: final
=============  ====  =====  ======  ==================================================

Rules the store keeps with this table:

- a status reported by Stark Bank (``created``, ``processing``, ``success``) moves a
  transfer only to a higher rank: logs arrive in any order, and ``failed`` (rank 4)
  is never left;
- a transfer log changes a transfer only when it carries the Stark Bank id we
  recorded for it (external ids are unique per workspace only);
- ``failed`` counts only when confirmed (Stark Bank, asked with ``transfer.get`` for
  our id, reports it failed, and no other transfer of the invoice is ``MOVING``); then
  it is final, even after ``success``, and a first attempt queues the second one, once.

``open`` states are money not yet seen to move (the report's "pending"); ``failed``
states are money that never will. ``RETRYABLE``: when the latest attempt of a credit
is in one of these, an operator may queue one more attempt (``transfers retry``):
``rejected`` and ``failed`` will never move the money, ``stalled`` is unanswered
after its bounded tries. The attempt it supersedes keeps its state (and a superseded
``stalled`` one is no longer requeued at start-up).
"""

from typing import NamedTuple

__all__ = ["TransferState", "TRANSFER_STATES", "NAMES", "OPEN", "FAILED", "REPORTED", "RETRYABLE", "MOVING", "rank",
           "moves"]


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
    _state("sending", 0, True, False, "pending stalled rejected " + _FOUND),
    _state("stalled", 0, True, False, "pending " + _FOUND),
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
RETRYABLE = ("rejected", "failed", "stalled")  # an operator may queue one more attempt after these
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
        return confirmed_failed and current != "failed"
    return rank(reported) > rank(current) and reported in _BY_NAME[current].next
