"""Configuration: one frozen ``Config`` read from the environment and a ``.env`` file.

``load()`` reads every variable with the parser ``VARIABLES`` gives it (bounds
included), then its cross-field rule if it has one, and raises ``ConfigError`` naming the
first bad variable and what is wrong with it, never its value (values may be secrets).
The real environment wins over ``.env``. ``VARIABLES`` is the single table that
``--help`` and the README are written from. This module reads files but starts nothing.
"""

import os
import re
import urllib.parse
from typing import NamedTuple

from .errors import ConfigError
from .taxid import is_valid_tax_id

__all__ = ["Config", "VARIABLES", "load", "local_url", "parse_duration", "format_duration", "with_userinfo",
           "read_dotenv"]


class Variable(NamedTuple):
    """One configuration variable: as documented in --help and the README, and how it is read."""

    name: str
    default: str  # "" = unset
    help: str
    field: str  # the Config field it fills
    parse: object  # (text) -> value; raises ValueError saying what is wrong, never quoting the value
    check: object = None  # (values so far by field, require_credentials) -> None, or ConfigError: a cross-field rule


def _text(text):
    return text.strip()


def _one_of(choices, message, case=str.lower, default=None):
    def parse(text):
        value = case(text.strip()) or default
        if value not in choices:
            raise ValueError(message)
        return value
    return parse


def _matching(pattern, message, strip=True):
    def parse(text):
        value = text.strip() if strip else text
        if value and not re.fullmatch(pattern, value):
            raise ValueError(message)
        return value
    return parse


def _whole(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value
    return parse


def _seconds(allow_zero):
    def parse(text):
        value = parse_duration(text)
        if value == 0 and not allow_zero:
            raise ValueError("must be more than 0")
        return value
    return parse


def _tax_id(text):
    if not is_valid_tax_id(text.strip()):
        raise ValueError("not a valid CPF or CNPJ (check digits)")
    return text.strip()


def _not_empty(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _credentials(values, required):
    if required and not (values["project_id"] and values["private_key"]):
        missing = "STARK_PROJECT_ID" if not values["project_id"] else "STARK_PRIVATE_KEY"
        raise ConfigError(
            f"{missing}: not set. Set STARK_PROJECT_ID and STARK_PRIVATE_KEY "
            "(environment or .env), or try the service with --emulator"
        )


def _auth_pair(values, _required):
    if bool(values["webhook_username"]) != bool(values["webhook_password"]):
        raise ConfigError("WEBHOOK_USERNAME and WEBHOOK_PASSWORD: set both or neither")


def _database_url(text):
    value = text.strip()
    if value and not re.fullmatch(r"postgres(ql)?://[^\s]+", value):
        raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host:port/database")
    return value


def _one_database(values, _required):
    if values["database_url"] and values["database_path"]:
        raise ConfigError("DATABASE_URL and DATABASE_PATH: set one of them, not both")


def _operator_pair(values, _required):
    if bool(values["operator_username"]) != bool(values["operator_password"]):
        raise ConfigError("OPERATOR_USERNAME and OPERATOR_PASSWORD: set both or neither")
    if values["operator_password"] and values["operator_password"] == values["webhook_password"]:
        # The webhook's credentials travel in the URL registered at Stark Bank.
        raise ConfigError("OPERATOR_PASSWORD: must differ from WEBHOOK_PASSWORD")


def _round_bounds(values, _required):
    if values["invoice_min"] > values["invoice_max"]:
        raise ConfigError("INVOICE_MIN: must not be more than INVOICE_MAX")


# Stark Bank accepts at most 100 invoices per call; rounds above that are sent in chunks,
# but a round of more than this is surely a typo.
MAX_ROUND_SIZE = 10_000
# How long a claim (a round being issued, a transfer being sent) keeps other instances away unless
# renewed, by default: longer than one create call (BANK_TIMEOUT), so the holder's call is over when
# another instance takes the claim over, and short enough that a dead instance's work waits a minute
# at most. The store's and the sender's default too.
LEASE_S = 60.0
ACCOUNT_TYPES = ("checking", "savings", "salary", "payment")

V = Variable
VARIABLES = (
    V("STARK_PROJECT_ID", "", "Stark Bank project id (required unless --emulator)", "project_id",
      _matching(r"[0-9A-Za-z_-]{1,64}", "must be the project's id (letters, digits)")),
    V("STARK_PRIVATE_KEY", "", "the project's private key: a PEM file path or the PEM text (required unless --emulator)",
      "private_key", lambda text: _read_private_key(text.strip()), _credentials),
    V("STARK_ENVIRONMENT", "sandbox", "sandbox or production", "environment",
      _one_of(("sandbox", "production"), "must be sandbox or production")),
    V("HOST", "0.0.0.0", "address the HTTP server listens on", "host", _text),
    V("PORT", "8000", "port the HTTP server listens on", "port", _whole(0, 65535)),
    V("WEBHOOK_USERNAME", "", "with WEBHOOK_PASSWORD: HTTP basic auth required on POST /webhook",
      "webhook_username", _matching(r"[^:]*", "must not contain ':'", strip=False)),
    V("WEBHOOK_PASSWORD", "", "see WEBHOOK_USERNAME", "webhook_password", str, _auth_pair),
    V("OPERATOR_USERNAME", "", "with OPERATOR_PASSWORD: HTTP basic auth of GET /status, GET /metrics, "
      "POST /transfers/retry and POST /events/replay, which answer 404 without them", "operator_username",
      _matching(r"[^:]*", "must not contain ':'", strip=False)),
    V("OPERATOR_PASSWORD", "", "see OPERATOR_USERNAME; must differ from WEBHOOK_PASSWORD", "operator_password", str,
      _operator_pair),
    V("INVOICE_INTERVAL", "3h", "time between rounds: seconds or a number with s/m/h/d", "invoice_interval_s",
      _seconds(allow_zero=False)),
    V("INVOICE_MIN", "8", "fewest invoices in a round", "invoice_min", _whole(1, MAX_ROUND_SIZE)),
    V("INVOICE_MAX", "12", "most invoices in a round", "invoice_max", _whole(1, MAX_ROUND_SIZE), _round_bounds),
    V("INVOICE_DURATION", "24h", "how long rounds go on after the first; 0 = forever", "invoice_duration_s",
      _seconds(allow_zero=True)),
    V("TRANSFER_BANK_CODE", "20018183", "receiver of forwarded money: bank code (ISPB or 3-digit code)",
      "transfer_bank_code", _matching(r"\d{3}|\d{8}", "must be an 8-digit ISPB or a 3-digit bank code")),
    # Stark Bank's form (the SDK's Transfer docstring, its API refusing anything else):
    # a branch of at most 4 digits, an account of digits, each with an optional -digit.
    V("TRANSFER_BRANCH", "0001", "receiver: branch", "transfer_branch",
      _matching(r"\d{1,4}(-\d)?", "must be at most 4 digits, optionally with -digit (e.g. 0001 or 1357-9)")),
    V("TRANSFER_ACCOUNT", "6341320293482496", "receiver: account number", "transfer_account",
      _matching(r"\d{1,20}(-[0-9Xx])?", "must be digits, optionally with -digit")),
    V("TRANSFER_NAME", "Stark Bank S.A.", "receiver: name", "transfer_name", _not_empty),
    V("TRANSFER_TAX_ID", "20.018.183/0001-80", "receiver: CPF or CNPJ", "transfer_tax_id", _tax_id),
    V("TRANSFER_ACCOUNT_TYPE", "payment", "receiver: checking, savings, salary or payment", "transfer_account_type",
      _one_of(ACCOUNT_TYPES, "must be one of " + ", ".join(ACCOUNT_TYPES), case=str)),
    V("DATABASE_PATH", "", "SQLite file of the service's state (default: $STATE_DIRECTORY/stark_challenge.sqlite3, "
      "else ./stark_challenge.sqlite3)", "database_path", _text),
    V("DATABASE_URL", "", "PostgreSQL instead of SQLite (postgresql://user:password@host:port/database; needs the "
      "[postgres] extra): several instances may share it", "database_url", _database_url, _one_database),
    V("INSTANCE_TAG", "stark-challenge", "tag on every invoice this deployment issues; only their credits are "
      "forwarded", "instance_tag",
      _matching(r"[a-z0-9][a-z0-9_-]{0,39}", "lowercase letters, digits, - and _, at most 40")),
    V("EVENT_POLL_INTERVAL", "10m", "how often undelivered events are pulled from Stark Bank; 0 = only at start-up",
      "event_poll_interval_s", _seconds(allow_zero=True)),
    V("BANK_TIMEOUT", "15s", "timeout of every call to Stark Bank", "bank_timeout_s", _seconds(allow_zero=False)),
    V("CLAIM_LEASE", f"{LEASE_S / 60:g}m", "how long a claim on a round or a transfer is held (at least BANK_TIMEOUT + 1s): a "
      "transfer whose claim runs out before its holder recorded an answer is settled by lookup at Stark Bank, by "
      "this or another instance, never sent blind", "claim_lease_s", _seconds(allow_zero=False)),
    V("RECONCILE_INTERVAL", "5m", "how often the reconciliation pass asks Stark Bank about open transfers and "
      "updates the alarms", "reconcile_interval_s", _seconds(allow_zero=False)),
    V("RECONCILE_AFTER", "2m", "an open transfer quiet for this long is asked about at Stark Bank by the "
      "reconciliation pass; a read that does not find our own invoice or transfer counts as not yet for this "
      "long after its event arrived", "reconcile_after_s", _seconds(allow_zero=True)),
    V("ALARM_AFTER", "1h", "a transfer still open after this is an alarm", "alarm_after_s",
      _seconds(allow_zero=False)),
    V("MAX_CONNECTIONS", "32", "HTTP requests handled at once (one thread each) and as many queued; "
                               "more get 503; 16 connections held per thread while they send",
      "max_connections", _whole(1, 1024)),
    V("REQUEST_TIMEOUT", "10s", "a request must arrive whole within this of its first byte, and an idle "
                                "connection is closed after it", "request_timeout_s", _seconds(allow_zero=False)),
    V("EVENT_RETENTION", "90d", "how long received events (and their bodies) are kept, then deleted in small batches; "
      "money rows (rounds, invoices, credits, transfers) are never deleted; 0 = keep forever",
      "event_retention_s", _seconds(allow_zero=True)),
    V("DEBUG_MEMORY", "off", "off; on: GET /debug/memory (basic auth) answers the process's memory figures; "
      "trace: the same plus tracemalloc's top allocation sites (slower: for diagnosis only)", "debug_memory",
      _one_of(("off", "on", "trace"), "must be off, on or trace")),
    V("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR", "log_level",
      _one_of(("DEBUG", "INFO", "WARNING", "ERROR"), "must be DEBUG, INFO, WARNING or ERROR", case=str.upper)),
    V("LOG_FORMAT", "", "text, json or journal (journald's native protocol, with fields); default: journal "
      "when stderr is systemd's journal stream, text on a terminal, json otherwise", "log_format",
      _one_of(("text", "json", "journal"), "must be text, json or journal")),
)
del V

DEFAULTS = {v.name: v.default for v in VARIABLES}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# Fields whose values repr() hides.
_SECRET_FIELDS = frozenset({"private_key", "webhook_username", "webhook_password", "operator_username",
                            "operator_password", "database_url"})


class Config(NamedTuple):
    """The validated configuration. Secrets are kept out of repr().

    A NamedTuple, not a dataclass: ``dataclasses`` pulls in ``inspect`` and ``ast``,
    about 0.6 MB of the service's resident memory for nothing else.
    """

    project_id: str  # "" when the emulator provides the project
    private_key: str  # PEM text
    environment: str
    host: str
    port: int
    webhook_username: str
    webhook_password: str
    operator_username: str  # "" (with operator_password): no operator endpoints over HTTP
    operator_password: str
    invoice_interval_s: float
    invoice_min: int
    invoice_max: int
    invoice_duration_s: float  # 0 = forever
    transfer_bank_code: str
    transfer_branch: str
    transfer_account: str
    transfer_name: str
    transfer_tax_id: str
    transfer_account_type: str
    database_path: str  # SQLite file; "" when database_url is set
    database_url: str  # PostgreSQL libpq URI, or ""
    instance_tag: str
    event_poll_interval_s: float  # 0 = only at start-up
    bank_timeout_s: float
    claim_lease_s: float  # as configured; lease_s is what is used
    reconcile_interval_s: float
    reconcile_after_s: float
    alarm_after_s: float
    max_connections: int
    request_timeout_s: float  # a stalled client is cut off after this
    event_retention_s: float  # 0 = events are kept forever
    debug_memory: str  # "off", "on" or "trace"
    log_level: str
    log_format: str  # "text", "json" or "journal"

    @property
    def database(self):
        """Return where the store lives: the PostgreSQL URL when set, else the SQLite file path."""
        return self.database_url or self.database_path

    @property
    def lease_s(self):
        """Return how long a claim lasts: CLAIM_LEASE, but always longer than one call to Stark Bank."""
        return max(self.claim_lease_s, self.bank_timeout_s + 1.0)

    @property
    def basic_auth(self):
        """Return True if HTTP basic auth is configured."""
        return bool(self.webhook_username and self.webhook_password)

    @property
    def operator_auth(self):
        """Return True if the operator's credentials are configured (the operator endpoints exist)."""
        return bool(self.operator_username and self.operator_password)

    def __repr__(self):
        shown = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self)
                          if name not in _SECRET_FIELDS)
        return f"Config({shown})"


def parse_duration(text):
    """Return seconds (float) for ``90``, ``90s``, ``15m``, ``3h``, ``1.5d``; raise ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match:
        raise ValueError("expected seconds or a number with s/m/h/d, e.g. 3h or 90s")
    return float(match.group(1)) * _UNITS.get(match.group(2) or "s")


def format_duration(seconds):
    """Return ``seconds`` as the configuration writes it, in the largest whole unit: 3h, 24h, 90s, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit == "d" else 1) and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def with_userinfo(url, username, password):
    """Return ``url`` carrying ``username:password@`` (each quoted), as Stark Bank's webhook URLs take basic auth.

    Unchanged if either is empty or the URL has userinfo already.
    """
    parts = urllib.parse.urlsplit(url)
    if not (username and password) or "@" in parts.netloc:
        return url
    userinfo = f"{urllib.parse.quote(username, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


def local_url(host, port, path):
    """Return the http URL of ``path`` on a service of this machine listening on ``host``:``port``.

    A service listening on every address (``0.0.0.0``, ``::`` or empty) is reached at 127.0.0.1.
    """
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"


def read_dotenv(path, required=False):
    """Return the KEY=VALUE pairs of a .env file as a dict; {} if it does not exist and is not ``required``.

    Blank lines and ``#`` comments are skipped, ``export `` is allowed, one pair of
    matching quotes around a value is removed (a comment may follow them). A line that
    is not KEY=VALUE, or an unquoted value followed by `` #`` (systemd's EnvironmentFile=
    would keep the comment in the value, a shell would drop it: ambiguous), raises
    ConfigError naming the line number; so does a missing file that is ``required``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file (given with --env-file)") from None
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    values = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
        if not match:
            raise ConfigError(f"{path}, line {number}: expected NAME=value")
        name, value = match.groups()
        quoted = re.fullmatch(r"""(["'])(.*?)\1\s*(?:#.*)?""", value)
        if quoted:
            value = quoted.group(2).replace("\\n", "\n") if quoted.group(1) == '"' else quoted.group(2)
        elif re.search(r"\s#", value):
            raise ConfigError(f"{path}, line {number}: {name}: a comment after the value; "
                              "put the comment on a line of its own, or quote the value")
        values[name] = value
    return values


def _read_private_key(value):
    if not value:
        return ""
    if "-----BEGIN" in value:
        return value.replace("\\n", "\n")
    try:
        with open(os.path.expanduser(value), encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or "not a text file"
        raise ConfigError(f"STARK_PRIVATE_KEY: the key file cannot be read ({reason})") from None
    if "-----BEGIN" not in text:
        raise ConfigError("STARK_PRIVATE_KEY: the key file is not a PEM private key")
    return text


def _default_database_path(environ):
    # systemd's StateDirectory= sets STATE_DIRECTORY, colon-separated when several.
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state_dir or ".", "stark_challenge.sqlite3")


def load(environ=None, dotenv_path=".env", overrides=None, require_credentials=True, isatty=False,
         dotenv_required=False, journald=False):
    """Return the validated Config; raise ConfigError naming the first bad variable.

    ``environ`` (default ``os.environ``) wins over the ``.env`` file at ``dotenv_path``
    (which must exist if ``dotenv_required``: a file the operator named);
    ``overrides`` (from command-line flags) win over both. Empty values count as unset.
    With ``require_credentials`` false (``status`` reads only the database), the Stark Bank
    project variables may be missing.
    """
    environ = dict(os.environ if environ is None else environ)
    env = dict(DEFAULTS)
    merged = {**(read_dotenv(dotenv_path, dotenv_required) if dotenv_path else {}), **environ, **(overrides or {})}
    env.update({k: v for k, v in merged.items() if k in DEFAULTS and v != ""})
    if not env["LOG_FORMAT"].strip():
        env["LOG_FORMAT"] = "journal" if journald else "text" if isatty else "json"

    values = {}
    for variable in VARIABLES:
        try:
            values[variable.field] = variable.parse(env[variable.name])
        except ValueError as e:
            raise ConfigError(f"{variable.name}: {e}") from None
        if variable.check is not None:
            variable.check(values, require_credentials)
    if not values["database_url"]:
        values["database_path"] = values["database_path"] or _default_database_path(environ)
    return Config(**values)
