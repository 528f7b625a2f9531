"""Verify: does a Digital-Signature sign a webhook body? Two interchangeable ECDSA verifiers.

Stark Bank signs each webhook body with ECDSA over secp256k1 and SHA-256 and sends
the base64 DER signature in the ``Digital-Signature`` header. A body verifies if the
signature signs its exact text or, as ``starkbank.event.parse`` also accepts, its
key-sorted re-serialisation (``signature_matches``).

Two verifiers give the same verdict on every input:

- ``PureVerifier``: the SDK's own pure-Python ``ellipticcurve`` (about 1 ms a check);
  needs nothing beyond ``starkbank``.
- ``NativeVerifier``: libsecp256k1 through ``coincurve`` (the ``[fast]`` extra), about
  forty times cheaper. libsecp256k1 accepts only low-S signatures (``s <= n/2``) while
  Stark Bank's real ones are high-S; ``(r, s)`` and ``(r, n - s)`` verify alike, so
  the signature is normalised to low-S before the check.

Both read the signature with one parser (``parse_signature``: ``ellipticcurve``'s strict
DER) and the key with one (``load_key``: ``ellipticcurve``'s PEM reader), so a
malformed signature or key is refused the same way whichever verifier runs.
``best_verifier()`` picks the native one when ``coincurve`` is importable, the pure
one otherwise or when asked (``best_verifier(native=False)``); ``.name`` says which,
``.cheap`` whether a check costs little enough to run on the HTTP selector thread.

Threads: verifiers hold no state but the native one's cache of parsed keys, which
tolerates concurrent use (a race parses a key twice, nothing worse).
"""

import json
from hashlib import sha256

from ellipticcurve import Ecdsa, PublicKey, Signature
from ellipticcurve.curve import secp256k1

try:
    import coincurve
except ImportError:  # the [fast] extra is not installed: the pure verifier runs
    coincurve = None

__all__ = [
    "NATIVE_NAME", "PURE_NAME", "MalformedSignature", "NativeVerifier", "PureVerifier",
    "best_verifier", "load_key", "low_s_der", "native_available", "parse_signature", "signature_matches",
]

NATIVE_NAME = "native (coincurve)"
PURE_NAME = "pure Python (ellipticcurve)"

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


class PureVerifier:
    """ECDSA with the SDK's pure-Python ``ellipticcurve``: what ``starkbank.event.parse`` does."""

    name = PURE_NAME
    cheap = False  # about a millisecond of CPU a check, holding the GIL throughout

    def verify(self, message, signature, key):
        """Return True if ``signature`` signs the UTF-8 text ``message`` for ``key``."""
        return Ecdsa.verify(message=message, signature=signature, publicKey=key)


class NativeVerifier:
    """ECDSA with libsecp256k1 (``coincurve``), on the same parsed signatures and keys as the pure one."""

    name = NATIVE_NAME
    cheap = True  # tens of microseconds a check: the HTTP selector thread may run it (``Bank.verdict_at_once``)

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
