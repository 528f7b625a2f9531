"""A round-robin TCP load balancer for the tests: each new connection goes to the next backend port.

What a load balancer in front of several instances does, with the standard library only:
connections are handed out in turn, and one whose backend refuses the connection (an
instance killed) goes to the next one, as a balancer's passive health check does. Bytes
are copied both ways until either side closes. Threads: one accepting, two per
connection; ``close()`` stops accepting and closes every socket.
"""

import socket
import threading

__all__ = ["Balancer"]

CONNECT_TIMEOUT_S = 2.0


class Balancer:
    """Listens on 127.0.0.1:``port`` and spreads connections over ``backends`` (ports), round robin."""

    def __init__(self, backends):
        self.backends = list(backends)
        self.chosen = []  # the backend port each connection went to, in order
        self._next = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets = set()
        self._closed = False

    def start(self):
        threading.Thread(target=self._accept, name="balancer", daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self):
        """Return a socket to the next backend that accepts a connection, or None if none does."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.backends)
        for k in range(len(self.backends)):
            port = self.backends[(start + k) % len(self.backends)]
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S)
            except OSError:  # that instance is down: the next one
                continue
            upstream.settimeout(None)
            with self._lock:
                self.chosen.append(port)
            return upstream
        return None

    def _serve(self, client):
        upstream = self._connect()
        if upstream is None:
            client.close()
            return
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._sockets.update((client, upstream))
        back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        back.start()
        _pipe(client, upstream)
        back.join()
        with self._lock:
            self._sockets.difference_update((client, upstream))
        client.close()
        upstream.close()

    def close(self):
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, set()
        self._listener.close()
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass


def _pipe(source, target):
    """Copy bytes from ``source`` to ``target`` until ``source`` ends; then end ``target``'s sending side."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass
