"""The last audit records the cluster's nodes published on MQTT, for the page.

Subscribes to the broker cluster.yaml names, as `kmctl events` does, so the records keep coming
while nodes are down; when the broker cannot be reached the page says so and the feed retries.
Payloads come from the network: each is shown as text, cut to a bounded length, and the page
puts it in the document as text only.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt

from kmnode.host.broker import BrokerAddress
from kmnode.host.mqtt import TopicKind, parse_topic, topic_filter, unpack_records
from kmnode.host.mqtt_client import mqtt_client

#: Records kept (the newest), and the length each is cut to.
KEEP = 20
SUMMARY_CHARS = 300
#: A message larger than this is not unpacked, only noted (no audit record comes near it).
MAX_PAYLOAD_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 5.0
RETRY_S = 2.0


@dataclass(frozen=True)
class AuditRecord:
    #: When the dashboard received it (UTC, HH:MM:SS).
    time: str
    node: str
    #: The record as compact JSON (or text), at most ``SUMMARY_CHARS`` characters.
    summary: str
    #: Its ``status`` field ("provisioned", "refused", ...), which the page colours by.
    status: str | None


@dataclass(frozen=True)
class AuditState:
    broker: str
    connected: bool
    #: Why the broker cannot be reached (None while connected).
    error: str | None
    #: Newest first.
    records: list[AuditRecord] = field(default_factory=list)


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def to_record(node: str, payload: bytes, now: datetime) -> AuditRecord:
    """One record as the page shows it."""
    stamp = now.strftime("%H:%M:%S")
    text = payload.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return AuditRecord(stamp, node, _cut(text), None)
    status = data.get("status") if isinstance(data, dict) else None
    summary = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return AuditRecord(
        stamp, node, _cut(summary), _cut(status) if isinstance(status, str) else None
    )


class AuditFeed:
    """Subscribes to ``{prefix}/{cluster}/+/audit`` and keeps the newest ``keep`` records."""

    def __init__(self, address: BrokerAddress, prefix: str, cluster: str, keep: int = KEEP) -> None:
        self.address, self.prefix, self.cluster = address, prefix, cluster
        self.records: deque[AuditRecord] = deque(maxlen=keep)
        self.connected = False
        self.error: str | None = "connecting"

    @property
    def where(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def state(self) -> AuditState:
        return AuditState(self.where, self.connected, self.error, list(reversed(self.records)))

    def take(self, topic: str, payload: bytes, now: datetime) -> None:
        """One message: every record of a coalesced one (``unpack_records``), in order."""
        parsed = parse_topic(topic, self.prefix, self.cluster)
        if parsed is None or parsed[1] is not TopicKind.AUDIT:
            return
        node = _cut(parsed[0])
        if len(payload) > MAX_PAYLOAD_BYTES:
            note = f"<{len(payload)} bytes, not shown>"
            self.records.append(AuditRecord(now.strftime("%H:%M:%S"), node, note, None))
            return
        for part in unpack_records(payload):
            self.records.append(to_record(node, part, now))

    async def run(self) -> None:
        """Until cancelled: subscribe, take every message, and after a broker failure say why
        and retry every ``RETRY_S`` seconds."""
        topic = topic_filter(self.prefix, self.cluster, TopicKind.AUDIT)
        while True:
            client = mqtt_client(
                self.address, f"kmctl-dashboard-{secrets.token_hex(4)}", timeout=CONNECT_TIMEOUT_S
            )
            try:
                async with client:
                    await client.subscribe(topic, qos=0)
                    self.connected, self.error = True, None
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes | bytearray) else b""
                        self.take(str(message.topic), bytes(data), datetime.now(UTC))
                self.error = f"the MQTT broker at {self.where} closed the connection"
            except aiomqtt.MqttError as exc:
                self.error = f"cannot reach the MQTT broker at {self.where}: {exc}"
            self.connected = False
            await asyncio.sleep(RETRY_S)
