"""Everything the cluster publishes on MQTT during a chaos run, kept for the plaintext scan.

A background thread with its own event loop subscribes to all of the cluster's topics before
the run starts (``start`` returns once the subscription is acknowledged) and keeps every
payload until ``stop``.
"""

from __future__ import annotations

import asyncio
import secrets
import threading

import aiomqtt

from kmnode.config import ClusterConfig
from kmnode.host.broker import BrokerAddress, broker_address
from kmnode.host.mqtt import TopicKind, topic_filter
from kmnode.host.mqtt_client import mqtt_client

_CONNECT_TIMEOUT = 5.0


class CaptureError(Exception):
    """The capture could not subscribe, or lost the broker during the run."""


class MqttCapture:
    def __init__(self, address: BrokerAddress, filters: list[str]) -> None:
        self.address, self.filters = address, filters
        self.messages: list[tuple[str, bytes]] = []
        self.error: str | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, name="mqtt-capture", daemon=True)

    @classmethod
    def for_cluster(cls, cfg: ClusterConfig) -> MqttCapture:
        """Every topic the cluster's nodes publish on, at the broker cluster.yaml names."""
        prefix = cfg.mqtt.topic_prefix
        filters = [topic_filter(prefix, cfg.cluster, kind) for kind in TopicKind]
        return cls(broker_address(cfg.mqtt), filters)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            self.stop()
            where = f"{self.address.host}:{self.address.port}"
            raise CaptureError(f"cannot subscribe at the MQTT broker {where}: {self.error}")

    def stop(self, timeout: float = 10.0) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)

    def haystacks(self) -> list[tuple[str, bytes]]:
        return [(f"mqtt:{topic}#{i}", payload) for i, (topic, payload) in enumerate(self.messages)]

    def _main(self) -> None:
        asyncio.run(self._capture())

    async def _capture(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        client = mqtt_client(
            self.address, f"kmctl-chaos-capture-{secrets.token_hex(4)}", timeout=_CONNECT_TIMEOUT
        )
        try:
            async with client:
                for topic in self.filters:
                    await client.subscribe(topic, qos=1)
                self._ready.set()
                async for message in client.messages:
                    payload = message.payload
                    body = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                    if isinstance(payload, str):
                        body = payload.encode()
                    self.messages.append((str(message.topic), body))
        except asyncio.CancelledError:
            return
        except aiomqtt.MqttError as exc:
            self.error = str(exc)
        finally:
            self._ready.set()
