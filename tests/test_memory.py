"""memory: GET /debug/memory only when DEBUG_MEMORY asks for it, and SQLite's page cache held to its bound."""

import base64
import json
import os
import platform
import subprocess
import sys

import pytest

from stark_challenge import memory
from stark_challenge.events import Event
from stark_challenge.sqlite_db import CACHE_KIB
from stark_challenge.store import Store
from support import ROOT

AUTH = {"WEBHOOK_USERNAME": "ops", "WEBHOOK_PASSWORD": "s3cret-pass"}


def test_the_debug_route_does_not_exist_by_default(service_factory):
    service = service_factory(**AUTH).start()
    assert service.operate("GET", "/debug/memory") == (404, {"error": "not found"})


def test_the_debug_route_answers_the_figures_behind_the_operators_basic_auth(service_factory):
    service = service_factory(DEBUG_MEMORY="on", **AUTH).start()
    assert service.request("GET", "/debug/memory")[0] == 401
    webhook = "Basic " + base64.b64encode(b"ops:s3cret-pass").decode()
    assert service.request("GET", "/debug/memory", headers={"Authorization": webhook})[0] == 401
    status, figures = service.operate("GET", "/debug/memory")
    assert status == 200
    assert figures["rss_kib"] > 10_000 and 0 < figures["rss_anon_kib"] < figures["rss_kib"] <= figures["rss_peak_kib"]
    assert figures["threads"] >= 3 and figures["open_files"] >= 3
    assert figures["python_blocks"] > 10_000 and figures["gc_objects"] > 1_000
    assert figures["database"] == "sqlite" and figures["sqlite"]["cache_kib_per_connection"] == CACHE_KIB
    assert 0 < figures["sqlite"]["page_cache_bytes"] <= figures["sqlite"]["memory_used_bytes"]
    assert "tracemalloc" not in figures  # only with DEBUG_MEMORY=trace


def test_trace_adds_tracemallocs_top_lines(service_factory):
    service = service_factory(DEBUG_MEMORY="trace", **AUTH).start()
    status, figures = service.operate("GET", "/debug/memory")
    traced = figures["tracemalloc"]
    assert status == 200 and 0 < traced["current_bytes"] <= traced["peak_bytes"]
    assert 0 < len(traced["top"]) <= memory.TOP_SITES
    assert all(site["bytes"] > 0 and ":" in site["where"] for site in traced["top"])


def test_on_postgresql_the_figures_say_so_and_hold_no_sqlite_page_cache():
    figures = memory.Figures(cache_kib=CACHE_KIB, backend="postgres").read()
    assert figures["database"] == "postgres" and figures["sqlite"] is None
    assert figures["rss_kib"] > 10_000


def test_sqlites_page_cache_stays_within_its_bound_as_the_database_grows(tmp_path, clock):
    figures = memory.Figures(cache_kib=CACHE_KIB)
    if figures.read()["sqlite"] is None:
        pytest.skip("SQLite is built into this Python: its counters cannot be read")
    store = Store(str(tmp_path / "big.sqlite3"))
    try:
        body = {"padding": "x" * 2000}
        with store.atomic():  # one commit: the cache fills as the pages are written
            for i in range(4000):  # about 8 MB of events: more than three times the cache
                store.add_event(Event(f"ev{i}", "invoice", "updated", f"inv{i}", body), "webhook", clock())
        assert store._one("select sum(length(body)) from event")[0] > 3 * CACHE_KIB * 1024
        cache = figures.read()["sqlite"]["page_cache_bytes"]
        # each cached page carries a header of a few hundred bytes besides its 4 KiB
        assert CACHE_KIB * 1024 * 0.5 < cache <= CACHE_KIB * 1024 * 1.15
    finally:
        store.close()


ARENA_PROBE = """
import json, sys, threading
from stark_challenge import memory
applied = memory.limit_arenas()
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()
    kept = [bytes(4096) for _ in range(64)]  # above pymalloc's 512 bytes: the C library's malloc
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
heaps = 0  # glibc's thread arenas: heaps mapped at 64 MiB boundaries
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split()
        if len(fields) == 5 and fields[1].startswith("rw") and int(fields[0].split("-")[0], 16) % (64 << 20) == 0:
            heaps += 1
print(json.dumps({"applied": applied, "thread_arenas": heaps}))
"""


def probe_arenas(**env):
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_service_caps_mallocs_arenas_unless_the_environment_says():
    capped = probe_arenas()
    assert capped["applied"] == memory.ARENAS == 2
    assert capped["thread_arenas"] <= memory.ARENAS - 1  # the main arena is the brk heap, not mapped
    assert probe_arenas(MALLOC_ARENA_MAX="8") == {"applied": None, "thread_arenas": 7}  # the operator's cap holds
