"""Opt-in access to Stark Bank's real sandbox for the contract tests.

Read once, when the test modules are imported (before any fixture clears the environment):
``STARK_SANDBOX_TEST=1`` plus ``STARK_PROJECT_ID`` and ``STARK_PRIVATE_KEY`` (the PEM text or
a path to it, as the service reads it). Without all three, ``sandbox_skip_reason`` says why.
"""

import os

__all__ = ["SANDBOX_CREDENTIALS", "sandbox_skip_reason"]

SANDBOX_CREDENTIALS = {name: os.environ.get(name, "")
                       for name in ("STARK_SANDBOX_TEST", "STARK_PROJECT_ID", "STARK_PRIVATE_KEY")}


def sandbox_skip_reason():
    """Return why the sandbox run is skipped, or None when it is requested and configured."""
    if SANDBOX_CREDENTIALS["STARK_SANDBOX_TEST"] != "1":
        return "opt-in: set STARK_SANDBOX_TEST=1, STARK_PROJECT_ID and STARK_PRIVATE_KEY to run against Stark Bank's sandbox"
    missing = [name for name in ("STARK_PROJECT_ID", "STARK_PRIVATE_KEY") if not SANDBOX_CREDENTIALS[name]]
    if missing:
        return "STARK_SANDBOX_TEST=1 but " + " and ".join(missing) + " not set"
    return None
