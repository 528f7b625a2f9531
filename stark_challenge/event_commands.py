"""Event commands: ``events`` lists the events received, ``events show ID`` prints one,
``events replay ID`` asks Stark Bank for one again and feeds it through the normal path.

Listing and showing read the database read-only (safe while the service runs). A
replay writes, and the store has one writer: while the service runs (it holds the
store's lock), the service replays, asked at ``POST /events/replay`` with the webhook's
basic auth; otherwise the command opens the store itself (``replay.replay``) and the
event waits for the worker at the next start. Exit status: 0 done (stored or already
there), 1 Stark Bank or the service unreachable, 2 an unknown event or a configuration error.
"""

import base64
import json
import os
import urllib.error
import urllib.request

from . import replay as replay_module
from .commands import configured_bank, fail, load_config
from .errors import BankError, ConfigError
from .timing import utcnow

__all__ = ["events", "REPLAY_TIMEOUT_S"]

# Seconds the replay command waits for the running service's answer (it asks Stark Bank once).
REPLAY_TIMEOUT_S = 60.0
# Width of the outcome column in the listing, so that a line of 16-digit ids fits 120 columns.
_OUTCOME_WIDTH = 37


def events(args):
    """List the events received (read-only), show one, or replay one."""
    from .store import Store, StoreError

    try:
        config = load_config(args, require_credentials=False)
    except ConfigError as e:
        return fail(str(e))
    if args.action == "replay":
        return _replay(args, config)
    try:
        reader = Store(config.database_path, read_only=True)
        try:
            found = reader.stored_event(args.event_id) if args.action == "show" else reader.recent_events(args.limit)
        finally:
            reader.close()
    except StoreError as e:
        return fail(str(e), 1)
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
    from .store import Store, StoreError, StoreLocked

    if not os.path.exists(config.database_path):
        return fail(f"{config.database_path}: no such database (set DATABASE_PATH)", 1)
    try:
        store = Store(config.database_path)
    except StoreLocked:
        return _replay_through_service(config, args.event_id)
    except StoreError as e:
        return fail(str(e), 1)
    try:
        try:
            config, bank = configured_bank(args)
        except ConfigError as e:
            return fail(str(e))
        try:
            outcome = replay_module.replay(store, bank, args.event_id, utcnow())
        except BankError as e:
            return fail(f"Stark Bank did not answer, nothing stored: {e}", 1)
    finally:
        store.close()
    suffix = "; the service processes it when it starts" if outcome.code == "stored" else ""
    return _print_outcome(outcome.code, outcome.message + suffix)


def _print_outcome(code, message):
    if code in ("unknown", "invalid"):
        return fail(message, 2)
    print(message)
    return 0


def _replay_through_service(config, event_id):
    """Ask the running service (it holds the store) to replay; return the exit status."""
    if not config.basic_auth:
        return fail("the service is running: set WEBHOOK_USERNAME and WEBHOOK_PASSWORD (as the service has them) "
                    "to ask it for the replay", 2)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "", "::") else config.host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{config.port}/events/replay"
    token = base64.b64encode(f"{config.webhook_username}:{config.webhook_password}".encode()).decode()
    request = urllib.request.Request(url, data=json.dumps({"event_id": event_id}).encode(), method="POST",
                                     headers={"Authorization": "Basic " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REPLAY_TIMEOUT_S) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:
            body = {}
        if e.code in (404, 422):
            return _print_outcome(body.get("outcome", "unknown"), body.get("message", f"HTTP {e.code}"))
        return fail(f"the service answered {e.code}: {body.get('error', e.reason)}", 1)
    except (OSError, ValueError) as e:
        return fail(f"the service holds the database but does not answer at {url}: {e}", 1)
    return _print_outcome(body["outcome"], body["message"])
