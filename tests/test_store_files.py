"""store: the database and its side files are private (0600) whatever the umask, new or inherited."""

import os
import stat

import pytest

from stark_challenge.store import Store


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the usual umask outside systemd: files 0644
    yield
    os.umask(old)


def test_a_new_database_and_its_side_files_are_0600(tmp_path, loose_umask):
    path = str(tmp_path / "new.sqlite3")
    store = Store(path)
    try:
        assert store.ping()
        modes = {suffix: mode(path + suffix) for suffix in ("", "-wal", "-shm", ".lock")}
    finally:
        store.close()
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600, ".lock": 0o600}


def test_files_left_readable_by_an_older_version_are_narrowed_to_0600(tmp_path, loose_umask):
    path = str(tmp_path / "old.sqlite3")
    Store(path).close()
    for suffix in ("", ".lock"):
        os.chmod(path + suffix, 0o644)
    with open(path + "-wal", "wb"):  # a leftover side file, as a killed process leaves it
        pass
    os.chmod(path + "-wal", 0o644)
    store = Store(path)
    try:
        assert store.ping()
        assert {suffix: mode(path + suffix) for suffix in ("", "-wal", ".lock")} == {
            "": 0o600, "-wal": 0o600, ".lock": 0o600}
    finally:
        store.close()
