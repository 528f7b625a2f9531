"""The emulator's socket: an HTTP CONNECT proxy that terminates TLS for Stark Bank's hosts.

The SDK sends HTTPS to api.starkbank.com and sandbox.api.starkbank.com through
`requests`, which honours HTTPS_PROXY: it opens a TCP connection to us, asks
``CONNECT sandbox.api.starkbank.com:443``, and then speaks TLS inside the tunnel. We
answer 200 only for those two hosts on port 443 (403 otherwise: this proxy reaches
nothing else), perform the TLS handshake ourselves with a certificate from `certs`
(trusted through REQUESTS_CA_BUNDLE), and serve the decrypted HTTP/1.1 requests with
`ApiHandler`, which hands each to `Api.handle`. Plain (non-CONNECT) requests get 403,
but for POSTs under the control channel's secret path (`remote.Remote`), which the
emulator's command line uses.

Threads: one daemon thread per client connection (`ThreadingHTTPServer` style).
`ProxyServer.server_close` also shuts down the connections still open (keep-alive
tunnels) and joins their threads, so nothing outlives `Emulator.stop`.
"""

import json
import logging
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .certs import HOSTS

__all__ = ["ProxyServer", "make_tls_context"]

logger = logging.getLogger(__name__)

# Largest request body accepted: 100 entities of a few hundred bytes fit many times over.
_MAX_BODY = 4 * 1024 * 1024
# Largest control-channel request body: one small JSON object.
_MAX_CONTROL_BODY = 64 * 1024
# Seconds an idle connection may stay open before its thread gives up on it.
_IDLE_TIMEOUT_S = 60
# Seconds stop() waits for each connection thread.
_JOIN_TIMEOUT_S = 2


def make_tls_context(cert_path, key_path):
    """Return the server-side TLS context presenting the leaf certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return context


class ApiHandler(BaseHTTPRequestHandler):
    """Serves decrypted API requests from one TLS tunnel, keep-alive, via server.api.

    Thin by design: read the bounded body, call `Api.handle`, write its reply, or drop
    the connection when the reply says so.
    """

    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    # Headers and body go out in separate writes; with Nagle's algorithm the body would
    # wait for the client's delayed ACK (~40 ms per call).
    disable_nagle_algorithm = True

    def _serve(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_error(HTTPStatus.LENGTH_REQUIRED)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        if not 0 <= length <= _MAX_BODY:
            self.send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            return
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.api.handle(self.command, self.path, headers, body)
        if reply.drop:
            # Vanish without a word: the client cannot tell whether the call took effect.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args):
        """Send the access log to the logging module (debug) instead of stderr."""
        logger.debug("api %s %s", self.address_string(), format % args)


class ProxyHandler(BaseHTTPRequestHandler):
    """Answers CONNECT for Stark Bank's hosts and serves the tunnel; refuses the rest."""

    protocol_version = "HTTP/1.1"
    timeout = _IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # see ApiHandler

    def do_CONNECT(self):
        self.close_connection = True  # after the tunnel, nothing else on this socket
        host, _, port = self.path.rpartition(":")
        if host.lower() not in HOSTS or port != "443":
            self.send_error(HTTPStatus.FORBIDDEN, "this proxy only reaches %s on port 443" % " and ".join(HOSTS))
            return
        self.send_response(HTTPStatus.OK, "Connection established")
        self.end_headers()
        try:
            tunnel = self.server.tls_context.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as error:
            # Typically a client that does not trust our CA (REQUESTS_CA_BUNDLE unset).
            logger.info("TLS handshake with %s failed: %s", self.address_string(), error)
            return
        self.server.track(self.request, tunnel)
        try:
            ApiHandler(tunnel, self.client_address, self.server)
        except (ssl.SSLError, OSError) as error:
            logger.debug("tunnel from %s ended: %s", self.address_string(), error)
        finally:
            tunnel.close()

    def _refuse(self):
        self.send_error(HTTPStatus.FORBIDDEN, "only CONNECT to Stark Bank's API hosts is served")

    do_GET = do_PATCH = do_PUT = do_DELETE = do_HEAD = _refuse

    def do_POST(self):
        """Serve the control channel (see `remote`); refuse anything else."""
        remote = self.server.remote
        if remote is None or not remote.owns(self.path):
            self._refuse()
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_CONTROL_BODY:
            self.send_error(HTTPStatus.BAD_REQUEST, "bad Content-Length")
            return
        status, answer = remote.handle(self.path, self.rfile.read(length))
        body = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        """Send the access log to the logging module (debug) instead of stderr."""
        logger.debug("proxy %s %s", self.address_string(), format % args)


class ProxyServer(ThreadingHTTPServer):
    """The listening socket; `api` and `tls_context` reach the handlers through it."""

    daemon_threads = True

    def __init__(self, address, tls_context, api, remote=None):
        super().__init__(address, ProxyHandler)
        self.tls_context = tls_context
        self.api = api
        self.remote = remote  # the control channel (`remote.Remote`), or None
        self._lock = threading.Lock()
        self._live = {}  # accepted socket -> [socket now in use (TLS once wrapped), thread]

    def process_request(self, request, client_address):
        """Serve one connection on a new daemon thread, remembered until it ends."""
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name="emulator-connection", daemon=True)
        with self._lock:
            self._live[request] = [request, thread]
        thread.start()

    def track(self, request, tunnel):
        """Remember that request's connection now runs over the TLS socket tunnel."""
        with self._lock:
            if request in self._live:
                self._live[request][0] = tunnel

    def shutdown_request(self, request):
        with self._lock:
            self._live.pop(request, None)
        super().shutdown_request(request)

    def server_close(self):
        """Close the listening socket, then every open connection; join their threads."""
        super().server_close()
        with self._lock:
            live = list(self._live.values())
        for sock, _ in live:
            try:
                # socket.socket's own shutdown: SSLSocket's would also discard the TLS
                # state that the connection's thread may be using right now.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its thread
        for _, thread in live:
            thread.join(_JOIN_TIMEOUT_S)
