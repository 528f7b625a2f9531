"""Benchmark of the HTTP transport alone: the server's CPU per request, with a trivial answer.

Not a test, and not part of ``make bench``: a measure of ``server``, ``pool`` and
``wire`` apart from the signature check and the store, which dwarf them in
``webhook_bench.py``. It starts a ``server.Server`` in this process whose Gate answers
``GET /health`` (sent with a webhook's headers), drives it from a client in another
process over ``CONNS`` keep-alive connections, ``PER`` requests each, and prints the
requests per second and this process's CPU (user + system) per request::

    .venv/bin/python bench/transport_bench.py
    CONNS=8 PER=2000 MAX_CONNECTIONS=32 BURN_ITERATIONS=15000 .venv/bin/python bench/transport_bench.py

``BURN_ITERATIONS`` makes each answer first spin a pure-Python loop that holds the GIL
(15000 iterations: about 1 ms on the machine of docs/benchmarks.md), a stand-in for the
verification, to see the transport under the GIL contention of the real service.
"""

import os
import resource
import subprocess
import sys
import time
from http import HTTPStatus
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stark_challenge.gate import Gate  # noqa: E402
from stark_challenge.server import Server  # noqa: E402

CONNS = int(os.environ.get("CONNS", "8"))  # the load generator's connections in webhook_bench.py
PER = int(os.environ.get("PER", "2000"))
MAX_CONNECTIONS = int(os.environ.get("MAX_CONNECTIONS", "32"))
BURN_ITERATIONS = int(os.environ.get("BURN_ITERATIONS", "0"))

CLIENT = r'''
import http.client, sys, threading
port, conns, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
headers = {"Authorization": "Basic c3Rhcms6c2VjcmV0", "Content-Type": "application/json",
           "Digital-Signature": "MEUCIQDfbb7NiA0zJrY4WAtGoF6Yl6/d1RHbqmNdy4ZYDPXS1QIgU0F8vNTf6e3pe9BuYgUK2yUy"}
def run():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(per):
        conn.request("GET", "/health", headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
threads = [threading.Thread(target=run) for _ in range(conns)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
'''


def health():
    x = 0
    for i in range(BURN_ITERATIONS):
        x += i * i
    return HTTPStatus.OK, {"status": "ok"}


def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    # No credentials: /health needs none.
    config = SimpleNamespace(webhook_username="", webhook_password="", operator_username="", operator_password="")
    gate = Gate(None, None, config, None, health=health)
    server = Server(("127.0.0.1", 0), gate, max_connections=MAX_CONNECTIONS).start()
    try:
        cpu0, wall0 = cpu_s(), time.monotonic()
        subprocess.run([sys.executable, "-c", CLIENT, str(server.port), str(CONNS), str(PER)], check=True)
        cpu1, wall1 = cpu_s(), time.monotonic()
    finally:
        server.stop()
    n = CONNS * PER
    print(f"{n} requests, {n / (wall1 - wall0):.0f}/s, server CPU {(cpu1 - cpu0) * 1e6 / n:.1f} us per request "
          f"(MAX_CONNECTIONS={MAX_CONNECTIONS}, BURN_ITERATIONS={BURN_ITERATIONS})")


if __name__ == "__main__":
    main()
