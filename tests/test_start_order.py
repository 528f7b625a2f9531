"""Start-up order: the schedule's 24 h window is recorded only once the service listens."""

import socket

from stark_challenge.store import Store

from support import run_cli


def test_a_start_that_cannot_bind_its_port_records_no_schedule_window(emulator_project, tmp_path):
    database = tmp_path / "db.sqlite3"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("run", cwd=tmp_path, env={**emulator_project.env, "HOST": "127.0.0.1", "PORT": str(port),
                                                 "DATABASE_PATH": str(database)})
    assert done.returncode == 2  # a configuration error: the message suggests PORT
    assert f"stark_challenge: cannot listen on 127.0.0.1:{port}: " in done.stderr.splitlines()[-1]
    reader = Store(str(database), read_only=True)
    try:
        assert reader.schedule() is None  # the window's clock did not start at a start that failed
        assert reader.rounds() == []
    finally:
        reader.close()
