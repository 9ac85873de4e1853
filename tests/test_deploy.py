"""`kmctl deploy render compose|k8s`, the Dockerfile and .dockerignore (issue 17, item 4).

No Docker engine or Kubernetes cluster is available, so what a user would notice is checked
without them: the Kubernetes manifests pass kubernetes-validate's strict, offline schemas for
the version the renderer names; the compose file passes a strict structural schema of the
compose-spec subset it uses plus reference checks; both are parsed and compared with the
cluster.yaml they came from; the mosquitto files are run by a real mosquitto; the CLI writes
files with their modes and never over existing ones (nor through a planted link).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.config import (
    ClusterConfig,
    MqttSpec,
    NodeSpec,
    PlatformSpec,
    config_to_yaml,
    load_config,
    parse_config,
)
from kmnode.deploy import DeployError, Rendering
from kmnode.deploy import mosquitto as mq
from kmnode.deploy.compose import BROKER_CONFIG, BROKER_SERVICE, render_compose
from kmnode.deploy.containers import (
    API_HOST_VARIABLE,
    API_PORT_VARIABLE,
    CONFIG_PATH,
    HARDWARE_DIR,
    HEALTH_PATH,
    HEALTH_PROBE,
    IMAGE_UID,
    LIVE_PATH,
    STATE_DIR,
    container_config,
    node_command,
)
from kmnode.deploy.k8s import KUBERNETES_VERSION, VENDOR_DIR, VENDOR_KEY, quorum, render_k8s
from kmnode.host.mqtt import TopicKind, topic_for
from kmnode.identity import IdentityKeys, ensure_dev_identity
from kmnode.simhw import HardwareStore
from tests.conftest import find_mosquitto
from tests.ports import free_port
from tests.requirements import unavailable

REPO = Path(__file__).resolve().parent.parent
IMAGE = "registry.example/kmsim:0.1.0"
#: The Kubernetes version named by the renderer, as kubernetes-validate spells it.
K8S_VERSION = f"{KUBERNETES_VERSION}.0"


def source_config(count: int = 3, **changes: Any) -> ClusterConfig:
    """The repository's default cluster.yaml with an admin identity, as a user would have."""
    admin = IdentityKeys.generate("alice").public(["admin"])
    return ClusterConfig.default(count).model_copy(update={"identities": [admin], **changes})


def accounts_for(config: ClusterConfig) -> dict[str, mq.MqttAccount]:
    names = [n.name for n in config.nodes] + [mq.READER]
    return {name: mq.MqttAccount.new(name) for name in names}


def compose_of(config: ClusterConfig) -> tuple[Rendering, dict[str, Any]]:
    rendering = render_compose(config, image=IMAGE, accounts=accounts_for(config))
    return rendering, yaml.safe_load(rendering.file("compose.yaml").content)


def k8s_documents(rendering: Rendering) -> list[dict[str, Any]]:
    documents = []
    for rendered in rendering.files:
        documents += [d for d in yaml.safe_load_all(rendered.content) if d is not None]
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


# --- the nodes' cluster.yaml in containers ------------------------------------------------------


def test_containers_listen_everywhere_advertise_their_names_and_keep_the_rest() -> None:
    source = source_config()
    rendering, project = compose_of(source)
    inside = parse_config(yaml.safe_load(rendering.file("cluster.yaml").content))
    assert [n.name for n in inside.nodes] == [n.name for n in source.nodes]
    for mine, theirs in zip(inside.nodes, source.nodes, strict=True):
        assert mine.host == "0.0.0.0"
        # Reached at its compose service's name, which is the node's.
        assert mine.advertise == mine.name and mine.name in project["services"]
        assert (mine.peer_port, mine.api_port) == (theirs.peer_port, theirs.api_port)
        assert mine.platform == theirs.platform
        assert mine.member_record()["host"] == mine.name
    assert str(inside.state_dir) == str(STATE_DIR)
    assert inside.identities == source.identities and inside.policy == source.policy
    assert inside.mqtt.url == f"mqtt://{BROKER_SERVICE}:{mq.MQTT_PORT}"


def test_the_containers_cluster_yaml_loads_as_a_node_loads_it(tmp_path: Path) -> None:
    rendering, _ = compose_of(source_config())
    path = tmp_path / "cluster.yaml"
    path.write_text(rendering.file("cluster.yaml").content)
    loaded = load_config(path)
    # Absolute: not taken relative to the mounted file's directory.
    assert str(loaded.state_dir) == str(STATE_DIR)
    assert loaded.node("km2").address == "km2"


def test_nodes_on_the_same_ports_render_since_each_container_has_its_own() -> None:
    # Three machines (or containers) may use the same ports: a node is told apart by the
    # address it is reached at, which differs, not by the 0.0.0.0 it listens on.
    nodes = [
        NodeSpec(
            name=f"km{i}",
            host=f"10.0.0.{i}",
            peer_port=7100,
            api_port=7200,
            platform=PlatformSpec(id=f"p{i}"),
        )
        for i in (1, 2, 3)
    ]
    source = source_config(nodes=nodes)
    inside = container_config(source, mqtt_url=None)
    assert {(n.host, n.address, n.peer_port) for n in inside.nodes} == {
        ("0.0.0.0", f"km{i}", 7100) for i in (1, 2, 3)
    }
    compose_of(source)
    render_k8s(source, image=IMAGE)


@pytest.mark.parametrize("bad", ["km-", "demo-"])
def test_names_that_cannot_be_dns_labels_are_refused(bad: str) -> None:
    source = source_config()
    if bad == "demo-":
        source = source.model_copy(update={"cluster": bad})
    else:
        nodes = [source.nodes[0].model_copy(update={"name": bad}), *source.nodes[1:]]
        source = source.model_copy(update={"nodes": nodes})
    with pytest.raises(DeployError, match=re.escape(repr(bad))):
        render_k8s(source, image=IMAGE)
    with pytest.raises(DeployError, match=re.escape(repr(bad))):
        compose_of(source)


# --- compose ------------------------------------------------------------------------------------

_STRING = {"type": "string", "minLength": 1}
_STRINGS = {"type": "array", "items": _STRING}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}


def _closed(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }


#: The compose-spec subset the renderer uses, with the spec's field names and types, and every
#: object closed: a key compose would not know (or a typo) fails. (The compose-spec's own JSON
#: schema is not installable offline here; see docker/README.md.)
COMPOSE_SCHEMA: dict[str, Any] = _closed(
    ["name", "services", "volumes"],
    name={"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
    services={
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": r"^[a-zA-Z0-9._-]+$"},
        "additionalProperties": _closed(
            ["image", "command", "restart"],
            image=_STRING,
            command=_STRINGS,
            init={"type": "boolean"},
            environment={"type": "object", "additionalProperties": {"type": "string"}},
            expose={"type": "array", "items": {"type": "string", "pattern": r"^[0-9]+$"}},
            ports={
                "type": "array",
                "items": _closed(
                    ["target", "published", "host_ip", "protocol"],
                    target=_PORT,
                    published={"type": "string", "pattern": r"^[0-9]+$"},
                    host_ip=_STRING,
                    protocol={"enum": ["tcp", "udp"]},
                ),
            },
            volumes={
                "type": "array",
                "items": _closed(
                    ["type", "source", "target"],
                    type={"enum": ["volume", "bind"]},
                    source=_STRING,
                    target={"type": "string", "pattern": "^/"},
                    read_only={"type": "boolean"},
                ),
            },
            read_only={"type": "boolean"},
            tmpfs=_STRINGS,
            cap_drop=_STRINGS,
            security_opt=_STRINGS,
            healthcheck=_closed(
                ["test", "interval", "timeout", "retries", "start_period"],
                test={"type": "array", "items": _STRING, "minItems": 2},
                interval=_DURATION,
                timeout=_DURATION,
                retries={"type": "integer", "minimum": 1},
                start_period=_DURATION,
            ),
            restart={"enum": ["no", "always", "on-failure", "unless-stopped"]},
            stop_grace_period=_DURATION,
            secrets={
                "type": "array",
                "items": _closed(["source", "target"], source=_STRING, target=_STRING),
            },
            depends_on={
                "type": "object",
                "additionalProperties": _closed(
                    ["condition"],
                    condition={
                        "enum": [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully",
                        ]
                    },
                ),
            },
        ),
    },
    volumes={"type": "object", "additionalProperties": {"type": "object", "maxProperties": 0}},
    secrets={"type": "object", "additionalProperties": _closed(["file"], file=_STRING)},
)


def compose_problems(project: dict[str, Any], rendering: Rendering) -> list[str]:
    """The schema's findings, and what a schema cannot see: every reference resolves (named
    volumes, secrets, services depended on, bind-mounted files of the rendering), and the
    start-up order has no cycle."""
    validator = jsonschema.Draft7Validator(COMPOSE_SCHEMA)
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(project)]
    if problems:
        return problems
    rendered = {str(f.path) for f in rendering.files}
    for name, service in project["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "volume" and volume["source"] not in project["volumes"]:
                problems.append(f"{name}: volume {volume['source']} is not declared")
            source = volume["source"].removeprefix("./")
            if volume["type"] == "bind" and not any(
                r == source or r.startswith(source + "/") for r in rendered
            ):
                problems.append(f"{name}: bind source {volume['source']} is not rendered")
        for secret in service.get("secrets", []):
            if secret["source"] not in project.get("secrets", {}):
                problems.append(f"{name}: secret {secret['source']} is not declared")
        for other in service.get("depends_on", {}):
            if other not in project["services"] or other == name:
                problems.append(f"{name}: depends on {other}")
    for name, secret in project.get("secrets", {}).items():
        if secret["file"].removeprefix("./") not in rendered:
            problems.append(f"secret {name}: {secret['file']} is not rendered")
    return problems


def test_the_compose_file_passes_the_structural_check() -> None:
    rendering, project = compose_of(source_config())
    assert compose_problems(project, rendering) == []


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda p: p["services"]["km1"].update(helthcheck={}), "helthcheck"),
        (lambda p: p["services"]["km2"]["volumes"][0].update(source="nowhere"), "nowhere"),
        (lambda p: p["services"]["km2"].update(depends_on={"km9": {"condition": "x"}}), "km9"),
        (lambda p: p["services"]["km1"]["ports"][0].update(target=70000), "70000"),
        (lambda p: p.pop("secrets"), "secret"),
    ],
)
def test_the_structural_check_refuses_a_broken_compose_file(tamper: Any, expected: str) -> None:
    rendering, project = compose_of(source_config())
    tamper(project)
    problems = compose_problems(project, rendering)
    assert problems and any(expected in p for p in problems), problems


def test_each_node_is_a_service_with_its_ports_volumes_health_check_and_order() -> None:
    source = source_config()
    _, project = compose_of(source)
    services = project["services"]
    assert set(services) == {BROKER_SERVICE} | {n.name for n in source.nodes}
    first = source.nodes[0].name
    for node in source.nodes:
        service = services[node.name]
        assert service["image"] == IMAGE
        assert service["command"] == ["-c", str(CONFIG_PATH), "node", "run", node.name]
        # The API on the Docker host's loopback only; the peer port on the project network.
        assert service["ports"] == [
            {
                "target": node.api_port,
                "published": str(node.api_port),
                "host_ip": "127.0.0.1",
                "protocol": "tcp",
            }
        ]
        assert service["expose"] == [str(node.peer_port)]
        mounts = {v["target"]: v for v in service["volumes"]}
        assert mounts[str(STATE_DIR)]["source"] == f"{node.name}-data"
        assert mounts[str(HARDWARE_DIR)]["source"] == "hardware"  # one machine: one store
        assert mounts[str(CONFIG_PATH)] == {
            "type": "bind",
            "source": "./cluster.yaml",
            "target": str(CONFIG_PATH),
            "read_only": True,
        }
        assert service["healthcheck"]["test"] == ["CMD", "python", "-c", HEALTH_PROBE]
        assert service["environment"][API_PORT_VARIABLE] == str(node.api_port)
        assert service["environment"][API_HOST_VARIABLE] == node.name  # the Host it must name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        # Started, never "healthy": one node of a stopped cluster is never healthy alone.
        conditions = {d["condition"] for d in service.get("depends_on", {}).values()}
        assert conditions == {"service_started"}
        assert (first in service.get("depends_on", {})) == (node.name != first)
        assert service["secrets"] == [{"source": f"mqtt-{node.name}", "target": "mqtt-password"}]
    assert "/v1/health" in HEALTH_PROBE and HEALTH_PATH == "/v1/health"
    assert set(project["volumes"]) == {f"{n.name}-data" for n in source.nodes} | {"hardware"}


def test_the_health_probe_is_what_the_image_and_compose_run() -> None:
    """The probe exits 0 on 200 only, names the node as the Host (a node refuses other names),
    and fails when nothing listens: run for real against a local HTTP server, as the image
    would run it."""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from threading import Thread

    answer = {"code": 503}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            named = self.headers.get("Host") == f"km2:{port}"
            self.send_response(
                403 if not named else answer["code"] if self.path == HEALTH_PATH else 404
            )
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = str(server.server_address[1])

    def probe(host: str) -> int:
        env = {API_PORT_VARIABLE: port, API_HOST_VARIABLE: host, "PATH": "/usr/bin:/bin"}
        command = [sys.executable, "-c", HEALTH_PROBE]
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    try:
        assert probe("km2") != 0  # 503: not ready
        answer["code"] = 200
        assert probe("km2") == 0
        assert probe("127.0.0.1") != 0  # 403: not the node's name
    finally:
        server.shutdown()
        server.server_close()
    assert probe("km2") != 0  # nothing listens


def test_rendering_is_a_pure_function_of_its_inputs() -> None:
    """Same cluster.yaml and accounts, same files: a render can be reviewed and diffed."""
    source = source_config()
    accounts = accounts_for(source)
    first = render_compose(source, image=IMAGE, accounts=accounts)
    assert render_compose(source, image=IMAGE, accounts=accounts) == first
    assert render_k8s(source, image=IMAGE) == render_k8s(source, image=IMAGE)


def test_an_external_broker_is_kept_and_no_broker_rendered() -> None:
    source = source_config(mqtt=MqttSpec(url="mqtt://mqtt.example:1884"))
    rendering, project = compose_of(source)
    assert BROKER_SERVICE not in project["services"] and "secrets" not in project
    assert not any(str(f.path).startswith(("mosquitto/", "secrets/")) for f in rendering.files)
    inside = parse_config(yaml.safe_load(rendering.file("cluster.yaml").content))
    assert inside.mqtt.url == "mqtt://mqtt.example:1884"
    assert compose_problems(project, rendering) == []


def test_a_node_named_like_the_broker_is_refused() -> None:
    source = source_config()
    nodes = [source.nodes[0].model_copy(update={"name": BROKER_SERVICE}), *source.nodes[1:]]
    with pytest.raises(DeployError, match="broker"):
        compose_of(source.model_copy(update={"nodes": nodes}))


def test_passwords_are_only_in_the_secret_files_and_never_in_a_repr() -> None:
    source = source_config()
    accounts = accounts_for(source)
    rendering = render_compose(source, image=IMAGE, accounts=accounts)
    for name, account in accounts.items():
        holders = [str(f.path) for f in rendering.files if account.password in f.content]
        assert holders == [f"secrets/mqtt-{name}.password"]
        assert account.password not in repr(account) and account.salt.hex() not in repr(account)
        assert account.password not in repr(rendering)
        assert not any(account.password in note for note in rendering.notes)


def test_password_hashes_are_in_mosquittos_pbkdf2_format() -> None:
    line = mq.password_hash("secret", b"\x01" * 12)
    match = re.fullmatch(r"\$7\$101\$([A-Za-z0-9+/=]{16})\$([A-Za-z0-9+/=]{88})", line)
    assert match is not None
    assert mq.password_hash("secret", b"\x01" * 12) == line  # same salt, same hash
    assert mq.password_hash("secret", b"\x02" * 12) != line
    with pytest.raises(ValueError, match="12-byte salt"):
        mq.password_hash("secret", b"\x01" * 16)


# --- the rendered broker on a real mosquitto ----------------------------------------------------


@pytest.fixture
def rendered_broker(
    tmp_path: Path,
) -> Iterator[tuple[int, ClusterConfig, dict[str, mq.MqttAccount]]]:
    """mosquitto running the rendered configuration, password file and ACL; only the listener
    (a free loopback port) and the file locations differ from the container's."""
    source = source_config()
    accounts = accounts_for(source)
    rendering = render_compose(source, image=IMAGE, accounts=accounts)
    for name in ("passwd", "acl"):
        (tmp_path / name).write_text(rendering.file(f"mosquitto/{name}").content)
    port = free_port()
    conf = rendering.file("mosquitto/mosquitto.conf").content
    assert f"listener {mq.MQTT_PORT}\n" in conf and "allow_anonymous false" in conf
    conf = conf.replace(f"listener {mq.MQTT_PORT}\n", f"listener {port} 127.0.0.1\n")
    conf = conf.replace(f"{BROKER_CONFIG}/", f"{tmp_path}/")
    # As root, mosquitto would switch to a 'mosquitto' user that cannot read tmp_path.
    (tmp_path / "mosquitto.conf").write_text(conf + f"user {getpass.getuser()}\n")
    log = tmp_path / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        if not _listening(port, proc) or proc.poll() is not None:
            pytest.fail(f"mosquitto did not start:\n{log.read_text(errors='replace')}")
        yield port, source, accounts
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _listening(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """Whether the broker accepts connections within ~20 s (its log is block-buffered into a
    file, so it cannot be watched for the start-up line)."""
    for _ in range(200):
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


@contextlib.asynccontextmanager
async def client(
    port: int, account: mq.MqttAccount | None, password: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    user = account.user if account else None
    secret = password if password is not None else (account.password if account else None)
    async with aiomqtt.Client("127.0.0.1", port, username=user, password=secret, timeout=10) as c:
        yield c


async def test_each_node_logs_in_and_publishes_only_under_its_own_name(
    rendered_broker: tuple[int, ClusterConfig, dict[str, mq.MqttAccount]],
) -> None:
    port, source, accounts = rendered_broker
    prefix, cluster = source.mqtt.topic_prefix, source.cluster
    received: list[str] = []
    async with client(port, accounts[mq.READER]) as reader:
        await reader.subscribe(f"{prefix}/{cluster}/#", qos=1)

        async def collect() -> None:
            async for message in reader.messages:
                received.append(str(message.topic))

        task = asyncio.create_task(collect())
        try:
            async with client(port, accounts["km1"]) as km1:
                # Every topic a node's publisher uses (kmnode.host.mqtt), then a forgery.
                allowed = [topic_for(prefix, cluster, "km1", kind) for kind in TopicKind]
                allowed += [
                    f"{prefix}/{cluster}/users/bob/results",
                    f"{prefix}/{cluster}/owners/carol/requests",
                ]
                forged = topic_for(prefix, cluster, "km2", TopicKind.AUDIT)
                for topic in [forged, *allowed]:
                    await km1.publish(topic, b"{}", qos=1)
            async with asyncio.timeout(15):
                while len(received) < len(allowed):
                    await asyncio.sleep(0.02)
            # The forgery was sent first on one ordered connection: had it passed, it would be
            # here before the others.
            assert received == allowed
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize("who", ["wrong password", "anonymous", "unknown user"])
async def test_the_broker_refuses_bad_credentials(
    rendered_broker: tuple[int, ClusterConfig, dict[str, mq.MqttAccount]], who: str
) -> None:
    port, _, accounts = rendered_broker
    account = {
        "wrong password": accounts["km1"],
        "anonymous": None,
        "unknown user": mq.MqttAccount.new("km9"),
    }[who]
    password = accounts["km2"].password if who == "wrong password" else None
    with pytest.raises(aiomqtt.MqttError):
        async with client(port, account, password):
            pass


async def test_the_reader_cannot_publish(
    rendered_broker: tuple[int, ClusterConfig, dict[str, mq.MqttAccount]],
) -> None:
    port, source, accounts = rendered_broker
    topic = topic_for(source.mqtt.topic_prefix, source.cluster, "km1", TopicKind.EVENTS)
    received: list[bytes] = []
    async with client(port, accounts[mq.READER]) as reader:
        await reader.subscribe(topic, qos=1)
        await reader.publish(topic, b"forged", qos=1)
        async with client(port, accounts["km1"]) as km1:
            await km1.publish(topic, b"real", qos=1)
        async with asyncio.timeout(15):
            async for message in reader.messages:
                received.append(bytes(message.payload))
                break
    assert received == [b"real"]


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 3, 5])
@pytest.mark.parametrize("with_secret", [False, True])
def test_the_manifests_pass_kubernetes_validate_strictly(nodes: int, with_secret: bool) -> None:
    # (What the Secret holds is checked below; here any document will do.)
    document = b'{"kind": "x"}\n' if with_secret else None
    rendering = render_k8s(source_config(nodes), image=IMAGE, vendor_root=document)
    documents = k8s_documents(rendering)
    kinds = sorted(d["kind"] for d in documents)
    expected = ["ConfigMap", "PodDisruptionBudget"] + ["Service"] * nodes
    expected += ["StatefulSet"] * nodes + (["Secret"] if with_secret else [])
    assert kinds == sorted(expected)
    for document_ in documents:
        kubernetes_validate.validate(document_, K8S_VERSION, strict=True)


def test_kubernetes_validate_refuses_what_kubernetes_would() -> None:
    """The validator is live: a misspelled field, a wrong type and a missing field fail."""
    statefulset = of_kind(k8s_documents(render_k8s(source_config(), image=IMAGE)), "StatefulSet")[0]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    tampers: list[Callable[[dict[str, Any]], object]] = [
        lambda c: c.update(readinesProbe=c["readinessProbe"]),
        lambda c: c["ports"][0].update(containerPort="7101"),
        lambda c: c.pop("name"),
    ]
    for tamper in tampers:
        broken = json.loads(json.dumps(statefulset))
        tamper(broken["spec"]["template"]["spec"]["containers"][0])
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    assert container["name"] == "node"


def test_each_node_is_a_statefulset_with_its_ports_probes_and_volume() -> None:
    source = source_config()
    documents = k8s_documents(render_k8s(source, image=IMAGE, storage="5Gi"))
    statefulsets = {d["metadata"]["name"]: d for d in of_kind(documents, "StatefulSet")}
    assert list(statefulsets) == [n.name for n in source.nodes]
    for node in source.nodes:
        spec = statefulsets[node.name]["spec"]
        assert spec["replicas"] == 1 and spec["serviceName"] == node.name
        assert spec["updateStrategy"] == {"type": "OnDelete"}
        pod = spec["template"]["spec"]
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
        (container,) = pod["containers"]
        assert container["image"] == IMAGE and container["args"] == node_command(node.name)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"peer": node.peer_port, "api": node.api_port}
        # The node answers only requests naming it: the kubelet would name the pod's IP.
        named = [{"name": "Host", "value": f"{node.name}:{node.api_port}"}]
        for probe, path in (
            ("readiness", HEALTH_PATH),
            ("liveness", LIVE_PATH),
            ("startup", LIVE_PATH),
        ):
            assert container[f"{probe}Probe"]["httpGet"] == {
                "path": path,
                "port": "api",
                "httpHeaders": named,
            }
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[str(STATE_DIR)] == "data" and mounts[str(CONFIG_PATH.parent)] == "config"
        (claim,) = spec["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["securityContext"]["fsGroup"] == IMAGE_UID
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # The vendor root is imported from the Secret into this pod's own hardware store.
        (init,) = pod["initContainers"]
        assert init["args"][2:4] == ["hardware", "import"]
        secret_volume = next(v for v in pod["volumes"] if v["name"] == "vendor-root")
        assert secret_volume["secret"]["secretName"] == f"{source.cluster}-vendor-root"
        config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert config_volume["configMap"]["name"] == f"{source.cluster}-config"


def test_each_node_has_a_headless_service_named_after_it_that_resolves_before_ready() -> None:
    source = source_config()
    documents = k8s_documents(render_k8s(source, image=IMAGE))
    services = {d["metadata"]["name"]: d["spec"] for d in of_kind(documents, "Service")}
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(documents, "StatefulSet")
    }
    inside = parse_config(
        yaml.safe_load(of_kind(documents, "ConfigMap")[0]["data"]["cluster.yaml"])
    )
    for node in inside.nodes:
        spec = services[node.advertise or ""]  # the name peers dial is the Service's
        assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
        selected = [
            name for name, labels in pods.items() if spec["selector"].items() <= labels.items()
        ]
        assert selected == [node.name]
        assert {p["name"]: p["port"] for p in spec["ports"]} == {
            "peer": node.peer_port,
            "api": node.api_port,
        }


def test_the_configmap_holds_the_containers_cluster_yaml() -> None:
    source = source_config()
    documents = k8s_documents(render_k8s(source, image=IMAGE))
    (config_map,) = of_kind(documents, "ConfigMap")
    inside = parse_config(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert [(n.name, n.host, n.advertise, n.peer_port, n.api_port) for n in inside.nodes] == [
        (n.name, "0.0.0.0", n.name, n.peer_port, n.api_port) for n in source.nodes
    ]
    assert inside.identities == source.identities and str(inside.state_dir) == str(STATE_DIR)
    assert inside.mqtt == source.mqtt  # no broker rendered: the user's setting stays


@pytest.mark.parametrize(("nodes", "keep"), [(1, 1), (3, 2), (4, 3), (5, 3)])
def test_the_disruption_budget_keeps_a_quorum_of_every_node(nodes: int, keep: int) -> None:
    source = source_config(nodes)
    documents = k8s_documents(render_k8s(source, image=IMAGE))
    (pdb,) = of_kind(documents, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == keep == quorum(source)
    selector = pdb["spec"]["selector"]["matchLabels"]
    covered = [
        d["metadata"]["name"]
        for d in of_kind(documents, "StatefulSet")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert covered == [n.name for n in source.nodes]


def test_the_vendor_root_secret_is_rendered_only_when_given_and_owner_only(tmp_path: Path) -> None:
    source = source_config()
    assert not of_kind(k8s_documents(render_k8s(source, image=IMAGE)), "Secret")
    exported = HardwareStore(tmp_path / "here").export_vendor()
    rendering = render_k8s(source, image=IMAGE, vendor_root=exported)
    (secret,) = of_kind(k8s_documents(rendering), "Secret")
    assert rendering.file("vendor-root-secret.yaml").mode == 0o600
    # What the init container imports is this machine's root.
    there = HardwareStore(tmp_path / "there")
    there.import_vendor(secret["stringData"][VENDOR_KEY].encode())
    assert there.vendor_public_key() == HardwareStore(tmp_path / "here").vendor_public_key()
    assert not any(exported.decode() in n for n in rendering.notes)


# --- kmctl deploy render ------------------------------------------------------------------------


def write_config(tmp_path: Path, config: ClusterConfig) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(config_to_yaml(config.model_copy(update={"state_dir": Path(".kmsim")})))
    return path


def kmctl(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_render_compose_writes_the_files_with_their_modes_and_says_so(tmp_path: Path) -> None:
    config = write_config(tmp_path, source_config())
    out = tmp_path / "out"
    result = kmctl("-c", str(config), "deploy", "render", "compose", "-o", str(out))
    assert result.exit_code == 0, result.output
    written = [
        line.removeprefix("wrote ")
        for line in result.stdout.splitlines()
        if line.startswith("wrote ")
    ]
    assert {Path(p).relative_to(out).as_posix() for p in written} == {
        "compose.yaml",
        "cluster.yaml",
        "mosquitto/mosquitto.conf",
        "mosquitto/acl",
        "mosquitto/passwd",
        "secrets/mqtt-km1.password",
        "secrets/mqtt-km2.password",
        "secrets/mqtt-km3.password",
        f"secrets/mqtt-{mq.READER}.password",
    }
    assert stat.S_IMODE((out / "secrets").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "mosquitto" / "passwd").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "compose.yaml").stat().st_mode) == 0o644
    password = (out / "secrets" / "mqtt-km1.password").read_text()
    assert password not in result.output
    project = yaml.safe_load((out / "compose.yaml").read_text())
    assert set(project["services"]) == {"mosquitto", "km1", "km2", "km3"}
    assert "next:" in result.stdout


def test_render_refuses_to_overwrite_and_force_rewrites_with_the_rendered_modes(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, source_config())
    out = tmp_path / "out"
    args = ["-c", str(config), "deploy", "render", "compose", "-o", str(out)]
    assert kmctl(*args).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "mosquitto" / "passwd").chmod(0o644)
    (out / "cluster.yaml").unlink()  # one file gone, the others there: still nothing written
    refused = kmctl(*args)
    assert refused.exit_code == 2 and "--force" in refused.output
    assert not (out / "cluster.yaml").exists()
    assert all(p.read_bytes() == data for p, data in before.items() if p.exists())
    forced = kmctl(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert stat.S_IMODE((out / "mosquitto" / "passwd").stat().st_mode) == 0o600
    assert (out / "secrets" / "mqtt-km1.password").read_bytes() != before[
        out / "secrets" / "mqtt-km1.password"
    ]


def test_render_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    config = write_config(tmp_path, source_config())
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (out / "configmap.yaml").symlink_to(victim)
    for extra in ([], ["--force"]):
        result = kmctl("-c", str(config), "deploy", "render", "k8s", "-o", str(out), *extra)
        assert result.exit_code == 2, result.output
    assert victim.read_text() == "untouched"


def test_render_uses_the_development_profile_like_up(tmp_path: Path) -> None:
    bare = ClusterConfig.default(3)
    config = write_config(tmp_path, bare)
    out = tmp_path / "k8s"
    result = kmctl("-c", str(config), "deploy", "render", "k8s", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "development profile" in result.output
    config_map = yaml.safe_load((out / "configmap.yaml").read_text())
    inside = parse_config(yaml.safe_load(config_map["data"]["cluster.yaml"]))
    assert inside.identities == [ensure_dev_identity(tmp_path / ".kmsim")]
    for document in yaml.safe_load_all((out / "statefulsets.yaml").read_text()):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_render_k8s_with_the_vendor_root_writes_this_machines_root(tmp_path: Path) -> None:
    config = write_config(tmp_path, source_config())
    out = tmp_path / "k8s"
    result = kmctl("-c", str(config), "deploy", "render", "k8s", "-o", str(out), "--vendor-root")
    assert result.exit_code == 0, result.output
    secret_file = out / "vendor-root-secret.yaml"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = yaml.safe_load(secret_file.read_text())
    document = json.loads(secret["stringData"][VENDOR_KEY])
    here = HardwareStore(tmp_path / ".kmsim" / "hardware").vendor_public_key().hex()
    assert document["public_key"] == here
    assert document["seed"] not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compose", "--vendor-root"], "--vendor-root is for k8s"),
        (["compose", "--storage", "5Gi"], "--storage is for k8s"),
        (["k8s", "--storage", "lots"], "--storage 'lots'"),
        (["k8s", "--image", "kmsim latest"], "--image 'kmsim latest'"),
        (["swarm"], "swarm"),
    ],
)
def test_render_refuses_bad_usage_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    config = write_config(tmp_path, source_config())
    result = kmctl("-c", str(config), "deploy", "render", *args, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_render_help_names_the_kubernetes_version() -> None:
    result = kmctl("deploy", "render", "--help")
    assert result.exit_code == 0 and f"Kubernetes {KUBERNETES_VERSION}" in result.output


# --- the image: Dockerfile and .dockerignore ----------------------------------------------------


def dockerfile() -> str:
    return (REPO / "docker" / "Dockerfile").read_text()


def test_the_dockerfile_builds_in_one_stage_and_runs_slim_and_non_root_in_another() -> None:
    text = dockerfile()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
    assert [name for _, name in stages] == ["builder", ""]
    assert all(image.startswith("python:3.11-slim") for image, _ in stages)
    builder, runtime = re.split(r"^FROM .*$", text, flags=re.MULTILINE)[1:]
    assert "gcc" in builder and re.search(
        r"^RUN pip wheel .*--wheel-dir /wheels \.$", builder, re.M
    )
    assert "gcc" not in runtime and "apt-get" not in runtime and "COPY kmnode" not in runtime
    assert "pip install --no-cache-dir --no-index --find-links /wheels kmsim" in runtime
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in runtime and f"--uid {IMAGE_UID}" in runtime
    assert f"mkdir -p {HARDWARE_DIR} {CONFIG_PATH.parent}" in runtime
    assert f"KMSIM_CONFIG={CONFIG_PATH}" in runtime and f"WORKDIR {STATE_DIR}" in runtime
    # The image's health check is compose's, on /v1/health, with no curl.
    healthcheck = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", runtime, re.MULTILINE)
    assert healthcheck is not None and json.loads(healthcheck.group(1)) == [
        "python",
        "-c",
        HEALTH_PROBE,
    ]
    assert re.search(r'^ENTRYPOINT \["kmctl"\]$', runtime, re.MULTILINE)


def test_the_dockerfile_exposes_the_default_clusters_ports() -> None:
    exposed: set[int] = set()
    for spec in re.search(r"^EXPOSE (.*)$", dockerfile(), re.MULTILINE).group(1).split():  # type: ignore[union-attr]
        low, _, high = spec.partition("-")
        exposed |= set(range(int(low), int(high or low) + 1))
    for node in ClusterConfig.default().nodes:
        assert {node.peer_port, node.api_port} <= exposed


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as docker reads it: a path is excluded if the last pattern matching it or
    one of its parent directories is not a ``!`` exception."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def ignored(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in _dockerignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".kmsim/hardware/vendor.seed",
        ".kmsim/identities/dev-admin.key",
        "deploy-out/compose/secrets/mqtt-km1.password",
        "vendor.json",
        "tests/test_deploy.py",
        "bench/results/run.json",
        "build/lib/kmnode/config.py",
        ".mypy_cache/3.11/x.json",
        "kmnode/__pycache__/config.cpython-311.pyc",
        "kmnode/ring/_ring.cpython-311-x86_64-linux-gnu.so",
        "kmnode/ring/_ring.c",
    ],
)
def test_the_build_context_leaves_out_state_secrets_tests_and_caches(path: str) -> None:
    assert ignored(path)


def test_the_build_context_holds_every_file_the_dockerfile_copies() -> None:
    copied = []
    for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", dockerfile(), re.MULTILINE):
        copied += sources.split()
    assert set(copied) == {
        "pyproject.toml",
        "setup.py",
        "README.md",
        "attest",
        "consensus",
        "kmnode",
    }
    for source in copied:
        root = REPO / source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            leftover = "__pycache__" in relative or file.suffix in (".so", ".pyc")
            leftover = leftover or relative == "kmnode/ring/_ring.c"
            assert ignored(relative) == leftover, relative


# --- the rendered pods, run as Kubernetes would run them ----------------------------------------

#: One pod: a mount namespace of its own with its own (empty) state volume at STATE_DIR, the
#: init container's arguments, then the node container's (read from statefulsets.yaml, with
#: the ConfigMap's and Secret's mount paths moved into the test's directory).
_POD = """
set -e
mount -t tmpfs -o mode=0755 tmpfs {state_parent}
mkdir -m 0700 {state_dir}
cd {state_dir}
{python} -m kmnode.cli {init_args}
exec {python} -m kmnode.cli {node_args}
"""

#: The pods' network: a network namespace with only loopback, where each node's Service name
#: resolves to it (as cluster DNS resolves the headless Service to the pod).
_NETWORK = """
set -e
ip link set lo up
mount --bind {hosts} /etc/hosts
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT
{pods}
{python} {probe}
"""

#: Probes every node as the rendered readiness probe does (path, port, Host header) until all
#: answer 200, bounded; prints one JSON line.
_PROBE = """
import json, sys, time, urllib.request
probes = json.loads(sys.argv[1])
deadline = time.monotonic() + 120
ready = {}
while time.monotonic() < deadline and len(ready) < len(probes):
    for name, (port, path, host) in probes.items():
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            ready[name] = urllib.request.urlopen(request, timeout=3).status
        except Exception:
            pass
    time.sleep(0.5)
print(json.dumps(ready))
"""


def _namespaces_unavailable() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (mount and network namespaces)"
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return None if probe.returncode == 0 else f"unshare failed: {probe.stderr.strip()}"


@pytest.mark.timeout(240)
def test_the_rendered_pods_form_a_cluster_and_pass_their_readiness_probes(tmp_path: Path) -> None:
    """Each pod with its own hardware store imports the vendor root from the rendered Secret
    (the init container), runs its node (the node container), and the three become ready
    under the rendered readiness probe; no Kubernetes involved, and the nodes listen on
    0.0.0.0 only inside a network namespace that has nothing but loopback."""
    reason = _namespaces_unavailable()
    if reason is not None:
        unavailable("NETNS", reason, "run as root; apt-get install util-linux iproute2")
    source = source_config()
    exported = HardwareStore(tmp_path / "operator-hardware").export_vendor()
    documents = k8s_documents(render_k8s(source, image=IMAGE, vendor_root=exported))
    mounts = {str(CONFIG_PATH.parent): tmp_path / "configmap", str(VENDOR_DIR): tmp_path / "secret"}
    (tmp_path / "configmap").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "configmap" / "cluster.yaml").write_text(
        of_kind(documents, "ConfigMap")[0]["data"]["cluster.yaml"]
    )
    (tmp_path / "secret" / VENDOR_KEY).write_text(
        of_kind(documents, "Secret")[0]["stringData"][VENDOR_KEY]
    )

    def args(container: dict[str, Any]) -> str:
        moved = []
        for arg in container["args"]:
            for inside, outside in sorted(mounts.items(), key=lambda m: -len(m[0])):
                arg = arg.replace(inside, str(outside))
            moved.append(shlex.quote(arg))
        return " ".join(moved)

    pods, probes = [], {}
    for statefulset in of_kind(documents, "StatefulSet"):
        name = statefulset["metadata"]["name"]
        pod = statefulset["spec"]["template"]["spec"]
        (init,), (node,) = pod["initContainers"], pod["containers"]
        script = tmp_path / f"pod-{name}.sh"
        script.write_text(
            _POD.format(
                state_parent=STATE_DIR.parent,
                state_dir=STATE_DIR,
                python=shlex.quote(sys.executable),
                init_args=args(init),
                node_args=args(node),
            )
        )
        log = tmp_path / f"{name}.log"
        pods.append(f"unshare --mount --propagation private sh {script} > {log} 2>&1 &")
        readiness = node["readinessProbe"]["httpGet"]
        port = next(p["containerPort"] for p in node["ports"] if p["name"] == readiness["port"])
        (host,) = [h["value"] for h in readiness["httpHeaders"] if h["name"] == "Host"]
        probes[name] = (port, readiness["path"], host)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(n.name for n in source.nodes) + "\n")
    (tmp_path / "probe.py").write_text(_PROBE)
    network = tmp_path / "network.sh"
    network.write_text(
        _NETWORK.format(
            hosts=hosts,
            pods="\n".join(pods),
            python=shlex.quote(sys.executable),
            probe=f"{tmp_path / 'probe.py'} {shlex.quote(json.dumps(probes))}",
        )
    )
    proc = subprocess.Popen(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", str(network)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=200)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("km*.log"))
    ready = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    assert ready == {n.name: 200 for n in source.nodes}, f"{output}\n{logs}"
    for node in source.nodes:
        assert "imported vendor root" in (tmp_path / f"{node.name}.log").read_text()
