"""kmctl events, run as an operator would, against the embedded broker.

The command runs in its own process while the test publishes, the way an operator watches a
live cluster. Nothing is retained on the broker, so the test keeps publishing until the command
has seen what it asked for: that makes the test independent of when the subscription lands.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.cli.events_cmds import events
from kmnode.config import ClusterConfig, MqttSpec
from kmnode.host.mqtt import EventPublisher, TopicKind
from tests.host import BrokerUnderTest
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[1]

# kmctl with `events` registered, whether or not kmnode.cli has done it yet.
KMCTL = (
    "from kmnode.cli import cli\n"
    "from kmnode.cli.events_cmds import events\n"
    "cli.add_command(events)\n"
    "cli(prog_name='kmctl')\n"
)


def write_config(tmp_path: Path, mqtt: MqttSpec) -> Path:
    path = tmp_path / "cluster.yaml"
    config = ClusterConfig(mqtt=mqtt)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


async def run_kmctl_while_publishing(
    args: list[str], publishers: list[tuple[EventPublisher, TopicKind, bytes | None]]
) -> tuple[int, str, str]:
    """Run kmctl; each publisher publishes (its payload or a numbered event) every 50 ms."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KMCTL,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,  # kmnode importable even without an install
    )
    output = asyncio.ensure_future(proc.communicate())
    try:
        for publisher, _, _ in publishers:
            publisher.start()
        for seq in range(400):  # at most ~20 s
            if output.done():
                break
            for publisher, kind, payload in publishers:
                publisher.publish(kind, payload if payload is not None else {"seq": seq})
            await asyncio.sleep(0.05)
        stdout, stderr = await asyncio.wait_for(output, 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for publisher, _, _ in publishers:
            await publisher.stop(timeout=1.0)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def km(node: str, port: int) -> EventPublisher:
    return EventPublisher("127.0.0.1", port, cluster="demo", node=node)


async def test_count_json_receives_two_published_events(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    config = write_config(tmp_path, MqttSpec(embedded_port=broker.port))
    code, out, err = await run_kmctl_while_publishing(
        ["-c", str(config), "events", "--count", "2", "--json"],
        [(km("km1", broker.port), TopicKind.EVENTS, None)],
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert (line["node"], line["kind"], line["topic"]) == (
            "km1",
            "events",
            "kmsim/demo/km1/events",
        )
        assert line["time"].endswith("Z")
    first, second = (line["payload"]["seq"] for line in lines)
    assert second == first + 1


async def test_node_and_topic_filters_and_terminal_safe_lines(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, MqttSpec(url=f"mqtt://127.0.0.1:{broker.port}", topic_prefix="lab")
    )

    def lab(node: str) -> EventPublisher:
        return EventPublisher("127.0.0.1", broker.port, cluster="demo", node=node, prefix="lab")

    code, out, err = await run_kmctl_while_publishing(
        ["-c", str(config), "events", "--node", "km2", "--topic", "audit", "--count", "1"],
        [
            (lab("km1"), TopicKind.AUDIT, b"wrong node"),
            (lab("km2"), TopicKind.EVENTS, b"wrong kind"),
            (lab("km2"), TopicKind.AUDIT, b"key k1 released\x1b[2J"),
        ],
    )
    assert code == 0, err
    [line] = out.splitlines()
    assert line.split()[1:3] == ["km2", "audit"]
    assert line.endswith("key k1 released\\x1b[2J")  # the escape sequence is shown, not obeyed
    assert "\x1b" not in out


def kmctl(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setitem(cli.commands, "events", events)
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_unreachable_broker_is_one_line_and_exit_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()  # nothing listens here
    config = write_config(tmp_path, MqttSpec(url=f"mqtt://127.0.0.1:{port}"))
    code, out, err = kmctl(monkeypatch, "-c", str(config), "events", "--count", "1")
    assert code == 3
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"kmctl: error: cannot reach the MQTT broker at 127.0.0.1:{port}: ")


def test_silence_ends_the_command_without_follow(
    broker: BrokerUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, MqttSpec(embedded_port=broker.port))
    code, out, err = kmctl(monkeypatch, "-c", str(config), "events", "--timeout", "0.3")
    assert code == 0
    assert out == ""
    assert "no messages within 0.3s on kmsim/demo/+/events, kmsim/demo/+/service/out" in err


def test_unknown_node_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, MqttSpec())
    code, _, err = kmctl(monkeypatch, "-c", str(config), "events", "--node", "km9")
    assert code == 2
    assert "no node named 'km9'" in err


async def test_coalesced_audit_records_are_shown_one_per_line(
    broker: BrokerUnderTest, tmp_path: Path
) -> None:
    """A node coalesces audit records under load; kmctl shows and counts each record alone,
    with the payload it would have had if published by itself."""
    config = write_config(tmp_path, MqttSpec(embedded_port=broker.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KMCTL,
        *["-c", str(config), "events", "--topic", "audit", "--count", "7", "--json"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    output = asyncio.ensure_future(proc.communicate())
    publisher = km("km1", broker.port)
    try:
        publisher.start()
        for batch in range(400):
            if output.done():
                break
            for i in range(3):  # published together: they leave as one message
                publisher.publish_record(TopicKind.AUDIT, {"release": f"r{3 * batch + i}"})
            await asyncio.sleep(0.05)
        stdout, stderr = await asyncio.wait_for(output, 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await publisher.stop(timeout=1.0)
    assert proc.returncode == 0, stderr.decode()
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    assert len(lines) == 7
    numbers = [int(line["payload"]["release"][1:]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 7))
    assert all(set(line["payload"]) == {"release"} for line in lines)
    assert all(line["kind"] == "audit" for line in lines)
