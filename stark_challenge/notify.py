"""Notify: the systemd sd_notify protocol, with the stdlib only.

systemd gives a service started with ``Type=notify`` a datagram socket in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). The service
sends newline-separated ``KEY=value`` lines to it: ``READY=1`` once it serves,
``STATUS=...`` a one-line summary (shown by ``systemctl status``), ``WATCHDOG=1`` at
least every ``WATCHDOG_USEC / 2`` when ``WatchdogSec=`` is set, ``STOPPING=1`` when it
shuts down. Outside systemd there is no socket and every call does nothing.

A send that fails is logged and otherwise ignored: systemd being unreachable must not
stop the service. ``start`` runs one daemon thread (the heartbeat); everything else
runs in the caller's thread.
"""

import logging
import os
import socket
import threading

__all__ = ["Notifier", "STATUS_EVERY_S"]

logger = logging.getLogger(__name__)

# Without a watchdog, STATUS= is refreshed this often: fresh enough for `systemctl status`.
STATUS_EVERY_S = 30.0


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``, if systemd set one.

    ``environ`` defaults to ``os.environ``; ``pid`` (default ``os.getpid()``) is
    compared with ``WATCHDOG_PID``, which, when set, names the process the watchdog
    is meant for; ``status_every_s`` is how often ``STATUS=`` is refreshed when there
    is no watchdog.
    """

    def __init__(self, environ=None, pid=None, status_every_s=STATUS_EVERY_S):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace (see sd_notify(3))
        elif address and not address.startswith("/"):
            # systemd 253's vsock: form is not supported; a relative path is a mistake.
            logger.warning("NOTIFY_SOCKET is neither a path nor @name; not notifying systemd")
            address = ""
        self._address = address or None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._status_every_s = status_every_s
        self._stop = threading.Event()
        self._thread = None

    @property
    def enabled(self):
        """Return True if systemd asked for notifications."""
        return self._address is not None

    def send(self, **fields):
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``; return True if sent.

        Values are made one line (systemd reads a newline as the next field). Thread-safe:
        each call uses its own socket.
        """
        if not self._address:
            return False
        message = "\n".join(f"{key}={' '.join(str(value).split())}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
            return True
        except OSError as e:
            logger.warning("sd_notify to NOTIFY_SOCKET failed: %s", e)
            return False

    def start(self, healthy, status):
        """Send heartbeats in a daemon thread until ``stop``; return at once.

        With a watchdog, every ``watchdog_s / 2``: ``WATCHDOG=1`` and ``STATUS=status()``,
        but only while ``healthy()`` is true (so systemd restarts a service whose
        database stopped answering). Without one, ``STATUS=status()`` every
        ``status_every_s``. Nothing happens outside systemd. An exception from
        ``healthy`` or ``status`` is logged and counts as unhealthy.
        """
        if not self.enabled:
            return
        period = self.watchdog_s / 2 if self.watchdog_s else self._status_every_s

        def beat():
            while not self._stop.wait(period):
                try:
                    if not self.watchdog_s:
                        self.send(STATUS=status())
                    elif healthy():
                        self.send(WATCHDOG=1, STATUS=status())
                    else:
                        logger.error("health check failed: not pinging the systemd watchdog")
                except Exception:
                    logger.exception("heartbeat failed: not pinging the systemd watchdog")

        self._thread = threading.Thread(target=beat, name="sd_notify", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the heartbeat thread and wait for it. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
