"""`Emulator`: builds, starts and stops the emulator, and is the tests' handle on it.

It wires the parts together (certs -> proxy -> api -> bank -> delivery, with timers and
knobs) and offers the in-process API the service's tests use: projects and the
environment a service process needs, webhooks, snapshots of every entity, the record
of API calls and of webhook deliveries, explicit payments, reversals, transfer failures,
the balance and event resends (`workspaces.LedgerView`), fault injection, the knobs, and
the control channel its command line uses (`control_url`, see `remote`).

    with Emulator(pay_ratio=1.0, pay_delay_s=0.1, seed=1) as emu:
        project_id, pem = emu.create_project()
        os.environ.update(emu.env(project_id, pem))
        ...

A second workspace (``add_workspace``), as another Stark Bank customer has, shares
the emulator's address and the one key that signs every workspace's events, and has
its own projects, invoices, transfers (external ids are unique per workspace only,
so it can copy ours), events and webhooks: a project sees only its own workspace.

    other = emu.add_workspace()
    other.add_webhook(service_url)  # its events reach the service, validly signed

Every method is thread-safe. An Emulator runs once: start, then stop (idempotent);
it keeps everything in memory and its CA, keys and certificates in a temp directory
deleted by stop (or serves certificates it was given, which it leaves alone).
"""

import logging
import random
import secrets
import shutil
import tempfile
import threading

from . import certs
from .api import Api
from .auth import Projects
from .ledger import Ids, Ledger
from .delivery import Courier
from .faults import DROP, FAIL, FAIL_AFTER, Faults, SLOW
from .keys import EventKey
from .knobs import Knobs
from .proxy import ProxyServer, make_tls_context
from .remote import Remote
from .timers import Timers
from .workspaces import LedgerView, Workspace

__all__ = ["Emulator", "Workspace"]

logger = logging.getLogger(__name__)


class Emulator(LedgerView):
    """A local Stark Bank: an HTTPS proxy on 127.0.0.1 the unmodified SDK can talk to.

    Keyword arguments: port (0 picks a free one), host (the address to bind, default
    127.0.0.1), seed (for the random.Random behind ids, payments and failures; None for
    a random run), certificates (a `certs.Certificates` to serve instead of making new
    ones at start: the caller keeps and deletes them; many emulators can share one set),
    and any knob of `Knobs` (pay_ratio, pay_delay_s, invoice_fee, transfer_delay_s,
    delivery_attempts, delivery_backoff_s, ...).
    """

    def __init__(self, *, port=0, host="127.0.0.1", seed=None, certificates=None, **knobs):
        self.knobs = Knobs(**knobs)
        self._address = (host, port)
        if seed is None:
            seed = secrets.randbits(64)
        self.seed = seed
        self._stopping = threading.Event()
        self._timers = Timers()
        self._event_key = EventKey()
        self._projects = Projects()
        self._projects_key = None  # the first workspace's projects are registered under None
        self._faults = Faults()
        self._courier = Courier(self.knobs, self._event_key, self._webhooks_for, self._mark_delivered,
                                lambda *attempt: self._ledger.record_attempt(*attempt))
        self._ids = Ids(random.Random("ids-%s" % seed))  # shared by every workspace: ids are unique across them
        self._ledger = Ledger(self.knobs, self._timers, self._ids, random.Random(seed), publish=self._courier.publish)
        self._workspaces = []  # the Workspaces added, each with its Ledger and Courier
        self._api = Api(self._ledger, self._projects, self._event_key, self.knobs, self._faults, self._stopping)
        self._directory = None  # made at start for certificates of our own, deleted at stop
        self._certificates = certificates
        self._server = None
        self._serve_thread = None
        self._state_lock = threading.Lock()
        self._state = "new"  # new -> running -> stopped
        self._control_token = secrets.token_urlsafe(16)  # the secret part of control_url

    def _webhooks_for(self, subscription):
        return self._ledger.webhooks_for(subscription)

    def _mark_delivered(self, event_id):
        self._ledger.mark_delivered(event_id)

    # -- lifecycle ------------------------------------------------------------------

    def start(self):
        """Make the certificates (unless given), bind the port and start serving; return self.

        Raise RuntimeError if already started; certs.CertificateError if openssl fails;
        OSError if the port cannot be bound.
        """
        with self._state_lock:
            if self._state != "new":
                raise RuntimeError("an Emulator can be started only once")
            self._state = "running"
        try:
            if self._certificates is None:
                self._directory = tempfile.mkdtemp(prefix="stark-emulator-")
                self._certificates = certs.make_certificates(self._directory)
            context = make_tls_context(self._certificates.cert_path, self._certificates.key_path)
            self._server = ProxyServer(self._address, context, self._api, Remote(self, self._control_token))
            self._timers.start()
            self._serve_thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                                  name="emulator-proxy", daemon=True)
            self._serve_thread.start()
        except BaseException:
            self.stop()
            raise
        logger.info("Stark Bank emulator listening on %s", self.proxy_url)
        return self

    def stop(self):
        """Stop serving, the timers and the deliveries; join threads; delete temp files.

        Idempotent; safe to call from any thread but the emulator's own.
        """
        with self._state_lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        self._stopping.set()
        self._api.release_held()
        self._timers.stop()
        if self._server is not None:
            if self._serve_thread is not None:
                self._server.shutdown()
                self._serve_thread.join()
            self._server.server_close()
        self._courier.stop()
        for workspace in self._workspaces:
            workspace._courier.stop()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- connecting a client --------------------------------------------------------

    @property
    def port(self):
        """The TCP port the proxy listens on."""
        return self._server.server_address[1]

    @property
    def proxy_url(self):
        """The value for HTTPS_PROXY, e.g. "http://127.0.0.1:PORT"."""
        return "http://%s:%d" % (self._server.server_address[0], self.port)

    @property
    def control_url(self):
        """The control channel's URL (see `remote`): what the command line's pay, reverse,
        fail-transfer, set-balance and resend need (STARK_EMULATOR_CONTROL)."""
        return "http://%s:%d/emulator/%s" % (self._server.server_address[0], self.port, self._control_token)

    @property
    def ca_path(self):
        """Path of the CA certificate (PEM) clients must trust: the value for REQUESTS_CA_BUNDLE."""
        return self._certificates.ca_path

    def register_project(self, project_id, public_key_pem):
        """Accept requests signed by public_key_pem's private key as project project_id."""
        self._projects.register(project_id, public_key_pem)

    def env(self, project_id=None, private_key_pem=None):
        """Return the environment variables a service process needs to reach the emulator.

        HTTPS_PROXY/https_proxy, REQUESTS_CA_BUNDLE, NO_PROXY/no_proxy (127.0.0.1 and
        localhost, so webhook traffic and health checks bypass the proxy) and
        STARK_ENVIRONMENT=sandbox; plus STARK_PROJECT_ID and STARK_PRIVATE_KEY (PEM
        text). A project is created when project_id is None.
        """
        if project_id is None:
            project_id, private_key_pem = self.create_project()
        variables = {
            "HTTPS_PROXY": self.proxy_url,
            "https_proxy": self.proxy_url,
            "REQUESTS_CA_BUNDLE": self.ca_path,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "STARK_ENVIRONMENT": "sandbox",
            "STARK_PROJECT_ID": project_id,
        }
        if private_key_pem is not None:
            variables["STARK_PRIVATE_KEY"] = private_key_pem
        return variables

    # -- state ----------------------------------------------------------------------

    def webhooks(self):
        """Return every webhook (API JSON), oldest first; copies."""
        return self._rows("webhook")

    def mark_delivered(self, event_ids):
        """Set isDelivered on these events (unknown ids are skipped), as a delivery answered 200 does.

        For a benchmark or test that delivers the events itself, standing in for Stark Bank's courier.
        """
        for event_id in event_ids:
            self._ledger.mark_delivered(event_id)

    def deliveries_pending(self):
        """Return True while deliveries are held or still being sent (retries included)."""
        return self._courier.busy() or self._courier.held() > 0

    def idle(self):
        """Return True when nothing is scheduled or in flight: no pending payment or
        transfer step, and no delivery held, being sent or waiting to retry (in any workspace)."""
        return self._timers.pending() == 0 and not self.deliveries_pending() and not any(
            w._courier.busy() or w._courier.held() for w in self._workspaces)

    def add_workspace(self):
        """Add another workspace (another Stark Bank customer) and return its `Workspace` handle.

        Its events are signed with the same key as the first workspace's; its
        projects see only its own invoices, transfers, events and webhooks.
        """
        with self._state_lock:
            n = len(self._workspaces) + 2
            # The courier asks the ledger made next for its webhooks (a closure over `bank`).
            courier = Courier(self.knobs, self._event_key, lambda subscription: bank.webhooks_for(subscription),
                              lambda event_id: bank.mark_delivered(event_id), lambda *attempt: bank.record_attempt(*attempt))
            bank = Ledger(self.knobs, self._timers, self._ids, random.Random("%s-workspace-%d" % (self.seed, n)),
                        publish=courier.publish)
            workspace = Workspace(self, bank, courier)
            self._workspaces.append(workspace)
        self._api.add_workspace(bank)
        return workspace

    @property
    def public_key_fetches(self):
        """How many times GET /v2/public-key was answered."""
        return self._api.public_key_fetches

    @property
    def tripwire(self):
        """The `tripwire.Tripwire` numbering the API calls: crash tests arm it to stop a client at one."""
        return self._api.tripwire

    @property
    def requests_in_flight(self):
        """API calls received and not yet answered (waiting out latency_s, say), oldest
        first: dicts with method, path, query."""
        return self._api.calls_in_flight()

    @property
    def requests(self):
        """Every API call so far, oldest first: dicts with method, path, query, status
        (and dropped=True for calls cut by fail_next_after; external_ids for a transfer
        create call: the externalIds it sent, whatever became of them)."""
        return self._api.calls()

    # -- making things happen -------------------------------------------------------

    def release_deliveries(self, count=None):
        """Send the ``count`` oldest held deliveries now (every one by default); return how many were sent."""
        return self._courier.release(count)

    def deliveries_held(self):
        """Return how many deliveries are held (hold_deliveries)."""
        return self._courier.held()

    def deliveries_sending(self):
        """Return True while a delivery is being sent or waits to be tried again (held ones aside)."""
        return self._courier.busy()

    def set(self, **knobs):
        """Change knobs (see `Knobs`), e.g. set(deliver_times=2, hold_deliveries=True).

        Setting hold_deliveries=False also releases the deliveries held so far. Raise
        TypeError for an unknown knob, ValueError for a bad value (nothing changes).
        """
        self.knobs.update(**knobs)
        if knobs.get("hold_deliveries") is False:
            self._courier.release()

    def fail_next(self, method, path_prefix, count=1, status=500):
        """Answer the next count calls of method on paths starting with path_prefix with
        status (and an errors body), without acting on them."""
        self._faults.add(FAIL, method, path_prefix, count, status)

    def fail_next_after(self, method, path_prefix, count=1, status=None):
        """Perform the next count matching calls, then close the connection without
        answering: the client gets a connection error although the call took effect.
        With ``status`` (500, say), answer that status and an errors body instead."""
        if status is None:
            self._faults.add(DROP, method, path_prefix, count)
        else:
            self._faults.add(FAIL_AFTER, method, path_prefix, count, status)

    def answer_late(self, method, path_prefix, delay_s, count=1):
        """Hold the next count matching calls delay_s seconds, then perform and answer them
        as usual: with delay_s above the client's timeout, the client gives up while the
        call still takes effect (shown in requests_in_flight meanwhile)."""
        self._faults.add(SLOW, method, path_prefix, count, delay_s=delay_s)

    def clear_faults(self):
        """Forget the fault rules of fail_next, fail_next_after and answer_late not used up yet
        (calls already held stay held: see answer_held_calls)."""
        self._faults.clear()

    def answer_held_calls(self):
        """End the delay of every call answer_late holds now: each is performed and answered
        at once, as if its delay were over (the rules still pending stay)."""
        self._api.release_held()

    # -- signing --------------------------------------------------------------------

    def sign(self, body):
        """Return the Digital-Signature header value for body (bytes or str)."""
        return self._event_key.sign(body)

    def __repr__(self):
        where = self.proxy_url if self._server is not None else "not started"
        return "<Emulator %s, %s>" % (where, self._state)
