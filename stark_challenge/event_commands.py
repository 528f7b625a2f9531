"""Event commands: ``events`` lists the events received, ``events show ID`` prints one,
``events replay ID`` asks Stark Bank for one again and feeds it through the normal path.

Listing and showing read the database read-only (safe while the service runs). A
replay writes, and the store has one writer: while the service runs (it holds the
store's lock), the service replays, asked at ``POST /events/replay`` with the operator's
basic auth; otherwise the command opens the store itself (``replay.replay``) and the
event waits for the worker at the next start. Exit status: 0 done (stored or already
there), 1 Stark Bank or the service unreachable, 2 an unknown event or a configuration error.
"""

import json

from . import replay as replay_module
from .commands import ask_service, fail, outcome_printer, read_or_write, write_or_ask
from .timing import utcnow

__all__ = ["events", "REPLAY_TIMEOUT_S"]

# Seconds the replay command waits for the running service's answer (it asks Stark Bank once).
REPLAY_TIMEOUT_S = 60.0
# Width of the outcome column in the listing, so that a line of 16-digit ids fits 120 columns.
_OUTCOME_WIDTH = 37


def events(args):
    """List the events received (read-only), show one, or replay one."""
    return read_or_write(args, "replay", _replay, lambda reader: reader.stored_event(args.event_id)
                         if args.action == "show" else reader.recent_events(args.limit), _print_events)


def _print_events(args, found):
    if args.action == "show":
        return _show(args.event_id, found, args.json)
    if args.json:
        print(json.dumps(found, indent=2))
    elif not found:
        print("no events")
    for row in [] if args.json else reversed(found):  # oldest first: the latest line is the last one read
        print(_line(row))
    return 0


def _when(iso_time):
    return (iso_time or "")[:19].replace("T", " ")


def _line(row):
    """Return one event as a listing line (at most 120 columns)."""
    outcome = row["outcome"] or "pending"
    if len(outcome) > _OUTCOME_WIDTH:
        outcome = outcome[:_OUTCOME_WIDTH - 3] + "..."
    kind = f"{row['subscription']} {row['log_type']}"
    return (f"{_when(row['received_at'])}  {row['id']:<16} {row['source']:<7} {kind:<19} "
            f"{row['entity_id']:<16} {outcome}")


def _show(event_id, row, as_json):
    if row is None:
        return fail(f"event {event_id}: not in the database (events lists what was received)", 2)
    if as_json:
        print(json.dumps(row, indent=2))
        return 0
    print(f"event     {row['id']}\n"
          f"type      {row['subscription']} {row['log_type']}\n"
          f"subject   {row['entity_id'] or '-'}\n"
          f"received  {_when(row['received_at'])} UTC by {row['source']}\n"
          f"processed {_when(row['processed_at']) + ' UTC' if row['processed_at'] else 'not yet'}\n"
          f"outcome   {row['outcome'] or 'pending'}\n"
          f"body\n{json.dumps(row['body'], indent=2, sort_keys=True)}")
    return 0


def _replay(args, config):
    """Replay one event: through the running service, or here when it is stopped."""
    return write_or_ask(args, config, lambda: _replay_through_service(config, args.event_id),
                        lambda store, bank, _settings: replay_module.replay(store, bank, args.event_id, utcnow()),
                        "nothing stored", (("stored",), "; the service processes it when it starts"), _print_outcome)


_print_outcome = outcome_printer(("unknown", "invalid"))


def _replay_through_service(config, event_id):
    """Ask the running service (it holds the store) to replay; return the exit status."""
    return ask_service(config, "/events/replay", {"event_id": event_id}, REPLAY_TIMEOUT_S, "replay",
                       {404: "unknown", 422: "unknown"}, _print_outcome)
