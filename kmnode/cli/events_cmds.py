"""`kmctl events`: watch what the cluster's nodes publish on MQTT.

Subscribes directly to the broker named in cluster.yaml (the embedded one unless ``mqtt.url``
is set), so it works while nodes are down, partitioned or restarting: exactly when an operator
wants to watch. Payloads come from the network and are escaped before reaching a terminal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import click

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError
from kmnode.host.broker import BrokerAddress, broker_address
from kmnode.host.mqtt import TopicKind, parse_topic, topic_filter, unpack_records
from kmnode.host.mqtt_client import mqtt_client

_KINDS: dict[str, tuple[TopicKind, ...]] = {
    "events": (TopicKind.EVENTS,),
    "service": (TopicKind.SERVICE,),
    "audit": (TopicKind.AUDIT,),
    "all": tuple(TopicKind),
}
#: Topics whose records may share a message (``EventPublisher.publish_record``).
_COALESCED = (TopicKind.AUDIT, TopicKind.SERVICE)
_SHORT_NAME = {TopicKind.EVENTS: "events", TopicKind.SERVICE: "service", TopicKind.AUDIT: "audit"}
_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Received:
    time: datetime
    node: str
    kind: TopicKind
    topic: str
    payload: bytes

    def as_json(self) -> dict[str, Any]:
        """``payload`` if the body is JSON, else ``text`` if UTF-8, else ``base64``."""
        out: dict[str, Any] = {
            "time": _iso(self.time),
            "node": self.node,
            "kind": _SHORT_NAME[self.kind],
            "topic": self.topic,
        }
        try:
            text = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            out["base64"] = base64.b64encode(self.payload).decode("ascii")
            return out
        try:
            out["payload"] = json.loads(text)
        except ValueError:
            out["text"] = text
        return out

    def as_line(self) -> str:
        try:
            body = self.payload.decode("utf-8")
        except UnicodeDecodeError:
            body = f"<{len(self.payload)} bytes, hex {binascii.hexlify(self.payload).decode()}>"
        return f"{_iso(self.time)}  {self.node:<10} {_SHORT_NAME[self.kind]:<7} {_escape(body)}"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _escape(text: str) -> str:
    """Show control characters as escapes: a payload must not drive the operator's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _payload_bytes(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode("utf-8")


async def stream_events(
    address: BrokerAddress,
    filters: list[str],
    prefix: str,
    cluster: str,
    emit: Callable[[Received], None],
    *,
    count: int | None,
    silence: float | None,
) -> int:
    """Subscribe and hand each message to ``emit``; return how many were received.

    A node coalesces its audit records and contract results under load (``{"records": [...]}``, see
    `kmnode.host.mqtt.unpack_records`); each record of such a message is emitted and counted
    on its own, exactly as if it had been published alone, so operators and scripts see one
    record per line whatever the load was. Ends after ``count`` messages (records), or after
    ``silence`` seconds without one (None: never).
    Broker trouble becomes a `CliError` with exit code 3, whether at connect time or later.
    """
    where = f"{address.host}:{address.port}"
    client = mqtt_client(address, f"kmctl-events-{secrets.token_hex(4)}", timeout=_CONNECT_TIMEOUT)
    connected = False
    received = 0
    try:
        async with client:
            connected = True
            for topic in filters:
                await client.subscribe(topic, qos=1)
            messages = aiter(client.messages)
            while count is None or received < count:
                try:
                    message = await asyncio.wait_for(anext(messages), silence)
                except TimeoutError:
                    break
                parsed = parse_topic(str(message.topic), prefix, cluster)
                if parsed is None:
                    continue
                node, kind = parsed
                now = datetime.now(UTC)
                payload = _payload_bytes(message)
                parts = unpack_records(payload) if kind in _COALESCED else [payload]
                for part in parts:
                    if count is not None and received >= count:
                        break
                    emit(Received(now, node, kind, str(message.topic), part))
                    received += 1
    except aiomqtt.MqttError as exc:
        if connected:
            raise CliError(f"lost the MQTT broker at {where}: {exc}", EXIT_FAILURE) from None
        raise CliError(f"cannot reach the MQTT broker at {where}: {exc}", EXIT_FAILURE) from None
    return received


@click.command()
@click.option("--node", metavar="NAME", help="Only this node's messages. Default: every node.")
@click.option(
    "--topic",
    type=click.Choice(list(_KINDS)),
    default="all",
    show_default=True,
    help="events, service (service enclave output), audit, or all three.",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until interrupted or --count.")
@click.option("--count", "-n", type=click.IntRange(min=1), help="Exit after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Without --follow: exit after this many seconds without a message.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per line: time, node, kind, topic, and payload (JSON bodies), "
    "text (other UTF-8) or base64.",
)
@pass_context
def events(
    ctx: CliContext,
    node: str | None,
    topic: str,
    follow: bool,
    count: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Print the cluster's events, service output and audit records from MQTT.

    One line per message: receive time (UTC), node, kind, payload. Messages published before
    the command subscribed are not shown (nothing is retained). Exit code 3 if the broker
    cannot be reached.

    \b
    Example: kmctl events --follow --topic audit --json
    Example: kmctl events --node km2 -n 10
    """
    cfg = ctx.config()
    if node is not None:
        try:
            cfg.node(node)
        except KeyError as exc:
            raise CliError(str(exc.args[0]), EXIT_USAGE) from None
    try:
        address = broker_address(cfg.mqtt)
    except ValueError as exc:
        raise CliError(f"mqtt.url: {exc}", EXIT_USAGE) from None
    prefix = cfg.mqtt.topic_prefix
    filters = [topic_filter(prefix, cfg.cluster, kind, node) for kind in _KINDS[topic]]

    def emit(message: Received) -> None:
        click.echo(json.dumps(message.as_json(), sort_keys=True) if as_json else message.as_line())

    try:
        received = asyncio.run(
            stream_events(
                address,
                filters,
                prefix,
                cfg.cluster,
                emit,
                count=count,
                silence=None if follow else timeout,
            )
        )
    except KeyboardInterrupt:
        return
    if received == 0:
        click.echo(f"kmctl: no messages within {timeout:g}s on {', '.join(filters)}", err=True)
