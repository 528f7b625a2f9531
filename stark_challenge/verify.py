"""Verify: is a Digital-Signature Stark Bank's? Signature checking whole: the key cache, two verifiers, one verdict.

Stark Bank signs each webhook body with ECDSA over secp256k1 and SHA-256 and sends
the base64 DER signature in the ``Digital-Signature`` header. A body verifies if the
signature signs its exact text or, as ``starkbank.event.parse`` also accepts, its
key-sorted re-serialisation (``signature_matches``).

``Signatures`` gives the verdict (``check``): the SDK's checks with its key cache, but
where ``parse`` fetches the key again after every failed check (so each forged request
would cost an outbound call), ``KeyCache`` refetches it at most once a minute. The key
itself is fetched by the callable it is given (``bank.Bank.fetch_public_key``): this
module makes no call of its own.

Two verifiers give the same verdict on every input:

- ``PureVerifier``: the SDK's own pure-Python ``ellipticcurve``; needs nothing beyond
  ``starkbank``, and holds the GIL for the whole check.
- ``NativeVerifier``: libsecp256k1 through ``coincurve`` (the ``[fast]`` extra), many
  times cheaper (docs/benchmarks.md). libsecp256k1 accepts only low-S signatures
  (``s <= n/2``) while Stark Bank's real ones are high-S; ``(r, s)`` and ``(r, n - s)``
  verify alike, so the signature is normalised to low-S before the check.

Both read the signature with one parser (``parse_signature``: ``ellipticcurve``'s strict
DER) and the key with one (``load_key``: ``ellipticcurve``'s PEM reader), so a
malformed signature or key is refused the same way whichever verifier runs.
``best_verifier()`` picks the native one when ``coincurve`` is importable, the pure
one otherwise or when asked (``best_verifier(native=False)``); ``.name`` says which,
``.cheap`` whether a check is cheap enough to run on the HTTP selector thread.

Threads: ``Signatures`` and ``KeyCache`` may be called from any thread (the cache has
its own lock; checks run one at a time). Verifiers hold no state but the native one's
cache of parsed keys, which tolerates concurrent use (a race parses a key twice).
"""

import json
import logging
import threading
import time
from hashlib import sha256

from ellipticcurve import Ecdsa, PublicKey, Signature
from ellipticcurve.curve import secp256k1

try:
    import coincurve
except ImportError:  # the [fast] extra is not installed: the pure verifier runs
    coincurve = None

from .errors import BankUnavailable, SignatureError

__all__ = [
    "KEY_REFRESH_S", "NATIVE_NAME", "PURE_NAME", "KeyCache", "MalformedSignature", "NativeVerifier", "PureVerifier",
    "Signatures", "best_verifier", "load_key", "low_s_der", "native_available", "parse_signature",
    "signature_matches",
]

logger = logging.getLogger(__name__)

NATIVE_NAME = "native (coincurve)"
PURE_NAME = "pure Python (ellipticcurve)"

# A failed verification may mean Stark Bank rotated its key; refetch it at most this often,
# so a flood of forged requests costs at most one outbound call a minute.
KEY_REFRESH_S = 60.0
# With no key at all (Stark Bank unreachable at start), try again at most this often.
KEY_RETRY_S = 5.0
# Why a well-formed signature is refused (the refusal log line's kind too).
NO_MATCH = "Digital-Signature does not match Stark Bank's public key"

_N = secp256k1.N  # the order of the curve's group
# A handful of keys is plenty: Stark Bank publishes one and rotates it rarely.
_MAX_CACHED_KEYS = 8


class MalformedSignature(ValueError):
    """The signature is not base64 of a canonical DER ECDSA signature."""


def parse_signature(text):
    """Return the ``ellipticcurve`` Signature in base64 DER ``text``; raise MalformedSignature if unreadable."""
    try:
        return Signature.fromBase64(text)
    except Exception:  # ellipticcurve raises bare Exceptions (and binascii.Error) on bad input
        raise MalformedSignature("not a base64 DER ECDSA signature") from None


def load_key(pem):
    """Return the ``ellipticcurve`` PublicKey in ``pem``; raise ValueError if it is not a secp256k1 public key."""
    try:
        return PublicKey.fromPem(pem)
    except Exception as e:  # ellipticcurve raises bare Exceptions on a bad PEM or a point off the curve
        raise ValueError(f"not a secp256k1 public key in PEM format ({type(e).__name__})") from None


def native_available():
    """Return True if ``coincurve`` (the ``[fast]`` extra) could be imported."""
    return coincurve is not None


def best_verifier(native=None):
    """Return the native verifier if ``coincurve`` is importable, else the pure one.

    ``native=False`` forces the pure verifier; ``native=True`` demands the native one
    (RuntimeError without ``coincurve``).
    """
    if native is None:
        native = native_available()
    return NativeVerifier() if native else PureVerifier()


def signature_matches(content, signature, key, verifier):
    """Return True if ``signature`` signs ``content`` (str) or its key-sorted form, as the SDK allows.

    ``signature`` comes from ``parse_signature``, ``key`` from ``load_key``.
    """
    if verifier.verify(content, signature, key):
        return True
    try:
        normalized = json.dumps(json.loads(content), sort_keys=True)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes: no sorted form
        return False
    return normalized != content and verifier.verify(normalized, signature, key)


class KeyCache:
    """Stark Bank's public key, fetched by ``fetch`` and refetched at most once per ``refresh_s``.

    ``fetch`` is ``() -> PEM text`` (raises BankUnavailable when Stark Bank does not
    answer); ``clock`` is a monotonic clock in seconds. Thread-safe.
    """

    def __init__(self, fetch, clock=time.monotonic, refresh_s=KEY_REFRESH_S, retry_s=KEY_RETRY_S):
        self._fetch = fetch
        self._clock = clock
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._key = None  # ellipticcurve PublicKey
        self._fetched_at = None  # clock time of the last fetch attempt
        self.fetches = 0  # fetch attempts, for /status, /metrics and the benchmark

    def get(self):
        """Return the cached key, fetching it if there is none; raise BankUnavailable if that fails.

        With no key, a fetch is tried at most once per ``retry_s``; in between, BankUnavailable.
        """
        key = self._key
        if key is not None:
            return key
        with self._lock:
            if self._key is None:
                if self._fetched_at is not None and self._clock() - self._fetched_at < self._retry_s:
                    raise BankUnavailable("Stark Bank's public key is not available yet")
                self._load()
            return self._key

    def cached(self):
        """Return the cached key, or None if there is none yet. Never fetches."""
        return self._key

    def refresh_due(self):
        """Return True if ``refresh`` would fetch the key now (its refresh period is over)."""
        fetched_at = self._fetched_at
        return fetched_at is None or self._clock() - fetched_at >= self._refresh_s

    def refresh(self, stale):
        """Return a newer key than ``stale`` if one may be fetched now, else None.

        At most one fetch per refresh period, whatever the number of callers. Raise
        BankUnavailable if the fetch fails.
        """
        with self._lock:
            if self._key is not stale:  # another thread refreshed meanwhile
                return self._key
            if self._fetched_at is not None and self._clock() - self._fetched_at < self._refresh_s:
                return None
            self._load()
            return self._key

    def _load(self):
        self._fetched_at = self._clock()
        self.fetches += 1
        pem = self._fetch()
        try:
            self._key = load_key(pem)
        except ValueError as e:
            raise BankUnavailable(f"Stark Bank's public key is unreadable: {e}") from None
        logger.info("fetched Stark Bank's public key")


class Signatures:
    """The verdict on a webhook's Digital-Signature: Stark Bank's or not, with the key cached.

    ``fetch_key`` is ``() -> PEM text`` of Stark Bank's current public key
    (``bank.Bank.fetch_public_key``); ``verifier`` one of the verifiers below
    (``best_verifier()`` by default); ``clock`` the key cache's monotonic clock.
    ``keys`` is the KeyCache, ``name`` the verifier in use, ``cheap`` whether a check may
    run on the HTTP selector thread. Thread-safe; checks run one at a time (a pure check
    holds the GIL, a native one takes it back at each call: side by side they only take
    turns).
    """

    def __init__(self, fetch_key, verifier=None, clock=time.monotonic):
        self.keys = KeyCache(fetch_key, clock=clock)
        self._verifier = verifier or best_verifier()
        self.name = self._verifier.name  # the verifier in use, e.g. "native (coincurve)"
        self.cheap = self._verifier.cheap  # a check may run on the HTTP selector thread (may_wait=False)
        self._checking = threading.Lock()

    def check(self, content, signature, may_wait=True):
        """Return True if ``signature`` (the header's text) signs ``content`` (the raw body, str).

        Raise SignatureError if it is malformed or does not match: after a failed
        match the key is fetched again, at most once per ``KEY_REFRESH_S``, and tried.
        Raise BankUnavailable if there is no key and it cannot be fetched.

        ``may_wait`` False: never fetch, never run a check that is not cheap; return
        None where only a check that may wait can tell (the pure verifier, no key cached
        yet, or a failed match while a refetch is due: Stark Bank may have rotated its
        key). Otherwise the verdict is the one ``may_wait`` True gives.
        """
        if not may_wait:
            key = self.keys.cached()
            if not self._verifier.cheap or key is None:
                return None
            if self._matches(content, _parsed(signature), key):
                return True
            if self.keys.refresh_due() or self.keys.cached() is not key:  # a refetch is due, or just happened
                return None
            raise SignatureError(NO_MATCH)
        parsed = _parsed(signature)
        key = self.keys.get()
        if self._matches(content, parsed, key):
            return True
        fresher = self.keys.refresh(stale=key)
        if fresher is not None and fresher is not key and self._matches(content, parsed, fresher):
            return True
        raise SignatureError(NO_MATCH)

    def _matches(self, content, parsed, key):
        with self._checking:
            return signature_matches(content, parsed, key, self._verifier)


def _parsed(signature):
    """Return the parsed Digital-Signature header; raise SignatureError if it is malformed."""
    try:
        return parse_signature(signature)
    except MalformedSignature:
        raise SignatureError("malformed Digital-Signature") from None


class PureVerifier:
    """ECDSA with the SDK's pure-Python ``ellipticcurve``: what ``starkbank.event.parse`` does."""

    name = PURE_NAME
    cheap = False  # holds the GIL for the whole check: too dear for the HTTP selector thread

    def verify(self, message, signature, key):
        """Return True if ``signature`` signs the UTF-8 text ``message`` for ``key``."""
        return Ecdsa.verify(message=message, signature=signature, publicKey=key)


class NativeVerifier:
    """ECDSA with libsecp256k1 (``coincurve``), on the same parsed signatures and keys as the pure one."""

    name = NATIVE_NAME
    cheap = True  # the HTTP selector thread may run it (``Signatures.check(..., may_wait=False)``)

    def __init__(self):
        if coincurve is None:
            raise RuntimeError("the native verifier needs coincurve: pip install 'stark-challenge[fast]'")
        self._keys = {}  # (x, y) of an ellipticcurve key -> its coincurve PublicKey

    def verify(self, message, signature, key):
        """Return True if ``signature`` signs the UTF-8 text ``message`` for ``key``."""
        r, s = signature.r, signature.s
        # The pure verifier's range checks; libsecp256k1 would refuse these at parsing.
        if not (1 <= r < _N and 1 <= s < _N):
            return False
        der = low_s_der(r, s)
        return self._native_key(key).verify(der, message.encode("utf-8"), hasher=_sha256)

    def _native_key(self, key):
        """Return ``key`` (ellipticcurve) as a coincurve PublicKey, parsed once per key."""
        point = (key.point.x, key.point.y)
        native = self._keys.get(point)
        if native is None:
            native = coincurve.PublicKey.from_point(*point)
            if len(self._keys) >= _MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[point] = native
        return native


def _sha256(data):
    return sha256(data).digest()


def low_s_der(r, s):
    """Return the DER encoding of signature ``(r, s)`` with ``s`` replaced by ``n - s`` if high."""
    if s > _N // 2:
        s = _N - s
    return _der_sequence(_der_integer(r) + _der_integer(s))


def _der_integer(value):
    # Big-endian, minimal, with a leading zero byte when the top bit is set (DER integers are signed).
    body = value.to_bytes((value.bit_length() + 8) // 8, "big")
    return b"\x02" + bytes([len(body)]) + body


def _der_sequence(content):
    # Two integers below 2**256 take at most 70 bytes: the short length form always fits.
    return b"\x30" + bytes([len(content)]) + content
