"""The OCALL variant of the seeds: the TEE hands each record to a host function.

In the switchless variant the TEE writes into the ring itself.  In the OCALL variant the TEE
leaves the enclave (EEXIT), a host function receives the record as its parameter (marshalled
out of enclave memory, i.e. copied), the host writes it into the ring, and control returns
into the enclave (ERESUME).  Here there is no enclave, so the two transitions are modelled by
burning time-stamp-counter cycles with the GIL released; SGX's measured round trip is about
8,000-17,000 cycles per OCALL, and the default sits in the middle of that range.  Setting
`switch_cycles=0` leaves only the marshalling copy and the call, which separates the model's
cost from the mechanics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from kmnode.ring import _ring
from kmnode.ring._ring import Writer

#: Midpoint of the 8,000-17,000 cycles measured for an SGX OCALL round trip.
DEFAULT_SWITCH_CYCLES = 12_500

HostWrite = Callable[[bytes, int], bool]


class _Buffer(Protocol):
    def __buffer__(self, flags: int, /) -> memoryview: ...


class OcallWriter:
    """A TEE-side writer that pays one world switch per record and lets the host write it."""

    def __init__(
        self, host_write: HostWrite, *, switch_cycles: int = DEFAULT_SWITCH_CYCLES
    ) -> None:
        if switch_cycles < 0:
            raise ValueError("switch_cycles must be >= 0")
        self._host_write = host_write
        self.switch_cycles = switch_cycles
        self._exit_cycles = switch_cycles // 2
        self._entry_cycles = switch_cycles - self._exit_cycles
        self.calls = 0

    @classmethod
    def over(
        cls,
        writer: Writer,
        *,
        switch_cycles: int = DEFAULT_SWITCH_CYCLES,
        on_full: int | None = None,
        timeout: float | None = None,
    ) -> OcallWriter:
        """An OcallWriter whose host function appends with `writer` (a host-side Writer)."""

        def host_write(data: bytes, record_type: int) -> bool:
            return writer.write(data, record_type, on_full, timeout)

        return cls(host_write, switch_cycles=switch_cycles)

    def write(self, data: bytes | bytearray | memoryview, type: int = 0) -> bool:
        """One OCALL: exit, marshal the record out, the host writes it, re-enter.

        Returns the host function's answer (False: the host discarded the record).
        """
        _ring.spin_cycles(self._exit_cycles)
        try:
            self.calls += 1
            return self._host_write(bytes(data), type)
        finally:
            _ring.spin_cycles(self._entry_cycles)


def cycles_per_second(sample: float = 0.02) -> float:
    """Measured rate of the cycle counter used by the switch model (TSC ticks per second)."""
    t0 = time.perf_counter_ns()
    c0 = _ring.cycle_counter()
    while time.perf_counter_ns() - t0 < sample * 1e9:
        pass
    c1 = _ring.cycle_counter()
    t1 = time.perf_counter_ns()
    return (c1 - c0) * 1e9 / (t1 - t0)


__all__ = ["DEFAULT_SWITCH_CYCLES", "HostWrite", "OcallWriter", "cycles_per_second"]
