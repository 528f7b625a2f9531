"""ECDSA key material: the emulator's event-signing key and fresh project keys.

Stark Bank signs each webhook body with its private key and publishes the public half
at GET /v2/public-key; `EventKey` plays that part. Projects sign API requests with their
own secp256k1 keys; `new_project_key` makes one the way the SDK expects (PEM from the
ellipticcurve library). Keys live only in memory. Signing is thread-safe (no state).
"""

from ellipticcurve import Ecdsa, PrivateKey

__all__ = ["EventKey", "new_project_key"]


class EventKey:
    """The private key that signs webhook bodies, and its public PEM."""

    def __init__(self, private_key=None):
        self._private_key = private_key or PrivateKey()
        # PEM of the public key, as served at GET /v2/public-key.
        self.public_pem = self._private_key.publicKey().toPem().strip() + "\n"

    def sign(self, body):
        """Return the base64 DER signature (the Digital-Signature header) of body, str or bytes."""
        text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
        return Ecdsa.sign(text, self._private_key).toBase64()


def new_project_key():
    """Return (private PEM, public PEM) of a new secp256k1 key."""
    private_key = PrivateKey()
    return private_key.toPem().strip() + "\n", private_key.publicKey().toPem().strip() + "\n"
