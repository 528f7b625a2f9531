"""What one emulator costs a test: start and stop, and the CPU of a burst of API work.

Not a test: a measurement for comparing two versions of the emulator (run it with each on
PYTHONPATH). It makes one set of certificates (as the suite does), starts and stops 20
emulators, then creates 500 invoices (all paid at once) and 200 transfers through the SDK
and waits for the emulator to be idle, counting this process's CPU (SDK and emulator
threads together). Loopback only; a few seconds.

    .venv/bin/python bench/emulator_cost.py
"""

import os
import resource
import tempfile
import time

import starkbank

from stark_challenge.emulator import Emulator
from stark_challenge.emulator.certs import make_certificates

STARTS = 20


def _cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main():
    certificates = make_certificates(tempfile.mkdtemp(prefix="emulator-cost-"))
    started, cpu = time.monotonic(), _cpu_s()
    for _ in range(STARTS):
        Emulator(certificates=certificates, pay_ratio=0.0).start().stop()
    start_ms, start_cpu_ms = ((time.monotonic() - started) / STARTS * 1e3, (_cpu_s() - cpu) / STARTS * 1e3)
    emulator = Emulator(certificates=certificates, pay_ratio=1.0, pay_delay_s=0.0, transfer_delay_s=0.0).start()
    try:
        project_id, private_key = emulator.create_project()
        os.environ.update({k: v for k, v in emulator.env(project_id, private_key).items() if not k.startswith("STARK_")})
        starkbank.user = starkbank.Project(environment="sandbox", id=project_id, private_key=private_key)
        payer = dict(tax_id="012.345.678-90", name="Arya Stark")
        receiver = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183",
                        branch_code="0001", account_number="6341320293482496", account_type="payment")
        starkbank.invoice.create([starkbank.Invoice(amount=1000, **payer)])  # connection and imports
        cpu = _cpu_s()
        for batch in range(10):
            starkbank.invoice.create([starkbank.Invoice(amount=1000, **payer) for _ in range(50)])
            starkbank.transfer.create([starkbank.Transfer(amount=10, external_id="cost-%d-%d" % (batch, n), **receiver)
                                       for n in range(20)])
        while not emulator.idle():
            time.sleep(0.01)
        work_cpu_ms = (_cpu_s() - cpu) * 1e3
    finally:
        emulator.stop()
    print("emulator start+stop: %.1f ms wall, %.1f ms CPU; 500 invoices paid and 200 transfers: %.0f ms CPU"
          % (start_ms, start_cpu_ms, work_cpu_ms))


if __name__ == "__main__":
    main()
