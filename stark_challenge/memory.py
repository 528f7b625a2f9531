"""Memory: the process's own memory figures, for ``GET /debug/memory`` when ``DEBUG_MEMORY`` is on.

What a soak run (``bench/soak.py``) samples to tell where memory goes:

- the kernel's view, from ``/proc/self``: resident memory (all of it, and its anonymous
  part), its peak, threads and open file descriptors;
- Python's allocator: ``sys.getallocatedblocks()`` (blocks in use, all sizes), and the
  objects the garbage collector tracks;
- the store's backend (``database``: ``sqlite`` or ``postgres``) and, on SQLite, its own
  allocator (``sqlite3_status64``, read through ``ctypes`` from the ``libsqlite3`` the
  ``sqlite3`` module loaded): all it holds, and its page caches. ``sqlite`` is ``None``
  where SQLite is linked into Python itself rather than loaded as a library, and on
  PostgreSQL, whose page cache (``shared_buffers``) is the server's memory, not this
  process's;
- ``limit_arenas`` (called at start-up, whatever ``DEBUG_MEMORY`` says) caps glibc's
  malloc arenas, the one setting here that changes what is measured;
- ``Trimmer`` (run by the main thread, whatever ``DEBUG_MEMORY`` says) hands the
  allocator's free pages back to the kernel every ``TRIM_EVERY_S`` (glibc's
  ``malloc_trim``): memory freed inside the heap otherwise stays resident;
- with ``DEBUG_MEMORY=trace`` only: ``tracemalloc``'s traced total and the ten lines
  that hold most (tracing slows every allocation: for diagnosis, never left on).

The figures are off by default: the route answers 404 unless the operator asks. Reading
them never changes what they measure (beyond the answer built). Thread-safe:
each call reads afresh; the ctypes handle is made once per ``Figures``.
"""

import ctypes
import gc
import os
import sqlite3
import sys
import time
import tracemalloc

__all__ = ["Figures", "Trimmer", "start_tracing", "limit_arenas", "ARENAS", "TRIM_EVERY_S"]

# sqlite3_status64 operations (sqlite3.h).
_SQLITE_STATUS_MEMORY_USED = 0
_SQLITE_STATUS_PAGECACHE_OVERFLOW = 2  # page cache memory taken from the heap (all of it, without a pagecache buffer)
TOP_SITES = 10  # allocation sites listed when tracing
# glibc's malloc arenas the process may use (mallopt's M_ARENA_MAX, as MALLOC_ARENA_MAX sets it).
# Left alone, glibc gives each thread that allocates an arena of its own, up to eight per
# core, and memory freed in one arena is never reused by the threads of another: a soak run
# (bench/soak.py) measured resident memory growing about twice as fast with the default.
ARENAS = 2
_M_ARENA_MAX = -8  # malloc.h


def limit_arenas(environ=None, count=ARENAS):
    """Cap glibc's malloc arenas at ``count`` unless ``MALLOC_ARENA_MAX`` is set; return the cap applied, or None.

    Call before any thread starts: an arena, once a thread has one, stays. Does nothing
    where the C library is not glibc (no ``mallopt``) or the environment already says.
    """
    environ = os.environ if environ is None else environ
    if "MALLOC_ARENA_MAX" in environ:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    return count if mallopt(_M_ARENA_MAX, count) == 1 else None


TRIM_EVERY_S = 60.0  # how often free heap pages are handed back to the kernel


class Trimmer:
    """Hands the C heap's free pages back to the kernel (glibc's ``malloc_trim(0)``), at most every ``every_s``.

    glibc returns memory to the kernel only from the top of a heap: pages freed below a
    chunk still in use stay resident, so under steady traffic resident memory creeps up
    as the heap's holes move about. ``malloc_trim`` releases every whole free page of
    every arena (``madvise``), taking each arena's lock for the walk (a millisecond or
    so for this service's heap). Where the C library has no ``malloc_trim`` (not glibc),
    ``run_if_due`` does nothing. Call it from one thread.
    """

    def __init__(self, every_s=TRIM_EVERY_S, monotonic=time.monotonic):
        self._every_s = every_s
        self._monotonic = monotonic
        self._next_at = monotonic() + every_s
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.trims = 0  # trims done, for tests

    @property
    def available(self):
        """True where the C library has ``malloc_trim`` (glibc)."""
        return self._trim is not None

    def run_if_due(self):
        """Trim if ``every_s`` has passed since the last trim (or the start); return True if it trimmed."""
        now = self._monotonic()
        if self._trim is None or now < self._next_at:
            return False
        self._next_at = now + self._every_s
        self._trim(0)
        self.trims += 1
        return True


def start_tracing():
    """Start ``tracemalloc`` (one frame per allocation) if it is not tracing already."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)


def _loaded_sqlite_library():
    """Return the path of the libsqlite3 this process loaded, or None if SQLite is built into Python."""
    sqlite3.sqlite_version  # noqa: B018  (the module is imported, so its library is mapped)
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip()
                if "/libsqlite3.so" in path:
                    return path
    except OSError:
        pass
    return None


def _sqlite_status(library):
    """Return ``sqlite3_status64``'s (memory used, page cache) in bytes, from ``library`` (a CDLL)."""
    current, highest = ctypes.c_int64(), ctypes.c_int64()
    found = {}
    for name, op in (("memory_used_bytes", _SQLITE_STATUS_MEMORY_USED),
                     ("page_cache_bytes", _SQLITE_STATUS_PAGECACHE_OVERFLOW)):
        if library.sqlite3_status64(op, ctypes.byref(current), ctypes.byref(highest), 0) != 0:
            return None
        found[name] = current.value
    return found


def _proc_status():
    """Return the lines of /proc/self/status we report, in KiB (Threads as a count)."""
    wanted = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "VmHWM": "rss_peak_kib", "Threads": "threads"}
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in wanted:
                found[wanted[name]] = int(value.split()[0])
    return found


class Figures:
    """Reads the figures on demand; ``read()`` returns them as a JSON-able dict."""

    def __init__(self, cache_kib=None, backend="sqlite"):
        """``cache_kib``: the page cache each SQLite connection may hold, reported as configured;
        ``backend``: the store's, 'sqlite' or 'postgres' (no SQLite figures then)."""
        self._cache_kib = cache_kib
        self._backend = backend
        path = _loaded_sqlite_library() if backend == "sqlite" else None
        try:
            self._sqlite = ctypes.CDLL(path) if path else None
        except OSError:
            self._sqlite = None

    def read(self):
        """Return the figures (see the module docstring); ``tracemalloc`` only while it traces."""
        figures = _proc_status()
        figures["open_files"] = len(os.listdir("/proc/self/fd"))
        figures["python_blocks"] = sys.getallocatedblocks()
        figures["gc_objects"] = len(gc.get_objects())
        figures["database"] = self._backend
        sqlite = _sqlite_status(self._sqlite) if self._sqlite is not None else None
        figures["sqlite"] = dict(sqlite or {}, cache_kib_per_connection=self._cache_kib) if sqlite else None
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            top = tracemalloc.take_snapshot().statistics("lineno")[:TOP_SITES]
            figures["tracemalloc"] = {
                "current_bytes": current, "peak_bytes": peak,
                "top": [{"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "bytes": s.size,
                         "blocks": s.count} for s in top],
            }
        return figures
