"""Test support: what the test modules share, importable as ``support`` (tests/ is on the
path). Fixtures built from these live in tests/conftest.py."""

from .bank import make_config, make_gate, sdk_config, signed_event, verifies
from .environment import ROOT, child_env, run_cli
from .service import Service, messages_matching, query, service_settled, status_json
from .waiting import FakeClock, free_port, wait_for

__all__ = ["ROOT", "FakeClock", "Service", "child_env", "free_port", "make_config", "make_gate", "messages_matching", "query",
           "run_cli", "sdk_config", "service_settled", "signed_event", "status_json", "verifies", "wait_for"]
