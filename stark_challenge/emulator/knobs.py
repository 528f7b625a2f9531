"""The emulator's tunable behaviour: simulation rates, delays and delivery faults.

`Knobs` holds every setting the emulator reads while it runs, each a documented class
attribute with its default. Settings may change at any time, from any thread, through
`update` (which validates all names and values before changing any); readers simply read
the attributes, each read seeing either the old or the new value.
"""

import threading

__all__ = ["Knobs"]


def _ratio(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _seconds(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _cents(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flag(value):
    return isinstance(value, bool)


def _duplicate_mode(value):
    return value in ("refuse", "fail_later")


class Knobs:
    """Settings of a running emulator; see each attribute for its meaning.

    Construct with keyword overrides (``Knobs(pay_ratio=1.0)``) and change later with
    ``update``; an unknown name raises TypeError, a bad value ValueError.
    """

    # Balance in cents of each workspace when made (Emulator.set_balance changes it later):
    # R$ 10 million, so no test runs out by accident; a transfer it cannot cover fails.
    starting_balance = 10 ** 9
    # Share of newly created invoices the simulated payer pays, as the sandbox pays some.
    pay_ratio = 0.5
    # Seconds between an invoice's creation and its simulated payment.
    pay_delay_s = 1.0
    # Fee in cents charged on each paid invoice (carried by the paid/credited invoice).
    invoice_fee = 50
    # If True the "credited" log comes before "paid"; Stark Bank does not promise an order.
    credited_first = False
    # Seconds per transfer step: created -> processing -> success (or failed).
    transfer_delay_s = 0.5
    # Share of new transfers that end "failed" instead of "success".
    transfer_fail_ratio = 0.0
    # Tries per webhook delivery (first try included) before giving up on it.
    delivery_attempts = 5
    # Wait before the 2nd try; doubled before each further try.
    delivery_backoff_s = 0.2
    # Seconds to wait for a webhook receiver to answer one try.
    delivery_timeout_s = 5.0
    # Deliver each event this many times to each webhook (redelivery faults).
    deliver_times = 1
    # With deliver_times > 1, send the copies at once from parallel threads.
    deliver_concurrently = False
    # Queue deliveries instead of sending them, until Emulator.release_deliveries()
    # (or until this is set back to False through Emulator.set).
    hold_deliveries = False
    # Seconds to wait after receiving each API request, before acting on it.
    latency_s = 0.0
    # Largest accepted difference between Access-Time and our clock (Stark Bank: 5 min).
    max_clock_skew_s = 300.0
    # A transfer whose externalId was used before: "refuse" answers 400 invalidExternalId and
    # creates nothing; "fail_later" creates it and fails it later, as Stark Bank is also
    # reported to do (the first transfer with that externalId is untouched).
    duplicate_external_id = "refuse"
    # Seconds an invoice or transfer read (get, query) lags the writes: it answers the state
    # the entity had this long ago, or not found if it did not exist yet.
    read_lag_s = 0.0

    _checks = {
        "starting_balance": _cents,
        "pay_ratio": _ratio,
        "pay_delay_s": _seconds,
        "invoice_fee": _cents,
        "credited_first": _flag,
        "transfer_delay_s": _seconds,
        "transfer_fail_ratio": _ratio,
        "delivery_attempts": _count,
        "delivery_backoff_s": _seconds,
        "delivery_timeout_s": _seconds,
        "deliver_times": _count,
        "deliver_concurrently": _flag,
        "hold_deliveries": _flag,
        "latency_s": _seconds,
        "max_clock_skew_s": _seconds,
        "duplicate_external_id": _duplicate_mode,
        "read_lag_s": _seconds,
    }

    def __init__(self, **values):
        self._lock = threading.Lock()
        self.update(**values)

    def update(self, **values):
        """Validate every given setting, then apply them all; thread-safe.

        Raise TypeError for an unknown name and ValueError for a bad value, changing nothing.
        """
        for name, value in values.items():
            check = self._checks.get(name)
            if check is None:
                raise TypeError("unknown emulator knob %r; known: %s" % (name, ", ".join(sorted(self._checks))))
            if not check(value):
                raise ValueError("bad value for emulator knob %s: %r" % (name, value))
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def as_dict(self):
        """Return the current settings as a plain dict."""
        with self._lock:
            return {name: getattr(self, name) for name in self._checks}

    def __repr__(self):
        return "Knobs(%s)" % ", ".join("%s=%r" % item for item in self.as_dict().items())
