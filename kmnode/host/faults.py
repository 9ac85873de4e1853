"""Injected faults the host process itself carries out: the service ring stall, the service pid.

The link rules (drops, delays, duplicates of peer messages) act where the peer transport runs,
in the KM enclave process: see ``kmnode.linkfaults``; the chaos API reaches them through the
circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


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


class _HasPid(Protocol):
    @property
    def running(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...


def service_pid(link: _HasPid) -> Callable[[], int | None]:
    """The accessor the chaos API needs: the service enclave child's pid while it runs."""

    def current() -> int | None:
        return link.pid if link.running else None

    return current


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_after_name = text[text.rindex(")") + 2 :].split()
    return int(fields_after_name[1])


def kill_child(pid: int) -> bool:
    """SIGKILL ``pid`` if it is a child of this process (never anything else); True if sent.

    The parent check is what makes a stale pid harmless: a recycled pid would not be our child.
    """
    if parent_of(pid) != os.getpid():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False
