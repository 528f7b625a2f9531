"""Replay: ask Stark Bank for one event again and feed it through the normal path.

``replay`` is what ``events replay ID`` does. It never acts on the event itself:

1. Stark Bank is asked for the event with our own credentials (``Bank.get_event``), so
   only our workspace's events are found; an unknown id is refused, nothing stored;
2. the event's shape is checked as a webhook's is (``events.check_shape``);
3. ``events.accept`` stores it as a pulled event, deduplicated by its id like every
   webhook and pull: an event already stored is a duplicate and nothing happens (its
   recorded outcome is named). A new one is processed by the worker like any other,
   so the money rules (our tag, Stark Bank's confirmation, one transfer per invoice)
   decide what it moves.

Runs in the service (``POST /events/replay``) or, when the service is stopped, in the
``events replay`` command, which then holds the store's lock (the event waits for the
worker at the next start).
"""

from typing import NamedTuple

from . import events

__all__ = ["Outcome", "replay"]


class Outcome(NamedTuple):
    """What a replay did, and ``message``, one line saying so. ``code``: 'stored' (new: the worker processes
    it), 'duplicate' (already stored: nothing done), 'unknown' (Stark Bank has no such event for us) or
    'invalid' (Stark Bank's copy is malformed)."""

    code: str
    message: str


def replay(store, bank, event_id, now, on_new=None):
    """Fetch event ``event_id`` from Stark Bank and accept it as the worker's pull would; return an Outcome.

    ``on_new()`` is called once a new event is committed (the worker's wake-up).
    Raise BankUnavailable if Stark Bank does not answer, StoreError if the store cannot write.
    """
    found = bank.get_event(event_id)
    if found is None:
        return Outcome("unknown", f"event {event_id}: Stark Bank has no such event for this workspace")
    try:
        checked = events.check_shape({"event": found})
    except ValueError as e:
        return Outcome("invalid", f"event {event_id}: Stark Bank's copy is malformed ({e}); nothing stored")
    if events.accept(store, checked, "pull", now, on_new):
        return Outcome("stored", f"event {event_id} ({checked.subscription} {checked.log_type} "
                                 f"{checked.entity_id}): stored; the worker processes it as any other")
    stored = store.stored_event(event_id) or {}
    outcome = stored.get("outcome") or "not processed yet"
    return Outcome("duplicate", f"event {event_id}: already stored ({outcome}); nothing done")
