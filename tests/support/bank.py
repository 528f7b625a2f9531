"""Configurations and Stark Bank-shaped data for in-process tests: a Config from variable
names, one for an emulator project, webhook bodies signed with the emulator's key, the
service's verdict on a signature, and a Gate whose key comes from Stark Bank (the emulator)."""

import json

from stark_challenge import config as config_module
from stark_challenge.bank import Bank
from stark_challenge.errors import SignatureError
from stark_challenge.gate import Gate
from stark_challenge.verify import Signatures

__all__ = ["make_config", "make_gate", "sdk_config", "signed_event", "verifies"]

DUMMY_KEY = "-----BEGIN EC PRIVATE KEY-----\nx\n-----END EC PRIVATE KEY-----"


def make_config(**values):
    """Return a Config from variable names (``INVOICE_MIN="3"``), with a dummy project unless
    given. Only ``values`` count: neither the process environment nor any ``.env`` is read."""
    env = {"STARK_PROJECT_ID": "1", "STARK_PRIVATE_KEY": DUMMY_KEY}
    env.update({k: str(v) for k, v in values.items()})
    return config_module.load(env, dotenv_path=None)


def sdk_config(sdk, **values):
    """Return a Config for the emulator's project (see the ``sdk`` fixture), with overrides."""
    return make_config(**{"STARK_PROJECT_ID": sdk["project_id"], "STARK_PRIVATE_KEY": sdk["private_key"], **values})


def signed_event(emulator, event_id, entity, log_type="credited", subscription="invoice", errors=()):
    """Return (body bytes, headers) of a webhook for ``entity`` (a dict, camelCase), signed by the emulator."""
    body = json.dumps({
        "event": {
            "id": event_id,
            "created": "2026-11-28T12:00:00.000000+00:00",
            "isDelivered": False,
            "subscription": subscription,
            "workspaceId": "1",
            "log": {"id": f"log-{event_id}", "type": log_type, "created": "2026-11-28T12:00:00+00:00",
                    "errors": list(errors), subscription: entity},
        }
    }, separators=(",", ":")).encode()
    return body, {"Digital-Signature": emulator.sign(body), "Content-Type": "application/json"}


def verifies(signatures, content, signature):
    """Return True if ``signatures.check`` (``verify.Signatures``) accepts ``signature`` over ``content``, False if not."""
    try:
        signatures.check(content, signature)
        return True
    except SignatureError:
        return False


def make_gate(store, config, clock, gate=Gate, **kwargs):
    """Return a ``gate`` (a Gate class) over ``store`` whose signature checks fetch the key through a Bank of ``config``."""
    return gate(store, Signatures(Bank(config).fetch_public_key), config, clock, **kwargs)
