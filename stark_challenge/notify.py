"""Notify: the systemd sd_notify protocol, with the stdlib only.

systemd gives a service started with ``Type=notify`` a datagram socket in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). The service
sends newline-separated ``KEY=value`` lines to it: ``READY=1`` once it serves,
``STATUS=...`` a one-line summary, ``WATCHDOG=1`` at least every
``WATCHDOG_USEC / 2``, ``STOPPING=1`` when it shuts down. Outside systemd there is
no socket and every call does nothing.
"""

import logging
import os
import socket
import threading

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``, if systemd set one."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the process the watchdog is meant for.
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._stop = threading.Event()
        self._thread = None

    @property
    def enabled(self):
        """Return True if systemd asked for notifications."""
        return self._address is not None

    def send(self, **fields):
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``; return True if sent."""
        if not self._address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self._address)
                sock.sendall(message)
            return True
        except OSError as e:
            logger.warning("sd_notify to NOTIFY_SOCKET failed: %s", e)
            return False

    def start_watchdog(self, healthy, status):
        """Ping WATCHDOG=1 (with STATUS=status()) every half period while ``healthy()`` is true."""
        if not (self.enabled and self.watchdog_s):
            return

        def loop():
            while not self._stop.wait(self.watchdog_s / 2):
                try:
                    if healthy():
                        self.send(WATCHDOG=1, STATUS=status())
                except Exception:
                    logger.exception("watchdog check failed")

        self._thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop the watchdog thread. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
