"""Publishing a node's events, service output and audit records on MQTT.

MQTT is never on the consensus path: a node must commit and release keys while the broker is
down, slow, or restarting. So `EventPublisher.publish` only appends to a bounded in-memory
buffer and returns; a background task owns the connection, reconnects with capped exponential
backoff, and drains the buffer with QoS 1. When the buffer is full the *oldest* message is
dropped and counted: a recent event is worth more to an operator than a stale one, and the
count tells them how much they missed.

Delivery is at least once: the message in flight when a connection breaks is sent again on the
next connection, so a subscriber may see it twice, never out of order.

Records (`EventPublisher.publish_record`, used for the per-release audit records) may be
coalesced: consecutive records for one topic that are waiting together leave as one message
``{"records": [record, ...]}`` (`BATCH_FIELD`), and a lone record waits up to ``record_linger``
seconds for company first. Under load this turns hundreds of messages a second, each costing
the node a socket write and the broker a full PUBLISH/PUBACK exchange, into a few; a record
that leaves alone is sent exactly as `publish` would send it. `unpack_records` gives the
records back; `kmctl events` uses it, so operators still see one record per line.

Payload bodies are never logged; only topics, sizes and counts are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple

import aiomqtt

from kmnode.config import ClusterConfig
from kmnode.host.broker import BrokerAddress, broker_address
from kmnode.host.mqtt_client import mqtt_client

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 10_000
#: Far below MQTT's 256 MB limit: events and audit records are small, and a huge message would
#: hold up every event behind it on the single ordered connection.
DEFAULT_MAX_PAYLOAD = 256 * 1024
#: Ten thousand messages of the maximum size would be 2.5 GB: the byte bound keeps a long broker
#: outage from costing the node its memory, whatever the message sizes.
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
#: The key of a coalesced message: ``{"records": [...]}``, a JSON object with only this key.
BATCH_FIELD = "records"
#: How long a lone record waits for others to share its message. Records are audit trail, off
#: the release path: a few milliseconds of delay cost nobody anything, and under load they let
#: one message carry every record a node produced in that time.
DEFAULT_RECORD_LINGER = 0.005
#: At most this many records in one message (and never more than ``max_payload`` bytes).
MAX_BATCH_RECORDS = 512


class TopicKind(StrEnum):
    """What a node publishes; the value is the topic suffix after ``{prefix}/{cluster}/{node}``."""

    EVENTS = "events"
    SERVICE = "service/out"
    AUDIT = "audit"


#: Parties with topics of their own (``EventPublisher.publish_party``).
PartyKind = Literal["users", "owners"]


def _check_level(what: str, value: str) -> None:
    if not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level")


def topic_for(prefix: str, cluster: str, node: str, kind: TopicKind) -> str:
    """``{prefix}/{cluster}/{node}/events`` (or ``service/out``, ``audit``)."""
    for what, value in (("topic prefix", prefix), ("cluster", cluster), ("node", node)):
        _check_level(what, value)
    return f"{prefix}/{cluster}/{node}/{kind.value}"


def topic_filter(prefix: str, cluster: str, kind: TopicKind, node: str | None = None) -> str:
    """A subscription filter for one kind, from one node or (``node=None``) every node."""
    if node is not None:
        return topic_for(prefix, cluster, node, kind)
    _check_level("topic prefix", prefix)
    _check_level("cluster", cluster)
    return f"{prefix}/{cluster}/+/{kind.value}"


def parse_topic(topic: str, prefix: str, cluster: str) -> tuple[str, TopicKind] | None:
    """``(node, kind)`` of one of this cluster's topics, or None for anything else."""
    head = f"{prefix}/{cluster}/"
    if not topic.startswith(head):
        return None
    node, _, suffix = topic[len(head) :].partition("/")
    try:
        kind = TopicKind(suffix)
    except ValueError:
        return None
    return (node, kind) if node else None


@dataclass(frozen=True)
class PublisherStats:
    """Counters since the publisher was created.

    ``published``: messages the broker acknowledged (PUBACK), counting each record of a
    coalesced message (`publish_record`) as one. ``dropped``: oldest messages
    discarded because the buffer was full (by count or by bytes). ``reconnects``: connections
    made after the first one. ``connect_failures``: connection attempts that failed.
    ``buffered``: messages waiting, including one in flight. ``connected``: whether a broker
    connection is up now.
    """

    published: int
    dropped: int
    reconnects: int
    connect_failures: int
    buffered: int
    connected: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Outgoing(NamedTuple):
    topic: str
    payload: bytes
    #: A JSON object published with `publish_record`: may share a message with its neighbours.
    record: bool = False


def unpack_records(payload: bytes) -> list[bytes]:
    """The records one message carries: each record of a coalesced ``{"records": [...]}``
    message, re-encoded exactly as it would have been published alone (compact JSON, keys in
    their original order), or else the payload itself, unchanged."""
    if b'"' + BATCH_FIELD.encode() + b'"' not in payload:
        return [payload]
    try:
        data = json.loads(payload)
    except ValueError:
        return [payload]
    records = data.get(BATCH_FIELD) if isinstance(data, dict) and len(data) == 1 else None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return [payload]
    return [json.dumps(r, separators=(",", ":")).encode("utf-8") for r in records]


class EventPublisher:
    """A node's MQTT publisher: `publish` never blocks or fails on broker trouble.

    Not thread-safe: call `publish` from the event loop's thread (from another thread, use
    ``loop.call_soon_threadsafe(publisher.publish, ...)``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cluster: str,
        node: str,
        prefix: str = "kmsim",
        tls: bool = False,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        client_id: str | None = None,
        record_linger: float = DEFAULT_RECORD_LINGER,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, not {buffer_size}")
        if not 1 <= max_payload <= buffer_bytes:
            raise ValueError(f"max_payload must be from 1 to buffer_bytes, not {max_payload}")
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError("backoff must satisfy 0 < initial_backoff <= max_backoff")
        self._topics = {kind: topic_for(prefix, cluster, node, kind) for kind in TopicKind}
        self._cluster_topic = f"{prefix}/{cluster}"
        self._host = host
        self._port = port
        self._tls = tls
        self._buffer_size = buffer_size
        self._buffer_bytes = buffer_bytes
        self._max_payload = max_payload
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._publish_timeout = publish_timeout
        self._record_linger = record_linger
        # A coalesced message adds `{"records":[` `]}` and a comma per record to the records.
        self._batch_overhead = len(BATCH_FIELD) + 7
        # Random suffix: two publishers with one id would keep kicking each other off the broker.
        self._client_id = client_id or f"kmsim-{cluster}-{node}-{secrets.token_hex(4)}"

        self._buffer: deque[_Outgoing] = deque()
        self._bytes = 0  # payload bytes in _buffer (not counting the message in flight)
        #: The records of the message waiting for its PUBACK (one, or a coalesced batch).
        self._inflight: list[_Outgoing] = []
        self._has_items = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._published = 0
        self._dropped = 0
        self._reconnects = 0
        self._connect_failures = 0
        self._connected = False
        self._ever_connected = False
        self._warned_full = False

    @classmethod
    def from_config(cls, config: ClusterConfig, node: str, **kwargs: Any) -> EventPublisher:
        """The publisher of ``node``, on the broker and topic prefix cluster.yaml names."""
        config.node(node)  # a KeyError naming the known nodes beats publishing to a typo
        address = broker_address(config.mqtt)
        return cls(
            address.host,
            address.port,
            cluster=config.cluster,
            node=node,
            prefix=config.mqtt.topic_prefix,
            tls=address.tls,
            **kwargs,
        )

    def topic(self, kind: TopicKind) -> str:
        return self._topics[kind]

    def publish(self, topic_suffix: TopicKind | str, payload: dict[str, Any] | bytes) -> None:
        """Queue one message and return at once; raise ValueError only for a caller's mistake.

        A dict is sent as compact JSON. An unknown topic suffix, a payload that is not JSON
        serialisable, or one larger than ``max_payload`` bytes is refused here, with nothing
        queued or counted, because no retry could ever deliver it.
        """
        self._enqueue(self._resolve(topic_suffix), payload, record=False)

    def publish_record(self, topic_suffix: TopicKind | str, record: dict[str, Any]) -> None:
        """Like `publish` for one JSON object that may share a message with other records of
        the same topic (``{"records": [...]}``, see `unpack_records`): for high-rate records
        such as audit records, where a message per record is what costs."""
        if not isinstance(record, dict):
            raise ValueError(f"a record must be a dict, not {type(record).__name__}")
        self._enqueue(self._resolve(topic_suffix), record, record=True)

    def publish_party(
        self, party: PartyKind, name: str, suffix: str, record: dict[str, Any]
    ) -> None:
        """One JSON message for a party rather than a node (issue 15): a data user's results on
        ``{prefix}/{cluster}/users/{user}/results``, the requests an owner is asked to
        approve on ``{prefix}/{cluster}/owners/{owner}/requests``."""
        _check_level(party, name)
        _check_level("suffix", suffix)
        self._enqueue(f"{self._cluster_topic}/{party}/{name}/{suffix}", record, record=False)

    def _resolve(self, topic_suffix: TopicKind | str) -> str:
        try:
            return self._topics[TopicKind(topic_suffix)]
        except ValueError:
            known = ", ".join(k.value for k in TopicKind)
            raise ValueError(f"unknown topic suffix {topic_suffix!r}; use one of {known}") from None

    def _enqueue(self, topic: str, payload: dict[str, Any] | bytes, *, record: bool) -> None:
        if isinstance(payload, bytes | bytearray | memoryview):
            body = bytes(payload)
        elif isinstance(payload, dict):
            try:
                text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"payload for {topic} is not JSON: {exc}") from None
            body = text.encode("utf-8")
        else:
            raise ValueError(f"payload must be a dict or bytes, not {type(payload).__name__}")
        if len(body) > self._max_payload:
            raise ValueError(
                f"payload for {topic} is {len(body)} bytes; "
                f"the maximum is {self._max_payload} bytes"
            )
        while not self._fits(len(body)):
            self._bytes -= len(self._buffer.popleft().payload)
            self._dropped += 1
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "MQTT buffer full (%d messages, %d bytes at most): dropping the oldest "
                    "until the broker at %s:%d drains it",
                    self._buffer_size,
                    self._buffer_bytes,
                    self._host,
                    self._port,
                )
        self._buffer.append(_Outgoing(topic, body, record))
        self._bytes += len(body)
        self._idle.clear()
        self._has_items.set()

    def _fits(self, size: int) -> bool:
        return len(self._buffer) < self._buffer_size and self._bytes + size <= self._buffer_bytes

    def stats(self) -> PublisherStats:
        return PublisherStats(
            published=self._published,
            dropped=self._dropped,
            reconnects=self._reconnects,
            connect_failures=self._connect_failures,
            buffered=len(self._buffer) + len(self._inflight),
            connected=self._connected,
        )

    def start(self) -> None:
        """Start the background connection; messages published before are sent first."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"mqtt-publisher {self._client_id}"
        )

    async def stop(self, timeout: float = 2.0) -> None:
        """Send what can be sent within ``timeout`` seconds, then close the connection.

        A connection still being (re)established gets the same chance, so a broker that is
        down costs the full ``timeout``. Whatever is left stays buffered (a later `start`
        sends it). The background task is always finished when this returns, even if the
        broker hangs.
        """
        task, self._task = self._task, None
        if task is None:
            return
        try:
            if not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout)
        finally:
            task.cancel()
            # The cancelled task disconnects cleanly; a broker that never answers the
            # DISCONNECT gets a second cancel rather than holding the caller up.
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT publisher task failed", exc_info=task.exception())

    async def __aenter__(self) -> EventPublisher:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._initial_backoff
        outage_logged = False
        while True:
            connected_at: float | None = None
            try:
                async with self._client() as client:
                    self._on_connected()
                    connected_at = loop.time()
                    outage_logged = False
                    await self._serve(client)
            except Exception as exc:
                # MqttError is the broker's trouble; anything else is a bug here, but events
                # are not worth a node: log it loudly and keep trying.
                if not isinstance(exc, aiomqtt.MqttError):
                    log.exception("MQTT publisher error; reconnecting")
                if self._connected:
                    log.warning("MQTT connection to %s:%d lost: %s", self._host, self._port, exc)
                else:
                    self._connect_failures += 1
                    level = logging.DEBUG if outage_logged else logging.WARNING
                    log.log(
                        level,
                        "MQTT broker %s:%d unreachable: %s (retrying)",
                        self._host,
                        self._port,
                        exc,
                    )
                outage_logged = True
            finally:
                self._connected = False
                self._requeue_inflight()
            # Only a connection that lasted earns a fast retry: a broker that accepts and then
            # drops every connection must not be hammered at the initial backoff.
            if connected_at is not None and loop.time() - connected_at >= self._max_backoff:
                backoff = self._initial_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _client(self) -> aiomqtt.Client:
        address = BrokerAddress(self._host, self._port, self._tls)
        return mqtt_client(address, self._client_id, timeout=self._connect_timeout, keepalive=30)

    def _on_connected(self) -> None:
        self._connected = True
        if self._ever_connected:
            self._reconnects += 1
        self._ever_connected = True
        log.info(
            "MQTT connected to %s:%d as %s (%d buffered)",
            self._host,
            self._port,
            self._client_id,
            len(self._buffer),
        )

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Drain until the connection breaks; raise MqttError when it does.

        A publish waiting for its PUBACK is not woken by a dropped connection, so a watcher
        on the client's message stream (which ends on disconnection) races the drain.
        """
        watch = asyncio.create_task(self._watch(client))
        drain = asyncio.create_task(self._drain(client))
        try:
            done, _ = await asyncio.wait({watch, drain}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, drain):
                task.cancel()
            await asyncio.gather(watch, drain, return_exceptions=True)
        for task in done:
            task.result()
        raise aiomqtt.MqttError("MQTT connection ended")

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            pass  # nothing is subscribed; the loop only ends (with MqttError) on disconnection

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            while not self._buffer:
                self._warned_full = False
                self._idle.set()
                self._has_items.clear()
                await self._has_items.wait()
            head = self._buffer[0]
            if head.record and len(self._buffer) == 1 and self._record_linger > 0:
                # A lone record: give the records produced meanwhile a chance to share its
                # message. Whatever else arrives is sent after it, in order, as usual.
                await asyncio.sleep(self._record_linger)
            items = self._take_message()
            self._inflight = items
            for item in items:
                self._bytes -= len(item.payload)
            if len(items) == 1:
                payload = items[0].payload
            else:
                joined = b",".join(i.payload for i in items)
                payload = b'{"%s":[%s]}' % (BATCH_FIELD.encode(), joined)
            await client.publish(head.topic, payload, qos=1, timeout=self._publish_timeout)
            self._inflight = []
            self._published += len(items)

    def _take_message(self) -> list[_Outgoing]:
        """Pop the next message's items: the head, and if it is a record, the records of the
        same topic right behind it, within ``MAX_BATCH_RECORDS`` and ``max_payload`` bytes."""
        buffer = self._buffer
        head = buffer.popleft()
        items = [head]
        if not head.record:
            return items
        size = self._batch_overhead + len(head.payload)
        while buffer and len(items) < MAX_BATCH_RECORDS:
            nxt = buffer[0]
            if not nxt.record or nxt.topic != head.topic:
                break
            size += len(nxt.payload) + 1
            if size > self._max_payload:
                break
            items.append(buffer.popleft())
        return items

    def _requeue_inflight(self) -> None:
        """Put the unacknowledged message's items back first, so order survives a reconnect
        (dropping its oldest ones if the buffer filled up meanwhile)."""
        items, self._inflight = self._inflight, []
        for item in reversed(items):
            if self._fits(len(item.payload)):
                self._buffer.appendleft(item)
                self._bytes += len(item.payload)
            else:
                self._dropped += 1
