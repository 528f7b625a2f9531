"""The verifier in use is named where an operator looks: ``check``, the start-up line and
``/status``; without ``coincurve`` the pure-Python one is named instead."""

import re
import sys

from stark_challenge import verify

from support import messages_matching, run_cli, service_settled, wait_for


def test_check_names_the_verifier_and_the_pure_one_without_coincurve(emulator_project, tmp_path):
    env = {**emulator_project.env, "DATABASE_PATH": str(tmp_path / "db.sqlite3")}
    done = run_cli("check", "--offline", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"  webhook signatures verified by: {verify.best_verifier().name}"

    # The same command with coincurve unimportable, as without the [fast] extra.
    script = tmp_path / "without-coincurve"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"import runpy, sys; sys.modules['coincurve'] = None; "
                      "sys.argv[0] = 'stark_challenge'; runpy.run_module('stark_challenge', run_name='__main__')\" "
                      "\"$@\"\n")
    script.chmod(0o755)
    done = run_cli("check", "--offline", cwd=tmp_path, env=env, executable=str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"  webhook signatures verified by: {verify.PURE_NAME}"


def test_the_start_up_line_and_status_name_the_verifier(emulator, service_factory):
    service = service_factory(INVOICE_MIN=1, INVOICE_MAX=1)
    service.start()
    wait_for(lambda: service_settled(service, emulator), message="start-up settled")
    name = verify.best_verifier().name
    assert service.operate("GET", "/status")[1]["service"]["verifier"] == name
    wait_for(lambda: messages_matching(service, rf"listening on .*signatures verified by {re.escape(name)}"),
             message="the start-up line naming the verifier")
