"""Injected faults the host process itself carries out: the service ring stall.

The link rules (drops, delays, duplicates of peer messages) act where the peer transport runs,
and the service enclave crash where the service enclave's parent runs: both in the KM enclave
process (``kmnode.linkfaults``, ``kmnode.km.service_link``); the chaos API reaches them through
the circuit.
"""

from __future__ import annotations

import asyncio


class RingStall:
    """A switch that stops the host draining the service ring (the consumer stalls, so the
    service enclave's writes must block or fail once the ring is full).

    The drain loop awaits :meth:`wait_running` before each batch; ``stalled`` is the state.
    """

    def __init__(self) -> None:
        self._running = asyncio.Event()
        self._running.set()
        self.stalls = 0

    @property
    def stalled(self) -> bool:
        return not self._running.is_set()

    def set(self, stalled: bool) -> None:
        if stalled and not self.stalled:
            self.stalls += 1
            self._running.clear()
        elif not stalled:
            self._running.set()

    async def wait_running(self) -> None:
        """Return at once unless stalled; else when the stall is lifted."""
        await self._running.wait()
