"""Hostile clients for the webhook benchmark: slow, silent, huge-head and malformed, at once.

Not a test and not part of the service. ``webhook_bench.py`` runs it as a separate
process while genuine signed webhooks are offered by ``loadgen.py``::

    python bench/hostile.py JOB.json > RESULT.json

``JOB.json``: ``host``, ``port`` (loopback only), ``duration_s``, and how many clients
of each kind (``slow``, ``silent``, ``huge``, ``flood``, ``malformed``). Every client
reconnects as soon as it is cut, until ``duration_s`` is over:

- ``slow``: sends a request head one byte every ``SLOW_PACE_S`` (a slowloris);
- ``silent``: connects and sends nothing;
- ``huge``: sends a head of just under 16 KiB (the largest allowed) and never ends it;
- ``flood``: sends 98 headers of 65 KB (6.3 MB), as first tried against the service;
- ``malformed``: every ``MALFORMED_PACE_S``, one request with a Unicode-digit
  Content-Length, both Content-Length and Transfer-Encoding, or two Content-Lengths,
  each followed by a smuggled second request.

The result on stdout is JSON, per kind: ``connections`` made, ``answers`` by status
line (``none`` when cut without an answer), and ``held_s``: the median and maximum
seconds a connection stayed open. One thread per client; standard library only.
"""

import json
import socket
import statistics
import sys
import threading
import time

SLOW_PACE_S = 0.5
MALFORMED_PACE_S = 0.05
SMUGGLED = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
MALFORMED = (
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n{}" + SMUGGLED,
    b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello" + SMUGGLED,
)
_LINE = b"X-Big: " + b"a" * 250 + b"\r\n"
HUGE = b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + _LINE * (16 * 1024 // len(_LINE) - 1)
FLOOD = b"GET /health HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 65000 + b"\r\n") * 98


def _read_until_closed(sock, end):
    """Return what the server sent until it closed the connection (or ``end`` passed)."""
    received = b""
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return received


def _status(received):
    line = received.split(b"\r\n", 1)[0]
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/1.") and b" " in line else "none"


def _slow(sock, end, n):
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 2000
    sock.settimeout(SLOW_PACE_S)
    for i in range(len(head)):
        if time.monotonic() >= end:
            return b""
        try:
            sock.send(head[i:i + 1])
            received = sock.recv(4096)
            return received  # an answer, or b"" when cut
        except socket.timeout:
            continue
        except OSError:
            return b""
    return b""


def _silent(sock, end, n):
    return _read_until_closed(sock, end)


def _huge(sock, end, n):
    sock.sendall(HUGE)
    return _read_until_closed(sock, end)


def _flood(sock, end, n):
    try:
        sock.sendall(FLOOD)
    except OSError:  # cut while sending: read what was answered first
        pass
    return _read_until_closed(sock, end)


def _malformed(sock, end, n):
    sock.sendall(MALFORMED[n % len(MALFORMED)])
    received = _read_until_closed(sock, end)
    time.sleep(MALFORMED_PACE_S)  # the client's own pace, not a wait for the server
    return received


KINDS = {"slow": _slow, "silent": _silent, "huge": _huge, "flood": _flood, "malformed": _malformed}


def run(job):
    """Run every client until ``duration_s`` is over; return the result dict."""
    end = time.monotonic() + float(job["duration_s"])
    tally = {kind: {"connections": 0, "answers": {}, "held": []} for kind in KINDS}
    lock = threading.Lock()

    def client(kind):
        attack = KINDS[kind]
        n = 0
        while time.monotonic() < end:
            opened = time.monotonic()
            try:
                with socket.create_connection((job["host"], job["port"]), timeout=1.0) as sock:
                    received = attack(sock, end, n)
            except OSError:
                received = b""
            n += 1
            with lock:
                t = tally[kind]
                t["connections"] += 1
                status = _status(received)
                t["answers"][status] = t["answers"].get(status, 0) + 1
                t["held"].append(time.monotonic() - opened)

    threads = [threading.Thread(target=client, args=(kind,), daemon=True)
               for kind in KINDS for _ in range(int(job.get(kind, 0)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(float(job["duration_s"]) + 30)
    for t in tally.values():
        held = t.pop("held")
        t["held_s"] = {"median": round(statistics.median(held), 3) if held else None,
                       "max": round(max(held), 3) if held else None}
    return tally


def main(argv):
    if len(argv) != 2:
        print("usage: hostile.py JOB.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    if job["host"] != "127.0.0.1":
        print("hostile.py attacks 127.0.0.1 only", file=sys.stderr)
        return 2
    json.dump(run(job), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
