"""The exception hierarchy of stark_challenge.

Every error the service raises on purpose is a ``StarkChallengeError``. Foreign
errors (the SDK's, ``requests``', ``sqlite3``'s, ``psycopg``'s) are translated where they enter:
SDK errors in ``bank``, configuration errors in ``config``, database errors in
``sqlite_db`` and ``postgres_db``. This module imports
nothing from the package.
"""

__all__ = [
    "StarkChallengeError",
    "ConfigError",
    "SignatureError",
    "BankError",
    "BankUnavailable",
    "BankRejected",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
]


class StarkChallengeError(Exception):
    """Base class of every error stark_challenge raises on purpose."""


class ConfigError(StarkChallengeError):
    """A configuration value is missing or invalid; the message names the variable, never its value."""


class SignatureError(StarkChallengeError):
    """A webhook's Digital-Signature is missing, malformed or does not match Stark Bank's key."""


class BankError(StarkChallengeError):
    """A call to Stark Bank did not succeed.

    ``errors`` holds Stark Bank's ``(code, message)`` pairs when it gave any.
    """

    def __init__(self, message, errors=()):
        super().__init__(message)
        self.errors = tuple(errors)

    @property
    def codes(self):
        """Return Stark Bank's error codes, in order, as a tuple of strings."""
        return tuple(code for code, _ in self.errors)


class BankUnavailable(BankError):
    """Transient: timeout, connection error, 5xx. Safe to retry later with the same idempotency key."""


class BankRejected(BankError):
    """Permanent: Stark Bank refused the request (4xx). Retrying the same request gives the same answer."""


class StoreError(StarkChallengeError):
    """The database cannot be opened, read or written."""


class StoreLocked(StoreError):
    """Another process already runs the service on this SQLite database."""


class StoreUnavailable(StoreError):
    """Transient: the database server or the connection to it is gone (restart, killed backend, timeout).

    Nothing of the failed transaction was kept; the store connects again on its own.
    """
