"""The environment of every process a test starts: an allow-list, never the user's shell.

A service or CLI process gets PATH, the locale, a HOME of its own, PYTHONPATH (the
repository, so the checkout under test is what runs), coverage's variables (so its lines
count) and what the test sets; it runs in a directory of its own, so no ``.env`` of the
user's is read. ``child_env`` builds that environment and ``run_cli`` runs the command line
with it.
"""

import os
import subprocess
import sys

__all__ = ["ROOT", "child_env", "run_cli"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Taken from the test runner's environment when set: nothing here configures the service.
PASSED_THROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT", "TMPDIR")
# Coverage's subprocess measurement (COVERAGE_PROCESS_START/CONFIG, COVERAGE_FILE, ...).
PASSED_THROUGH_PREFIXES = ("COVERAGE_",)


def child_env(home, **values):
    """Return a fresh environment for a child process whose HOME is ``home``, plus ``values``."""
    env = {name: value for name, value in os.environ.items()
           if name in PASSED_THROUGH or name.startswith(PASSED_THROUGH_PREFIXES)}
    env.update({
        "HOME": str(home),
        "PYTHONPATH": ROOT,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.update({name: str(value) for name, value in values.items()})
    return env


def run_cli(*args, cwd, env=None, executable=None, timeout=30):
    """Run ``python -m stark_challenge ARGS`` (or ``executable ARGS``) in ``cwd`` with an
    isolated environment plus ``env``; return the CompletedProcess (text)."""
    command = [executable] if executable else [sys.executable, "-m", "stark_challenge"]
    return subprocess.run([*command, *args], env=child_env(cwd, **(env or {})), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
