"""A throwaway PostgreSQL server for the tests: Debian's binaries, a temporary folder, a free port.

``Cluster.start()`` runs ``initdb`` and ``pg_ctl start`` (about a second), as the
``postgres`` user when the tests run as root (``initdb`` refuses root), in a folder
that user owns. It creates a role with a password (connections over TCP use
scram-sha-256, as a real deployment would) and one database. Each test gets a
schema of its own (``new_url()``: the URL selects it through ``options``), which is
much cheaper than a database each. ``restart()`` stops the server at once
(``-m immediate``: crash recovery at the next start) and starts it again;
``terminate(application_name)`` kills the backends of a client.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse

from .waiting import free_port

__all__ = ["Cluster", "find_bindir"]

USER = "stark"
PASSWORD = "s3cret-test-pass"
DATABASE = "stark"


def find_bindir():
    """Return the folder of PostgreSQL's server binaries (initdb, pg_ctl), or None if not installed."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        candidates.insert(0, found.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    for directory in candidates:
        if directory and os.path.exists(os.path.join(directory, "initdb")):
            return directory
    return None


class Cluster:
    """One PostgreSQL server in a temporary folder. See the module docstring."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="stark-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self._as_postgres = os.geteuid() == 0
        self._schemas = 0
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def _run(self, *args, timeout=60):
        command = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def start(self):
        """Create the cluster, start it, create the role and the database; return self."""
        password_file = os.path.join(self.root, "password")
        with open(password_file, "w") as f:
            f.write(PASSWORD + "\n")
        if self._as_postgres:
            shutil.chown(password_file, "postgres")
        self._run("initdb", "--no-sync", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                       "full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n")
        self._pg_ctl_start()
        self.psql(f"create role {USER} login password '{PASSWORD}'")
        self.psql(f"create database {DATABASE} owner {USER}")
        return self

    def _pg_ctl_start(self):
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l", self.log)

    def psql(self, sql, database="postgres"):
        """Run ``sql`` as the superuser over the Unix socket; return psql's output (unaligned, tuples only)."""
        return self._run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.root, "-p",
                         str(self.port), "-d", database, "-c", sql)

    def url(self, schema=None, user=USER, password=PASSWORD):
        """Return the libpq URI of the test database; with ``schema``, one that works in that schema."""
        url = f"postgresql://{user}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{self.port}/{DATABASE}"
        if schema:
            url += "?options=" + urllib.parse.quote(f"-csearch_path={schema}", safe="")
        return url

    def new_url(self):
        """Create an empty schema and return a URL whose connections work in it (a fresh store each time)."""
        self._schemas += 1
        schema = f"t{os.getpid()}_{self._schemas}"
        self.psql(f"create schema {schema} authorization {USER}", database=DATABASE)
        return self.url(schema)

    def connections(self, application_name="stark_challenge"):
        """Return how many backends serve clients with this application name."""
        out = self.psql(f"select count(*) from pg_stat_activity where application_name = '{application_name}'")
        return int(out.strip() or 0)

    def terminate(self, application_name="stark_challenge"):
        """Kill every backend of clients with this application name; return how many were killed."""
        out = self.psql("select count(pg_terminate_backend(pid)) from pg_stat_activity"
                        f" where application_name = '{application_name}' and pid <> pg_backend_pid()")
        return int(out.strip() or 0)

    def stop_now(self):
        """Stop the server at once (``-m immediate``: no checkpoint; crash recovery at the next start)."""
        self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data)

    def start_again(self):
        self._pg_ctl_start()

    def restart(self):
        """Stop the server at once and start it again."""
        self.stop_now()
        self.start_again()

    def cpu_seconds(self):
        """Return the CPU seconds (user + system) used so far by the server's processes."""
        total = 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in _server_pids(self.data):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks
            except (OSError, IndexError, ValueError):
                continue
        return total

    def close(self):
        """Stop the server (if running) and remove its folder."""
        try:
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data, timeout=30)
        except (RuntimeError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def _server_pids(data):
    """Return the postmaster's pid (from postmaster.pid) and its children's."""
    try:
        with open(os.path.join(data, "postmaster.pid")) as f:
            main = int(f.readline())
    except (OSError, ValueError):
        return []
    pids = [main]
    try:
        with open(f"/proc/{main}/task/{main}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids
