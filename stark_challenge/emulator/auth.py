"""Request authentication as Stark Bank does it: Access-Id, Access-Time, Access-Signature.

The SDK signs ``"{access_id}:{access_time}:{body}"`` with the project's secp256k1 key
(starkcore/utils/request.py) and sends the base64 DER signature. `Projects` keeps the
registered projects' public keys and `check` verifies a request against them, refusing,
in this order: a missing, malformed or unknown Access-Id (invalidAccessId), a missing,
malformed or stale Access-Time (invalidAccessTime, more than max_clock_skew_s away from
our clock), and a missing, malformed or wrong signature (invalidSignature).
Only "project/<id>" users exist here; organizations and apps are refused.

Each project belongs to one workspace (`workspace_of`), whose entities alone its
requests see.

Thread-safe: one lock around the registry.
"""

import threading
import time

from ellipticcurve import Ecdsa, PublicKey, Signature

__all__ = ["Projects"]


class Projects:
    """Registered projects (id -> public key) and the request check."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._keys = {}  # project id -> ellipticcurve PublicKey
        self._workspaces = {}  # project id -> workspace id (None: the emulator's first workspace)

    def register(self, project_id, public_key_pem, workspace_id=None):
        """Register (or replace) a project's public key, in a workspace (None: the first one).

        Raise ValueError for a bad id or PEM.
        """
        if not isinstance(project_id, str) or not project_id or "/" in project_id:
            raise ValueError("project id must be a non-empty string without '/'")
        try:
            public_key = PublicKey.fromPem(public_key_pem)
        except Exception as error:  # the library raises assorted errors on bad PEM
            raise ValueError("not a public key PEM: %s" % error) from error
        with self._lock:
            self._keys[project_id] = public_key
            self._workspaces[project_id] = workspace_id

    def workspace_of(self, headers):
        """Return the workspace id of the project named by the Access-Id header (None: the first one).

        Call it only for a request `check` accepted.
        """
        _, _, project_id = headers.get("access-id", "").partition("/")
        with self._lock:
            return self._workspaces.get(project_id)

    def check(self, headers, body, max_skew_s):
        """Return None if the request is authentic, else an error {"code", "message"}.

        headers maps lowercased header names to values; body is the request body as text.
        """
        access_id = headers.get("access-id", "")
        kind, _, project_id = access_id.partition("/")
        with self._lock:
            public_key = self._keys.get(project_id) if kind == "project" else None
        if public_key is None:
            return {"code": "invalidAccessId", "message": "Access-Id %r is not a registered project" % access_id}

        access_time = headers.get("access-time", "")
        try:
            skew_s = abs(self._clock() - float(access_time))
        except ValueError:
            return {"code": "invalidAccessTime", "message": "Access-Time must be a unix timestamp"}
        if not skew_s <= max_skew_s:  # also refuses nan
            return {"code": "invalidAccessTime",
                    "message": "Access-Time is %.0f s away from the server clock" % skew_s}

        message = "%s:%s:%s" % (access_id, access_time, body)
        try:
            signature = Signature.fromBase64(headers.get("access-signature", ""))
            valid = Ecdsa.verify(message, signature, public_key)
        except Exception:  # malformed base64 or DER: the library raises assorted errors
            valid = False
        if not valid:
            return {"code": "invalidSignature", "message": "Access-Signature does not match the request"}
        return None
