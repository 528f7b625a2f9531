"""Configuration: one frozen ``Config`` read from the environment and a ``.env`` file.

``load()`` reads every variable, validates it and raises ``ConfigError`` naming the
first bad variable and what is wrong with it, never its value (values may be secrets).
The real environment wins over ``.env``. ``VARIABLES`` is the single table that
``--help`` and the README are written from. This module reads files but starts nothing.
"""

import dataclasses
import os
import re
from typing import NamedTuple

from .errors import ConfigError
from .people import is_valid_tax_id

__all__ = ["Config", "VARIABLES", "load", "parse_duration", "read_dotenv"]


class Variable(NamedTuple):
    """One configuration variable, as documented in --help and the README."""

    name: str
    default: str  # "" = unset
    help: str


VARIABLES = (
    Variable("STARK_PROJECT_ID", "", "Stark Bank project id (required unless --emulator)"),
    Variable("STARK_PRIVATE_KEY", "", "the project's private key: a PEM file path or the PEM text (required unless --emulator)"),
    Variable("STARK_ENVIRONMENT", "sandbox", "sandbox or production"),
    Variable("HOST", "0.0.0.0", "address the HTTP server listens on"),
    Variable("PORT", "8000", "port the HTTP server listens on"),
    Variable("WEBHOOK_USERNAME", "", "with WEBHOOK_PASSWORD: HTTP basic auth required on POST /webhook and GET /status"),
    Variable("WEBHOOK_PASSWORD", "", "see WEBHOOK_USERNAME"),
    Variable("INVOICE_INTERVAL", "3h", "time between rounds: seconds or a number with s/m/h/d"),
    Variable("INVOICE_MIN", "8", "fewest invoices in a round"),
    Variable("INVOICE_MAX", "12", "most invoices in a round"),
    Variable("INVOICE_DURATION", "24h", "how long rounds go on after the first; 0 = forever"),
    Variable("TRANSFER_BANK_CODE", "20018183", "receiver of forwarded money: bank code (ISPB or 3-digit code)"),
    Variable("TRANSFER_BRANCH", "0001", "receiver: branch"),
    Variable("TRANSFER_ACCOUNT", "6341320293482496", "receiver: account number"),
    Variable("TRANSFER_NAME", "Stark Bank S.A.", "receiver: name"),
    Variable("TRANSFER_TAX_ID", "20.018.183/0001-80", "receiver: CPF or CNPJ"),
    Variable("TRANSFER_ACCOUNT_TYPE", "payment", "receiver: checking, savings, salary or payment"),
    Variable("DATABASE_PATH", "", "SQLite file of the service's state (default: $STATE_DIRECTORY/stark_challenge.sqlite3, else ./stark_challenge.sqlite3)"),
    Variable("INSTANCE_TAG", "stark-challenge", "tag on every invoice this deployment issues; only their credits are forwarded"),
    Variable("EVENT_POLL_INTERVAL", "10m", "how often undelivered events are pulled from Stark Bank; 0 = only at start-up"),
    Variable("BANK_TIMEOUT", "15s", "timeout of every call to Stark Bank"),
    Variable("MAX_CONNECTIONS", "32", "HTTP requests handled at once (one thread each) and as many queued; "
                                       "more get 503; 16 connections held per thread while they send"),
    Variable("REQUEST_TIMEOUT", "10s", "a request must arrive whole within this of its first byte, and an idle "
                                       "connection is closed after it"),
    Variable("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Variable("LOG_FORMAT", "", "text or json (default: text on a terminal, json otherwise)"),
)

DEFAULTS = {v.name: v.default for v in VARIABLES}

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ACCOUNT_TYPES = ("checking", "savings", "salary", "payment")
# Stark Bank accepts at most 100 invoices per call; rounds above that are sent in chunks,
# but a round of more than this is surely a typo.
MAX_ROUND_SIZE = 10_000


@dataclasses.dataclass(frozen=True)
class Config:
    """The validated configuration. Secrets are kept out of repr()."""

    project_id: str  # "" when the emulator provides the project
    private_key: str = dataclasses.field(repr=False)  # PEM text
    environment: str
    host: str
    port: int
    webhook_username: str = dataclasses.field(repr=False)
    webhook_password: str = dataclasses.field(repr=False)
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
    database_path: str
    instance_tag: str
    event_poll_interval_s: float  # 0 = only at start-up
    bank_timeout_s: float
    max_connections: int
    request_timeout_s: float  # a stalled client is cut off after this
    log_level: str
    log_format: str  # "text" or "json"

    @property
    def basic_auth(self):
        """Return True if HTTP basic auth is configured."""
        return bool(self.webhook_username and self.webhook_password)


def parse_duration(text):
    """Return seconds (float) for ``90``, ``90s``, ``15m``, ``3h``, ``1.5d``; raise ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match:
        raise ValueError("expected seconds or a number with s/m/h/d, e.g. 3h or 90s")
    return float(match.group(1)) * _UNITS.get(match.group(2) or "s")


def read_dotenv(path):
    """Return the KEY=VALUE pairs of a .env file as a dict; {} if it does not exist.

    Blank lines and ``#`` comments are skipped, ``export `` is allowed, one pair of
    matching quotes around a value is removed. A line that is not KEY=VALUE raises
    ConfigError naming the line number.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
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
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].replace("\\n", "\n") if value[0] == '"' else value[1:-1]
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


def _int(env, name, low, high):
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(f"{name}: must be a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be between {low} and {high}")
    return value


def _duration(env, name, allow_zero):
    try:
        value = parse_duration(env[name])
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    if value == 0 and not allow_zero:
        raise ConfigError(f"{name}: must be more than 0")
    return value


def _default_database_path(environ):
    # systemd's StateDirectory= sets STATE_DIRECTORY, colon-separated when several.
    state_dir = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state_dir or ".", "stark_challenge.sqlite3")


def load(environ=None, dotenv_path=".env", overrides=None, require_credentials=True, isatty=False):
    """Return the validated Config; raise ConfigError naming the first bad variable.

    ``environ`` (default ``os.environ``) wins over the ``.env`` file at ``dotenv_path``;
    ``overrides`` (from command-line flags) win over both. Empty values count as unset.
    With ``require_credentials`` false (the emulator supplies them), the Stark Bank
    project variables may be missing.
    """
    environ = dict(os.environ if environ is None else environ)
    env = dict(DEFAULTS)
    merged = {**(read_dotenv(dotenv_path) if dotenv_path else {}), **environ, **(overrides or {})}
    env.update({k: v for k, v in merged.items() if k in DEFAULTS and v != ""})

    project_id = env["STARK_PROJECT_ID"].strip()
    private_key = _read_private_key(env["STARK_PRIVATE_KEY"].strip())
    if require_credentials and not (project_id and private_key):
        missing = "STARK_PROJECT_ID" if not project_id else "STARK_PRIVATE_KEY"
        raise ConfigError(
            f"{missing}: not set. Set STARK_PROJECT_ID and STARK_PRIVATE_KEY "
            "(environment or .env), or try the service with --emulator"
        )
    if project_id and not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", project_id):
        raise ConfigError("STARK_PROJECT_ID: must be the project's id (letters, digits)")

    environment = env["STARK_ENVIRONMENT"].strip().lower()
    if environment not in ("sandbox", "production"):
        raise ConfigError("STARK_ENVIRONMENT: must be sandbox or production")

    username, password = env["WEBHOOK_USERNAME"], env["WEBHOOK_PASSWORD"]
    if bool(username) != bool(password):
        raise ConfigError("WEBHOOK_USERNAME and WEBHOOK_PASSWORD: set both or neither")
    if ":" in username:
        raise ConfigError("WEBHOOK_USERNAME: must not contain ':'")

    invoice_min = _int(env, "INVOICE_MIN", 1, MAX_ROUND_SIZE)
    invoice_max = _int(env, "INVOICE_MAX", 1, MAX_ROUND_SIZE)
    if invoice_min > invoice_max:
        raise ConfigError("INVOICE_MIN: must not be more than INVOICE_MAX")

    tax_id = env["TRANSFER_TAX_ID"].strip()
    if not is_valid_tax_id(tax_id):
        raise ConfigError("TRANSFER_TAX_ID: not a valid CPF or CNPJ (check digits)")
    bank_code = env["TRANSFER_BANK_CODE"].strip()
    if not re.fullmatch(r"\d{3}|\d{8}", bank_code):
        raise ConfigError("TRANSFER_BANK_CODE: must be an 8-digit ISPB or a 3-digit bank code")
    branch = env["TRANSFER_BRANCH"].strip()
    if not re.fullmatch(r"\d{1,6}(-\d)?", branch):
        raise ConfigError("TRANSFER_BRANCH: must be digits, optionally with -digit")
    account = env["TRANSFER_ACCOUNT"].strip()
    if not re.fullmatch(r"\d{1,20}(-[0-9Xx])?", account):
        raise ConfigError("TRANSFER_ACCOUNT: must be digits, optionally with -digit")
    account_type = env["TRANSFER_ACCOUNT_TYPE"].strip()
    if account_type not in ACCOUNT_TYPES:
        raise ConfigError("TRANSFER_ACCOUNT_TYPE: must be one of " + ", ".join(ACCOUNT_TYPES))
    name = env["TRANSFER_NAME"].strip()
    if not name:
        raise ConfigError("TRANSFER_NAME: must not be empty")

    instance_tag = env["INSTANCE_TAG"].strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", instance_tag):
        raise ConfigError("INSTANCE_TAG: lowercase letters, digits, - and _, at most 40")

    log_level = env["LOG_LEVEL"].strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
    log_format = env["LOG_FORMAT"].strip().lower() or ("text" if isatty else "json")
    if log_format not in ("text", "json"):
        raise ConfigError("LOG_FORMAT: must be text or json")

    return Config(
        project_id=project_id,
        private_key=private_key,
        environment=environment,
        host=env["HOST"].strip(),
        port=_int(env, "PORT", 0, 65535),
        webhook_username=username,
        webhook_password=password,
        invoice_interval_s=_duration(env, "INVOICE_INTERVAL", allow_zero=False),
        invoice_min=invoice_min,
        invoice_max=invoice_max,
        invoice_duration_s=_duration(env, "INVOICE_DURATION", allow_zero=True),
        transfer_bank_code=bank_code,
        transfer_branch=branch,
        transfer_account=account,
        transfer_name=name,
        transfer_tax_id=tax_id,
        transfer_account_type=account_type,
        database_path=env["DATABASE_PATH"].strip() or _default_database_path(environ),
        instance_tag=instance_tag,
        event_poll_interval_s=_duration(env, "EVENT_POLL_INTERVAL", allow_zero=True),
        bank_timeout_s=_duration(env, "BANK_TIMEOUT", allow_zero=False),
        max_connections=_int(env, "MAX_CONNECTIONS", 1, 1024),
        request_timeout_s=_duration(env, "REQUEST_TIMEOUT", allow_zero=False),
        log_level=log_level,
        log_format=log_format,
    )
