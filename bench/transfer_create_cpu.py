"""CPU the calling thread spends per transfer in ``bank.create_transfers``: one per call, then 100 per call.

Not a test: a measurement for comparing two versions of ``bank`` (run it from each checkout).
It starts the Stark Bank emulator in this process (its own threads, not counted: the figure
is ``time.thread_time`` of the calling thread, as the worker thread would spend it), creates
a project, and sends 40 single transfers, then 6 batches of 100, with the real SDK through
the emulator's proxy. About five seconds; loopback only.

    .venv/bin/python bench/transfer_create_cpu.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from stark_challenge.bank import Bank  # noqa: E402
from stark_challenge.emulator import Emulator  # noqa: E402
from support import sdk_config  # noqa: E402

SINGLES = 40
BATCHES = 6


def main():
    emulator = Emulator(pay_ratio=0.0, transfer_delay_s=3600, seed=7).start()
    try:
        project_id, private_key = emulator.create_project()
        for name, value in emulator.env(project_id, private_key).items():
            if not name.startswith("STARK_"):
                os.environ[name] = value
        bank = Bank(sdk_config({"project_id": project_id, "private_key": private_key}))
        bank.configure()
        numbers = iter(range(1, 10**6))

        def items(count):
            return [(1000 + n, f"cpu-{n}", ["cpu", f"invoice-{n}", f"cpu-{n}"]) for n in
                    (next(numbers) for _ in range(count))]

        bank.create_transfers(items(5))  # first connection, imports
        started = time.thread_time()
        for _ in range(SINGLES):
            bank.create_transfers(items(1))
        single_ms = (time.thread_time() - started) / SINGLES * 1e3
        started = time.thread_time()
        for _ in range(BATCHES):
            bank.create_transfers(items(100))
        batch_ms = (time.thread_time() - started) / (BATCHES * 100) * 1e3
        print(f"create_transfers, CPU of the calling thread per transfer: one per call {single_ms:.2f} ms,"
              f" 100 per call {batch_ms:.3f} ms")
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()
