"""A local stand-in for Stark Bank's API that the unmodified `starkbank` SDK can use.

It listens on 127.0.0.1 as an HTTPS proxy (HTTPS_PROXY) for Stark Bank's two API hosts,
with a throwaway CA (REQUESTS_CA_BUNDLE), authenticates requests like Stark Bank,
keeps a balance, invoices, transfers, events, delivery attempts and webhooks in memory,
pays some invoices as the sandbox does, moves transfers to success (or failed, when the
balance cannot cover them), holds scheduled ones until their date, lets invoices go
overdue and expire, reverses paid ones whose amount is lowered, and delivers signed
webhooks, with knobs to inject the failures a real bank produces (redeliveries, errors,
timeouts).

    from stark_challenge.emulator import Emulator

    with Emulator(pay_ratio=1.0, pay_delay_s=0.2, seed=1) as emu:
        os.environ.update(emu.env())  # HTTPS_PROXY, REQUESTS_CA_BUNDLE, STARK_* ...

From a shell: ``python -m stark_challenge.emulator --help`` (it also pays, reverses,
fails transfers, sets the balance and resends events on a running emulator).

It imports nothing from the rest of stark_challenge, so the service and its stand-in
cannot share a bug. It is a test tool: state is in memory and lost on stop.
"""

from .control import Emulator
from .knobs import Knobs

__all__ = ["Emulator", "Knobs"]
