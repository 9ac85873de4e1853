"""kmctl's API client and cluster commands against a small fake of docs/operator-api.md.

The fake is a real aiohttp server per node (127.0.0.1, free ports, its own thread) sharing one
state: writes on a follower get the contract's 421 naming the leader, bodies are validated
like the real node does, and every request is recorded so the tests check what kmctl sent.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner

from kmnode import supervisor
from kmnode.cli import cli
from kmnode.cli.cluster_cmds import select_nodes
from kmnode.cli.context import CliContext
from kmnode.cli.output import CliError
from kmnode.client import ApiError, ClusterClient, NodeClient, NodeUnreachable
from kmnode.config import ClusterConfig, MqttSpec, NodeSpec, PlatformSpec
from kmnode.errors import KmsimError
from tests.ports import free_ports

pytestmark = pytest.mark.timeout(60)

MEASUREMENT = "ab" * 32
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


@dataclass
class Recorded:
    node: str
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeState:
    leader: str | None = "km1"
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    releases: list[dict[str, Any]] = field(default_factory=list)
    members: list[str] = field(default_factory=lambda: ["km1", "km2", "km3"])
    policy: dict[str, Any] = field(
        default_factory=lambda: {
            "measurements": {"km": [MEASUREMENT], "service": [MEASUREMENT]},
            "min_svn": 1,
            "accepted_tcb": ["up_to_date"],
            "revoked_platforms": [],
            "max_quote_age_s": 60.0,
            "max_clock_skew_s": 5.0,
        }
    )
    #: (node, path) → (status, body) answered once instead of the normal behaviour.
    inject: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    api: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def make_app(name: str, state: FakeState) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        state.requests.append(
            Recorded(name, request.method, request.path, dict(request.query), body)
        )
        injected = state.inject.pop((name, request.path), None)
        if injected is not None:
            status, payload = injected
            if isinstance(payload, str):
                return web.Response(status=status, text=payload)
            return web.json_response(payload, status=status)
        if (
            request.method == "POST"
            and request.path != "/v1/service/prove"
            and state.leader != name
        ):
            leader = state.leader
            return web.json_response(
                {
                    "error": "not the leader",
                    "code": "not_leader",
                    "leader": leader,
                    "leader_api": state.api.get(leader) if leader else None,
                },
                status=421,
            )
        response: web.StreamResponse = await handler(request)
        return response

    @routes.get("/v1/status")
    async def status_(request: web.Request) -> web.Response:
        peers = {p: {"attested": True, "platform_id": f"p-{p}", "since": 1} for p in state.api}
        peers.pop(name, None)
        return web.json_response(
            {
                "node": name,
                "cluster": "demo",
                "ready": True,
                "role": "leader" if state.leader == name else "follower",
                "leader": state.leader,
                "term": 2,
                "commit": 7,
                "applied": 7,
                "members": state.members,
                "peers": peers,
                "has_master_secret": True,
                "service": {"running": True, "measurement": MEASUREMENT},
                "mqtt": {"connected": True, "published": 3, "dropped": 0},
            }
        )

    @routes.get("/v1/keys")
    async def keys_list(request: web.Request) -> web.Response:
        # In pages of two names, as the node pages (of 10,000): kmctl must follow ``next``.
        after = request.query.get("after")
        names = sorted(n for n in state.keys if after is None or n > after)
        page = names[:2]
        more = len(names) > 2
        return web.json_response(
            {"keys": [state.keys[n] for n in page], "next": page[-1] if more else None}
        )

    @routes.post("/v1/keys")
    async def keys_create(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or not _NAME.match(str(body.get("name", ""))):
            return _error(400, "bad_request", "name must match ^[a-z][a-z0-9-]{0,31}$")
        if set(body) - {"name", "allowed_service"}:
            return _error(400, "bad_request", f"unknown fields {sorted(set(body) - {'name'})}")
        key = body["name"]
        if key in state.keys:
            return _error(409, "refused", f"key {key!r} already exists")
        state.keys[key] = {
            "name": key,
            "generation": 1,
            "allowed_service": body.get("allowed_service", []),
            "created_index": 5,
            "rotated_index": None,
        }
        return web.json_response({"key": key, "generation": 1}, status=201)

    @routes.get("/v1/keys/{key}")
    async def keys_show(request: web.Request) -> web.Response:
        record = state.keys.get(request.match_info["key"])
        if record is None:
            return _error(404, "not_found", f"no key {request.match_info['key']!r}")
        fps = {str(g): f"{g:02x}" * 16 for g in range(1, record["generation"] + 1)}
        return web.json_response({**record, "fingerprints": fps})

    @routes.post("/v1/keys/{key}/rotate")
    async def keys_rotate(request: web.Request) -> web.Response:
        record = state.keys[request.match_info["key"]]
        record["generation"] += 1
        return web.json_response({"key": record["name"], "generation": record["generation"]})

    @routes.post("/v1/keys/{key}/release")
    async def keys_release(request: web.Request) -> web.Response:
        body = await request.json()
        key = request.match_info["key"]
        targets = list(state.members) if body["node"] == "all" else [body["node"]]
        out: list[dict[str, Any]] = []
        for target in targets:
            refused = target == "km3"
            out.append(
                {
                    "release": len(state.releases) + len(out) + 1,
                    "node": target,
                    "key": key,
                    "generation": body.get("generation", 1),
                    "status": "refused" if refused else "provisioned",
                    "reason": "service measurement not allowed" if refused else None,
                }
            )
        state.releases += out
        return web.json_response({"releases": out})

    @routes.get("/v1/releases")
    async def releases_list(request: web.Request) -> web.Response:
        key = request.query.get("key")
        found = [r for r in state.releases if key is None or r["key"] == key]
        return web.json_response({"releases": found})

    @routes.get("/v1/policy")
    async def policy_get(request: web.Request) -> web.Response:
        return web.json_response(state.policy)

    @routes.post("/v1/policy/allow")
    async def policy_allow(request: web.Request) -> web.Response:
        body = await request.json()
        state.policy["measurements"][body["role"]].append(body["measurement"])
        return web.json_response(PASSED)

    @routes.post("/v1/members/remove")
    async def members_remove(request: web.Request) -> web.Response:
        state.members.remove((await request.json())["name"])
        return web.json_response(PASSED)

    @routes.get("/v1/members")
    async def members_list(request: web.Request) -> web.Response:
        found = [
            {
                "name": m,
                "platform_id": f"platform-{m[2:]}",
                "host": "127.0.0.1",
                "peer_port": 7100,
                "api_port": 7200,
                "joined_index": 1,
            }
            for m in state.members
        ]
        return web.json_response({"members": found, "voters": state.members[:2]})

    @routes.get("/v1/attest")
    async def attest_(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "node": name,
                "quote": "00" * 400,
                "identity": {"role": "km", "platform_id": f"platform-{name[2:]}"},
                "verification": {
                    "accepted": True,
                    "error": None,
                    "checks": [{"check": "signature", "detail": "signed"}],
                },
            }
        )

    @routes.post("/v1/service/prove")
    async def prove_(request: web.Request) -> web.Response:
        body = await request.json()
        mac = f"{body['key']}-{body['generation']}-{body['challenge']}"
        return web.json_response(
            {"node": name, "key": body["key"], "generation": body["generation"], "mac": mac}
        )

    app = web.Application(middlewares=[record])
    app.add_routes(routes)
    return app


#: What the API answers a governed change that one admin's proposal passed.
PASSED = {
    "ok": True,
    "proposal": "p9",
    "state": "accepted",
    "votes_for": ["dev-admin"],
    "votes_against": [],
    "needed": 1,
    "error": "",
}


class FakeCluster:
    """Fake nodes served from one event loop in a background thread."""

    def __init__(self, up: list[str], down: list[str], state_dir: Path) -> None:
        self.state = FakeState()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []
        specs = []
        sockets: dict[str, socket.socket] = {}
        for name in up:  # bound (and held) first, so none of the spare ports repeats them
            sockets[name] = socket.socket()
            sockets[name].bind(("127.0.0.1", 0))
        spare = iter(free_ports(2 * len(up + down)))
        for i, name in enumerate(sorted(up + down), start=1):
            if name in up:
                port = sockets[name].getsockname()[1]
                self.state.api[name] = f"http://127.0.0.1:{port}"
            else:
                port = next(spare)  # nothing listens: connection refused
            specs.append(
                NodeSpec(
                    name=name,
                    peer_port=next(spare),
                    api_port=port,
                    platform=PlatformSpec(id=f"platform-{i}"),
                )
            )
        self.config = ClusterConfig(
            state_dir=state_dir, nodes=specs, mqtt=MqttSpec(url="mqtt://127.0.0.1:1")
        )
        self.thread.start()
        for name, sock in sockets.items():
            asyncio.run_coroutine_threadsafe(self._serve(name, sock), self.loop).result(10)

    async def _serve(self, name: str, sock: socket.socket) -> None:
        runner = web.AppRunner(make_app(name, self.state), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self.runners.append(runner)

    def close(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def requests(self, path: str | None = None) -> list[Recorded]:
        return [r for r in self.state.requests if path is None or r.path == path]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    fake = FakeCluster(["km1", "km2", "km3"], [], tmp_path / "full" / "state")
    yield fake
    fake.close()


@pytest.fixture
def partial(tmp_path: Path) -> Iterator[FakeCluster]:
    """km1 is down (connection refused); km2 leads; km3 follows."""
    fake = FakeCluster(["km2", "km3"], ["km1"], tmp_path / "partial" / "state")
    fake.state.leader = "km2"
    yield fake
    fake.close()


#: The real kmctl, with every command registered as users get it.
kmctl_group = cli


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def kmctl(fake: FakeCluster, *args: str) -> Result:
    path = fake.config.state_dir.parent / "cluster.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(fake.config.model_dump(mode="json")))
    result = CliRunner().invoke(kmctl_group, ["-c", str(path), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


# --- the client -----------------------------------------------------------------------------


def test_write_on_a_follower_is_retried_once_on_the_named_leader(cluster: FakeCluster) -> None:
    res = kmctl(cluster, "keys", "create", "disk", "--node", "km3", "--allow-service", MEASUREMENT)
    assert res.code == 0, res.err
    assert "created key disk (generation 1)" in res.out
    sent = cluster.requests("/v1/keys")
    assert [(r.node, r.method) for r in sent] == [("km3", "POST"), ("km1", "POST")]
    assert sent[0].body == sent[1].body == {"name": "disk", "allowed_service": [MEASUREMENT]}


def test_unknown_leader_retries_the_same_node_once_then_fails(cluster: FakeCluster) -> None:
    cluster.state.leader = None
    res = kmctl(cluster, "keys", "create", "disk", "--node", "km2")
    assert res.code == 3
    assert [r.node for r in cluster.requests("/v1/keys")] == ["km2", "km2"]
    assert "not the leader either" in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_second_421_from_the_named_leader_is_not_followed_again(cluster: FakeCluster) -> None:
    cluster.state.inject[("km1", "/v1/keys")] = (
        421,
        {"error": "not the leader", "code": "not_leader", "leader": "km2", "leader_api": None},
    )
    res = kmctl(cluster, "keys", "create", "disk", "--node", "km3")
    assert res.code == 3
    assert [r.node for r in cluster.requests("/v1/keys")] == ["km3", "km1"]


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [
        (400, "bad_request", 2),
        (404, "not_found", 2),
        (409, "refused", 1),
        (503, "not_ready", 3),
        (504, "timeout", 3),
        (500, "internal", 3),
    ],
)
def test_api_errors_map_to_exit_codes(
    cluster: FakeCluster, status: int, code: str, exit_code: int
) -> None:
    cluster.state.inject[("km1", "/v1/keys")] = (status, {"error": f"said {code}", "code": code})
    res = kmctl(cluster, "keys", "list")
    assert res.code == exit_code
    assert (
        res.err.strip() == f"kmctl: error: {'refused: ' if status == 409 else ''}said {code} "
        f"(HTTP {status} {code} from km1)"
    )


def test_existing_key_is_refused_with_exit_1(cluster: FakeCluster) -> None:
    assert kmctl(cluster, "keys", "create", "disk").code == 0
    res = kmctl(cluster, "keys", "create", "disk")
    assert res.code == 1
    assert "refused: key 'disk' already exists" in res.err


def test_server_side_validation_error_is_a_usage_error(cluster: FakeCluster) -> None:
    res = kmctl(cluster, "keys", "create", "Not-A-Name")
    assert res.code == 2
    assert "bad_request" in res.err


def test_non_json_answer_is_an_environment_failure(cluster: FakeCluster) -> None:
    cluster.state.inject[("km1", "/v1/policy")] = (502, "<html>bad gateway</html>")
    res = kmctl(cluster, "policy", "get")
    assert res.code == 3
    assert "not JSON" in res.err


def test_unreachable_named_node_is_one_clear_line(partial: FakeCluster) -> None:
    port = partial.config.node("km1").api_port
    res = kmctl(partial, "keys", "list", "--node", "km1")
    assert res.code == 3
    assert res.err == (
        f"kmctl: error: node km1 at 127.0.0.1:{port} is not reachable: "
        "is the cluster up? (kmctl up)\n"
    )


def test_default_node_is_the_first_reachable_one(partial: FakeCluster) -> None:
    res = kmctl(partial, "keys", "list", "--json")
    assert res.code == 0
    assert res.json() == {"keys": []}
    assert [r.node for r in partial.requests("/v1/keys")] == ["km2"]


def test_no_reachable_node_names_them_all(tmp_path: Path) -> None:
    fake = FakeCluster([], ["km1", "km2"], tmp_path / "state")
    try:
        res = kmctl(fake, "members", "list")
    finally:
        fake.close()
    assert res.code == 3
    assert "no node of cluster 'demo' is reachable (km1 at 127.0.0.1:" in res.err
    assert "km2 at 127.0.0.1:" in res.err


def test_client_follows_leader_api_url_directly(cluster: FakeCluster) -> None:
    client = NodeClient.for_node(cluster.config.node("km2"))
    assert client.post("/v1/keys", {"name": "k"}) == {"key": "k", "generation": 1}
    assert ClusterClient(cluster.config).get("/v1/keys/k")["generation"] == 1
    with pytest.raises(ApiError) as info:
        client.post("/v1/keys", {"name": "k"})
    assert (info.value.status, info.value.code, info.value.exit_code) == (409, "refused", 1)


def test_unreachable_error_types(partial: FakeCluster) -> None:
    with pytest.raises(NodeUnreachable) as info:
        NodeClient.for_node(partial.config.node("km1")).get("/v1/status")
    assert info.value.exit_code == 3
    with pytest.raises(KmsimError):
        ClusterClient(partial.config, "nope")


def test_a_port_that_does_not_speak_http_is_one_clear_error() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        with pytest.raises(KmsimError) as info:
            NodeClient("km1", f"http://127.0.0.1:{port}", timeout=5).get("/v1/status")
        thread.join(5)
    assert info.value.exit_code == 3
    assert f"127.0.0.1:{port} (node km1) did not answer in HTTP" in info.value.message


# --- commands -------------------------------------------------------------------------------


def test_keys_list_show_rotate(cluster: FakeCluster) -> None:
    kmctl(cluster, "keys", "create", "disk")
    assert (
        kmctl(cluster, "keys", "rotate", "disk").out.strip() == "rotated key disk to generation 2"
    )
    listed = kmctl(cluster, "keys", "list", "--json", "--linearizable")
    assert listed.json()["keys"][0]["generation"] == 2
    assert cluster.requests("/v1/keys")[-1].query == {"linearizable": "1"}
    table = kmctl(cluster, "keys", "list")
    assert "disk" in table.out and "(policy default)" in table.out
    shown = kmctl(cluster, "keys", "show", "disk", "--json")
    assert shown.json()["fingerprints"] == {"1": "01" * 16, "2": "02" * 16}
    assert "fingerprint g2" in kmctl(cluster, "keys", "show", "disk", "--node", "km2").out
    missing = kmctl(cluster, "keys", "show", "nope")
    assert missing.code == 2 and "no key 'nope'" in missing.err


def test_bad_measurement_is_refused_before_any_request(cluster: FakeCluster) -> None:
    res = kmctl(cluster, "keys", "create", "disk", "--allow-service", "xyz")
    assert res.code == 2
    assert cluster.requests() == []
    assert kmctl(cluster, "policy", "allow", "--role", "km", "ab" * 31).code == 2
    assert cluster.requests() == []


def test_release_to_all_reports_each_node_and_exits_1_on_refusal(cluster: FakeCluster) -> None:
    kmctl(cluster, "keys", "create", "disk")
    res = kmctl(cluster, "keys", "release", "disk", "--all", "--generation", "1", "--json")
    assert res.code == 1
    assert [r["status"] for r in res.json()["releases"]] == [
        "provisioned",
        "provisioned",
        "refused",
    ]
    assert cluster.requests("/v1/keys/disk/release")[0].body == {
        "node": "all",
        "generation": 1,
        "timeout": 10.0,
    }
    one = kmctl(cluster, "keys", "release", "disk", "--to", "km2", "--wait", "2")
    assert one.code == 0 and "provisioned" in one.out
    assert cluster.requests("/v1/keys/disk/release")[-1].body == {"node": "km2", "timeout": 2.0}
    assert kmctl(cluster, "keys", "release", "disk").code == 2
    assert kmctl(cluster, "keys", "release", "disk", "--to", "km1", "--all").code == 2
    listed = kmctl(cluster, "releases", "list", "--key", "disk", "--json")
    assert len(listed.json()["releases"]) == 4
    assert cluster.requests("/v1/releases")[-1].query == {"key": "disk"}


def test_policy_get_and_allow(cluster: FakeCluster) -> None:
    table = kmctl(cluster, "policy", "get")
    assert table.code == 0 and "measurements.service" in table.out
    new = "CD" * 32
    res = kmctl(cluster, "policy", "allow", "--role", "service", new, "--node", "km2")
    assert res.code == 0 and res.out.strip() == (
        f"allowed service {new.lower()} (proposal p9 passed with 1 of 1 admin votes)"
    )
    assert cluster.requests("/v1/policy/allow")[-1].body == {
        "role": "service",
        "measurement": new.lower(),
    }
    assert (
        new.lower() in kmctl(cluster, "policy", "get", "--json").json()["measurements"]["service"]
    )


def test_members_list_and_remove(cluster: FakeCluster) -> None:
    table = kmctl(cluster, "members", "list")
    assert table.code == 0 and "platform-3" in table.out
    assert kmctl(cluster, "members", "remove", "km3").code == 0
    assert cluster.requests("/v1/members/remove")[-1].body == {"name": "km3"}
    assert [m["name"] for m in kmctl(cluster, "members", "list", "--json").json()["members"]] == [
        "km1",
        "km2",
    ]


def test_attest_show_asks_the_named_node(cluster: FakeCluster) -> None:
    res = kmctl(cluster, "attest", "show", "km2")
    assert res.code == 0
    assert "quote of km2 (400 bytes): accepted\n" in res.out
    assert [r.node for r in cluster.requests("/v1/attest")] == ["km2"]
    refused = {
        "accepted": False,
        "error": "PlatformRevoked: 'platform-3' is revoked",
        "checks": [{"check": "format", "detail": "parses"}],
    }
    cluster.state.inject[("km3", "/v1/attest")] = (
        200,
        {"node": "km3", "quote": "00", "identity": {}, "verification": refused},
    )
    res = kmctl(cluster, "attest", "show", "km3")
    assert res.code == 1
    assert "PlatformRevoked" in res.out and "quote of km3 (1 bytes): REFUSED" in res.out


def test_prove_on_every_node(cluster: FakeCluster) -> None:
    res = kmctl(cluster, "prove", "disk", "--generation", "2", "--challenge", "AA01", "--all")
    assert res.code == 0 and "all nodes agree" in res.out
    assert [r.node for r in cluster.requests("/v1/service/prove")] == ["km1", "km2", "km3"]
    assert cluster.requests("/v1/service/prove")[0].body == {
        "key": "disk",
        "generation": 2,
        "challenge": "aa01",
    }
    one = kmctl(cluster, "prove", "disk", "--generation", "1", "--challenge", "00", "--node", "km3")
    assert one.out.strip() == "km3: mac disk-1-00"
    assert kmctl(cluster, "prove", "disk", "--generation", "1", "--challenge", "zz").code == 2


def test_prove_all_reports_a_down_node(partial: FakeCluster) -> None:
    res = kmctl(partial, "prove", "k", "--generation", "1", "--challenge", "00", "--all", "--json")
    assert res.code == 3
    report = res.json()
    assert report["agree"] is False
    assert [r["mac"] is None for r in report["results"]] == [True, False, False]


def test_status_all_ready_exits_0_and_a_down_node_exits_1(
    cluster: FakeCluster, partial: FakeCluster
) -> None:
    ok = kmctl(cluster, "status", "--json")
    assert ok.code == 0
    assert [n["state"] for n in ok.json()["nodes"]] == ["ready"] * 3
    degraded = kmctl(partial, "status")
    assert degraded.code == 1
    assert re.search(r"km1\s*│\s*down", degraded.out)
    assert re.search(r"km2\s*│\s*ready", degraded.out)


def test_node_run_calls_run_node_with_the_config(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[ClusterConfig, str]] = []

    def run_node(cfg: ClusterConfig, name: str) -> int:
        calls.append((cfg, name))
        return 7

    fake_module = types.ModuleType("kmnode.host.run")
    fake_module.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kmnode.host.run", fake_module)
    assert kmctl(cluster, "node", "run", "km2").code == 7
    assert [(c.cluster, n) for c, n in calls] == [("demo", "km2")]
    assert kmctl(cluster, "node", "run", "km9").code == 2


def test_up_n_selects_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KMSIM_CONFIG", raising=False)
    assert [n.name for n in select_nodes(CliContext(None), 5).nodes] == [
        "km1",
        "km2",
        "km3",
        "km4",
        "km5",
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(ClusterConfig.default(3).model_dump(mode="json")))
    assert [n.name for n in select_nodes(CliContext(path), 2).nodes] == ["km1", "km2"]
    with pytest.raises(CliError) as info:
        select_nodes(CliContext(path), 4)
    assert info.value.exit_code == 2 and "defines only 3 nodes" in info.value.message


def test_status_uses_the_effective_config_of_the_running_cluster(cluster: FakeCluster) -> None:
    bigger = cluster.config.model_copy(update={"state_dir": cluster.config.state_dir})
    supervisor.write_effective_config(bigger.model_copy(update={"nodes": bigger.nodes[:2]}))
    res = kmctl(cluster, "status", "--json")
    assert [n["node"] for n in res.json()["nodes"]] == ["km1", "km2"]


HELP_COMMANDS = [
    ["up"], ["down"], ["status"], ["node", "run"], ["keys", "create"], ["keys", "list"],
    ["keys", "show"], ["keys", "rotate"], ["keys", "release"], ["policy", "get"],
    ["policy", "allow"], ["policy", "disallow"], ["policy", "revoke-platform"],
    ["members", "list"], ["members", "remove"], ["members", "replace"], ["releases", "list"],
    ["attest", "show"], ["prove"], ["recovery", "status"], ["recovery", "share", "show"],
    ["recovery", "submit"], ["recovery", "threshold"], ["snapshot", "save"],
    ["snapshot", "restore"], ["dashboard"], ["hardware", "show"], ["hardware", "export"],
    ["hardware", "import"],
]  # fmt: skip


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_command_explains_itself(command: list[str]) -> None:
    result = CliRunner().invoke(kmctl_group, [*command, "--help"])
    assert result.exit_code == 0
    summary = result.stdout.split("\n\n")[1].strip()
    assert len(summary) > 20, summary


def test_keys_list_follows_the_pages_to_the_last_key(cluster: FakeCluster) -> None:
    for name in ("e", "a", "d", "b", "c"):
        assert kmctl(cluster, "keys", "create", name).code == 0
    listed = kmctl(cluster, "keys", "list", "--json").json()
    assert [k["name"] for k in listed["keys"]] == ["a", "b", "c", "d", "e"]
    assert len(cluster.requests("/v1/keys")) >= 3 + 5  # three pages (and five creates)
