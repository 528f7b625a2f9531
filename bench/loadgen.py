"""Load generator for the webhook benchmark: sends prepared requests and times each answer.

Not a test and not part of the service. ``webhook_bench.py`` runs it as a separate
process (so its own CPU and GIL never count against the service), one run per phase::

    python bench/loadgen.py JOB.json > RESULT.json

``JOB.json`` says where and how to send:

- ``host``, ``port``, ``path``: the service's webhook (plain HTTP on loopback);
- ``requests``: path of a JSON-lines file, one ``{"body": str, "headers": {...}}`` a line,
  each sent once, in order;
- ``connections``: how many HTTP/1.1 keep-alive connections (one thread each);
- ``mode``: ``closed`` sends as fast as the answers come back (saturation), ``rate``
  offers ``rate`` requests a second on a fixed schedule (open loop: a request is
  due at ``start + i / rate`` whatever happened to the others, and its latency counts
  from that moment, so a stalled server cannot hide its queue);
- ``duration_s``: stop sending after this long, even if requests are left;
- ``fresh`` (optional): a new connection for every request, as a webhook sender that
  does not keep connections alive would.

The result on stdout is JSON: ``wall0`` (``time.time()`` at ``perf0``) so that times can
be compared with other processes' clocks, ``started`` and ``finished`` (perf seconds),
and ``results``: one ``[index, due, done, status, stored]`` per request sent, where
``due`` is when it was due (``rate``) or sent (``closed``), ``done`` when its answer was
read in full, ``status`` the HTTP status (0 for a connection error) and ``stored``
whether the answer said the event was newly stored.

Threads: one per connection; in ``rate`` mode one more hands out due requests. Only
the standard library, so it runs under any python3.
"""

import http.client
import itertools
import json
import queue
import sys
import threading
import time

__all__ = ["run"]

TIMEOUT_S = 10.0  # a request unanswered this long counts as an error (status 0)


def _send(conn_box, job, request):
    """Send one request on the box's connection (reconnecting once); return (status, body bytes)."""
    for attempt in (1, 2):
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection(job["host"], job["port"], timeout=TIMEOUT_S)
        conn = conn_box[0]
        try:
            conn.request("POST", job["path"], body=request["body"].encode(), headers=request["headers"])
            response = conn.getresponse()
            body = response.read()
            if response.will_close or job.get("fresh"):
                conn.close()
                conn_box[0] = None
            return response.status, body
        except (OSError, http.client.HTTPException):
            conn.close()
            conn_box[0] = None
            if attempt == 2:
                return 0, b""
    return 0, b""


def _record(results, index, due, status, body):
    results.append((index, due, time.perf_counter(), status, status == 200 and b'"stored"' in body))


def _closed(job, requests, deadline):
    results = []
    counter = itertools.count()  # next() on a count is atomic under the GIL

    def worker():
        box = [None]
        while True:
            index = next(counter)
            if index >= len(requests) or time.perf_counter() > deadline:
                break
            sent = time.perf_counter()
            status, body = _send(box, job, requests[index])
            _record(results, index, sent, status, body)
        if box[0] is not None:
            box[0].close()

    _run_threads(worker, job["connections"])
    return results


def _rate(job, requests, deadline, started):
    results = []
    due_queue = queue.Queue()
    rate = float(job["rate"])

    def dispatcher():
        for index in range(len(requests)):
            due = started + index / rate
            if due > deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            due_queue.put((index, due))
        for _ in range(job["connections"]):
            due_queue.put(None)

    def worker():
        box = [None]
        while True:
            item = due_queue.get()
            if item is None:
                break
            index, due = item
            status, body = _send(box, job, requests[index])
            _record(results, index, due, status, body)
        if box[0] is not None:
            box[0].close()

    threading.Thread(target=dispatcher, daemon=True).start()
    _run_threads(worker, job["connections"])
    return results


def _run_threads(target, count):
    threads = [threading.Thread(target=target, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run(job):
    """Run one job (a dict, see the module docstring); return the result dict."""
    with open(job["requests"], encoding="utf-8") as f:
        requests = [json.loads(line) for line in f if line.strip()]
    perf0, wall0 = time.perf_counter(), time.time()
    started = perf0 + 0.01
    deadline = started + float(job.get("duration_s", 3600))
    if job["mode"] == "rate":
        results = _rate(job, requests, deadline, started)
    else:
        results = _closed(job, requests, deadline)
    finished = time.perf_counter()
    return {"wall0": wall0, "perf0": perf0, "started": started, "finished": finished,
            "results": sorted(results)}


def main(argv):
    if len(argv) != 2:
        print("usage: loadgen.py JOB.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    json.dump(run(job), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
