"""Helpers shared by the MQTT tests: free ports, a broker the test controls, a subscriber.

Everything binds 127.0.0.1 only, and every wait is bounded so a broken broker fails a test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import aiomqtt

from kmnode.host.broker import start_embedded_broker, stop_broker


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


class BrokerUnderTest:
    """The embedded broker on a fixed port, which a test can start, kill and restart."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        self.proc = start_embedded_broker(self.port, self.log_path)

    def kill(self) -> None:
        """SIGKILL: no clean disconnect, as when the broker's machine dies."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_broker(self.proc)


class Subscriber:
    """An aiomqtt client that records (topic, payload) of everything matching its filters."""

    def __init__(self, port: int, *filters: str) -> None:
        self.client = aiomqtt.Client("127.0.0.1", port, timeout=10)
        self.filters = filters
        self.messages: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self.client.__aenter__()
        for topic in self.filters:
            await self.client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            self.messages.append((str(message.topic), bytes(payload)))

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        await eventually(
            lambda: len(self.messages) >= count,
            f"{count} messages (got {len(self.messages)})",
            timeout,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.__aexit__(exc_type, exc, tb)
