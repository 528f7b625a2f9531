"""Shared fixtures: real SQLite files, a fake clock, the Stark Bank emulator, a project on it,
the SDK pointed at it, and the service itself as a subprocess. Nothing here mocks the SDK or
the database. The helpers these are built from live in tests/support (import ``support``).

Every test runs in a temporary working directory with no Stark Bank or service variable in
its environment, so neither a ``.env`` in the repository nor the user's shell reaches
in-process code (``config.load`` reads ``.env`` from the working directory).
"""

from typing import NamedTuple

import pytest
import starkbank
from starkcore.utils.cache import cache as sdk_cache

from stark_challenge import config as config_module
from stark_challenge.app import App
from stark_challenge.bank import Bank
from stark_challenge.config import with_userinfo
from stark_challenge.emulator import Emulator
from stark_challenge.emulator.certs import make_certificates
from stark_challenge.store import Store
from support.balancer import Balancer
from support.postgres import Cluster, find_bindir
from support import (  # re-exported (__all__) for modules that still import them from conftest
    ROOT, FakeClock, Service, child_env, free_port, make_config, messages_matching, query, run_cli, sdk_config,
    service_settled, signed_event, status_json, wait_for,
)

__all__ = ["ROOT", "FakeClock", "Project", "Service", "child_env", "free_port", "make_config", "messages_matching",
           "query", "run_cli", "sdk_config", "service_settled", "signed_event", "status_json", "wait_for"]

def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/N",
                     help="run only every Nth collected test, starting with the Kth (1 <= K <= N): N processes "
                          "run with 1/N .. N/N share the suite between them (make test runs two)")


def pytest_collection_modifyitems(config, items):
    """With ``--shard K/N``, keep the Kth, (K+N)th, ... tests of the collection, in order.

    Interleaved rather than split by file, so each half gets its share of every module's slow
    tests (most of a test's time is waiting on real processes and real time, which two
    processes on two cores overlap); a module-scoped fixture is then set up once per process.
    """
    shard = config.getoption("shard")
    if not shard:
        return
    try:
        k, n = (int(part) for part in shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard {shard}: expected K/N with 1 <= K <= N") from None
    kept, left = items[k - 1::n], [item for i, item in enumerate(items) if i % n != k - 1]
    if left:
        config.hook.pytest_deselected(items=left)
    items[:] = kept


# Variables that configure the service or steer its HTTP calls, besides config.VARIABLES.
_OUTSIDE_CONFIG = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "STATE_DIRECTORY", "HTTPS_PROXY", "https_proxy",
                   "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE",
                   "CURL_CA_BUNDLE", "SSL_CERT_FILE", "STARK_SANDBOX_TEST", "JOURNAL_STREAM")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run the test in its own directory, without the user's service settings in os.environ."""
    for name in [v.name for v in config_module.VARIABLES] + list(_OUTSIDE_CONFIG):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(tmp_path):
    """A new SQLite store (modules that test both backends override it with ``any_store``)."""
    s = Store(str(tmp_path / "state.sqlite3"))
    yield s
    s.close()


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server (support.postgres.Cluster), started at its first use."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
    cluster = Cluster(bindir).start()
    yield cluster
    cluster.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """Where a new, empty store lives: a SQLite file, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    return request.getfixturevalue("postgres").new_url()


@pytest.fixture
def any_store(database):
    """A new store on each backend in turn (the test runs once per backend)."""
    s = Store(database)
    yield s
    s.close()


@pytest.fixture(scope="session")
def emulator_certificates(tmp_path_factory):
    """One throwaway CA and leaf for every emulator of the run (making them costs three
    openssl commands; each emulator still has its own port, keys and state)."""
    return make_certificates(str(tmp_path_factory.mktemp("emulator-certificates")))


def _started_emulator(certificates):
    emu = Emulator(pay_ratio=0.0, pay_delay_s=0.05, transfer_delay_s=0.05, delivery_backoff_s=0.05, seed=7,
                   certificates=certificates)
    return emu.start()


@pytest.fixture
def emulator(emulator_certificates):
    emu = _started_emulator(emulator_certificates)
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def module_emulator(emulator_certificates):
    """An emulator shared by the tests of one module, for a run they all only read."""
    emu = _started_emulator(emulator_certificates)
    yield emu
    emu.stop()


class Project(NamedTuple):
    """A project on the emulator: its id, private key (PEM), and the environment a process needs
    to reach it as that project (proxy, CA, STARK_* credentials)."""

    id: str
    private_key: str
    env: dict


@pytest.fixture
def emulator_project(emulator):
    """Return a new Project on the emulator."""
    project_id, private_key = emulator.create_project()
    return Project(project_id, private_key, emulator.env(project_id, private_key))


@pytest.fixture
def sdk(emulator_project, monkeypatch):
    """Point the real SDK at the emulator: proxy and CA in the environment, ``starkbank.user`` set.

    Yields a dict with project_id and private_key (PEM).
    """
    for name, value in emulator_project.env.items():
        if not name.startswith("STARK_"):
            monkeypatch.setenv(name, value)
    saved_user, saved_timeout = starkbank.user, starkbank.timeout
    sdk_cache.clear()
    starkbank.user = starkbank.Project(environment="sandbox", id=emulator_project.id,
                                       private_key=emulator_project.private_key)
    yield {"project_id": emulator_project.id, "private_key": emulator_project.private_key}
    starkbank.user, starkbank.timeout = saved_user, saved_timeout
    sdk_cache.clear()


@pytest.fixture
def service_factory(emulator, tmp_path):
    """Return ``make(webhook=True, **env) -> Service`` (not started): its own directory (working
    directory, HOME, database, log), an environment from the allow-list plus the emulator's
    project, a free port, short intervals, JSON logs, and a webhook registered at the emulator
    for it. Every process started is stopped (SIGTERM, then kill -9) at teardown."""
    made = []
    yield _service_maker(emulator, tmp_path, made)
    for service in made:
        service.close()


@pytest.fixture(scope="module")
def module_service_factory(module_emulator, tmp_path_factory):
    """service_factory on module_emulator, for a service shared by the tests of one module."""
    made = []
    yield _service_maker(module_emulator, tmp_path_factory.mktemp("services"), made)
    for service in made:
        service.close()


@pytest.fixture
def instance_factory(emulator, tmp_path):
    """Return ``make(url, count, **env) -> [Service]`` (not started): ``count`` instances of one deployment
    (one project on the emulator, the same webhook credentials) sharing the PostgreSQL database at
    ``url`` (``DATABASE_PATH`` unset), each with its own port and directory, behind a round-robin
    balancer whose URL is the deployment's one webhook at the emulator (each delivery reaches one
    instance; one refused by a dead instance goes to the next), short claims (``CLAIM_LEASE``).
    Every process and balancer is stopped at teardown."""
    made, balancers = [], []

    def make(url, count, **values):
        project_id, private_key = emulator.create_project()
        instances = []
        for k in range(count):
            home = tmp_path / f"instance{len(made)}"
            home.mkdir()
            env = child_env(home, **emulator.env(project_id, private_key), **{
                "HOST": "127.0.0.1", "PORT": free_port(), "DATABASE_URL": url, "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO", "INVOICE_INTERVAL": "60s", "INVOICE_DURATION": "0",
                "EVENT_POLL_INTERVAL": "1h", "BANK_TIMEOUT": "2s", "CLAIM_LEASE": "3s",
                "WEBHOOK_USERNAME": "stark", "WEBHOOK_PASSWORD": "hook-pass",
                "OPERATOR_USERNAME": "operator", "OPERATOR_PASSWORD": "operator-password",
            })
            env.update({k: str(v) for k, v in values.items()})
            service = Service(env, str(home / "service.log"), cwd=str(home))
            made.append(service)
            instances.append(service)
        balancer = Balancer([service.port for service in instances]).start()
        balancers.append(balancer)
        emulator.add_webhook(with_userinfo(f"http://127.0.0.1:{balancer.port}/webhook",
                                           env["WEBHOOK_USERNAME"], env["WEBHOOK_PASSWORD"]))
        return instances

    yield make
    for service in made:
        service.close()
    for balancer in balancers:
        balancer.close()


def _service_maker(emulator, directory, made):
    """Return service_factory's ``make``, making services in directory and appending them to made."""

    def make(webhook=True, **values):
        home = directory / f"service{len(made)}"
        home.mkdir()
        project_id, private_key = emulator.create_project()
        env = child_env(home, **emulator.env(project_id, private_key), **{
            "HOST": "127.0.0.1",
            "PORT": free_port(),
            "DATABASE_PATH": home / "state.sqlite3",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
            "INVOICE_INTERVAL": "60s",
            "INVOICE_DURATION": "0",
            "EVENT_POLL_INTERVAL": "1h",
            "BANK_TIMEOUT": "3s",
            "OPERATOR_USERNAME": "operator",  # GET /status and /metrics answer 404 without them
            "OPERATOR_PASSWORD": "operator-password",
        })
        env.update({k: str(v) for k, v in values.items()})
        service = Service(env, str(home / "service.log"), cwd=str(home))
        if webhook:
            emulator.add_webhook(with_userinfo(f"http://127.0.0.1:{service.port}/webhook",
                                               env.get("WEBHOOK_USERNAME"), env.get("WEBHOOK_PASSWORD")))
        made.append(service)
        return service

    return make


@pytest.fixture
def in_process_app(emulator, sdk, tmp_path):
    """The service's App started in this process on the emulator (one invoice a round, one round), stopped after."""
    config = sdk_config(sdk, HOST="127.0.0.1", PORT="0", INVOICE_MIN=1, INVOICE_MAX=1, INVOICE_DURATION="0",
                        DATABASE_PATH=str(tmp_path / "state.sqlite3"))
    bank = Bank(config)
    bank.configure()
    app = App(config, bank, Store(config.database_path))
    app.start()
    yield app
    app.stop()
