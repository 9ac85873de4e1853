"""The dashboard's aggregation and its server, without a cluster (issue 17, items 5 and 6).

Rates come from two polls; the link graph from what each end reports; nodes that do not
answer, answer late, answer as another node or answer garbage show as down or in error and
never as data; audit records from MQTT are bounded and shown as text; the server is read-only,
loopback-only by default and sends its content security policy; `kmctl status --watch` draws
the status table once per refresh and keeps the status exit codes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.config import ClusterConfig
from kmnode.dashboard.audit import KEEP, SUMMARY_CHARS, AuditFeed
from kmnode.dashboard.model import (
    Figures,
    NodeSample,
    NodeStatus,
    aggregate,
    parse_metrics,
    rate,
)
from kmnode.dashboard.poll import MAX_STATUS_BYTES, sample_node
from kmnode.dashboard.server import Dashboard, url_of
from kmnode.host.broker import BrokerAddress
from tests.ports import free_ports

NAMES = ["km1", "km2", "km3"]

SCRAPE = """\
# HELP kmsim_releases_total Releases in the replicated state by outcome and reason.
# TYPE kmsim_releases_total counter
kmsim_releases_total{outcome="provisioned",reason="none"} 30.0
kmsim_releases_total{outcome="refused",reason="policy"} 2.0
# TYPE kmsim_attestation_failures_total counter
kmsim_attestation_failures_total{reason="UnknownPeer"} 2.0
kmsim_attestation_failures_total{reason="BadQuote"} 1.0
# TYPE kmsim_release_latency_seconds histogram
kmsim_release_latency_seconds_bucket{le="+Inf"} 32.0
kmsim_release_latency_seconds_count 32.0
kmsim_release_latency_seconds_sum 0.64
# TYPE kmsim_service_ring_fill_bytes gauge
kmsim_service_ring_fill_bytes 262144.0
# TYPE kmsim_service_ring_capacity_bytes gauge
kmsim_service_ring_capacity_bytes 1.048576e+06
"""


def status(
    name: str, role: str = "follower", leader: str | None = "km1", **more: Any
) -> NodeStatus:
    peers = more.pop("peers", [n for n in NAMES if n != name])
    body = {
        "node": name,
        "ready": True,
        "role": role,
        "leader": leader,
        "term": 3,
        "commit": 10,
        "applied": 10,
        "peers": {p: {"attested": True, "platform_id": "x"} for p in peers},
        "service": {"running": True},
        **more,
    }
    return NodeStatus.model_validate_json(json.dumps(body))


def sample(name: str, at: float, figures: Figures | None = None, **more: Any) -> NodeSample:
    role = "leader" if name == "km1" else "follower"
    return NodeSample(name, at, status=status(name, role, **more), figures=figures)


def healthy(at: float, releases: float, failures: float = 0.0) -> dict[str, NodeSample]:
    figures = Figures(releases=releases, attestation_failures=failures)
    return {n: sample(n, at, figures) for n in NAMES}


# --- metrics and rates ------------------------------------------------------------------------


def test_a_scrape_is_summed_over_its_labels() -> None:
    figures = parse_metrics(SCRAPE)
    assert figures.releases == 32 and figures.attestation_failures == 3
    assert figures.latency_count == 32 and figures.latency_sum == pytest.approx(0.64)
    assert figures.ring_fill_bytes == 262144 and figures.ring_capacity_bytes == 1048576


def test_a_lying_scrape_is_ignored_and_garbage_refused() -> None:
    lies = "kmsim_releases_total NaN\nkmsim_attestation_failures_total -5\n"
    lies += "kmsim_service_ring_fill_bytes +Inf\n"
    assert parse_metrics(lies) == Figures()
    with pytest.raises(ValueError):
        parse_metrics('kmsim_releases_total{outcome="x" 1\n')


def test_rates_come_from_two_polls_and_survive_a_restart() -> None:
    assert rate(10, 40, 2.0) == 15
    assert rate(40, 6, 2.0) == 3  # the counter restarted from zero
    assert rate(None, 5, 1.0) is None and rate(1, 5, 0.0) is None

    first = aggregate("demo", NAMES, healthy(100.0, 30, failures=1), {})
    assert first.release_rate is None and first.nodes[0].release_rate is None  # one poll only
    second_samples = healthy(102.0, 50, failures=5)
    second = aggregate("demo", NAMES, second_samples, healthy(100.0, 30, failures=1))
    assert second.release_rate == 10
    assert [n.attestation_failure_rate for n in second.nodes] == [2, 2, 2]
    assert second.attestation_failure_rate == 6  # each node counts its own refusals: summed


def test_the_cluster_rate_is_the_leaders_and_latency_is_the_mean_of_the_interval() -> None:
    before = {
        "km1": sample("km1", 0.0, Figures(releases=10, latency_sum=1.0, latency_count=10)),
        "km2": sample("km2", 0.0, Figures(releases=0)),  # catching up: a burst, not the rate
    }
    now = {
        "km1": sample("km1", 1.0, Figures(releases=14, latency_sum=1.2, latency_count=14)),
        "km2": sample("km2", 1.0, Figures(releases=14)),
    }
    view = aggregate("demo", ["km1", "km2"], now, before)
    assert view.release_rate == 4
    assert view.nodes[0].release_latency_ms == pytest.approx(50.0)
    assert view.nodes[1].release_rate == 14 and view.nodes[1].release_latency_ms is None


def test_ring_fill_is_a_fraction_of_the_capacity() -> None:
    figures = parse_metrics(SCRAPE)
    view = aggregate("demo", ["km1"], {"km1": sample("km1", 0.0, figures)}, {})
    assert view.nodes[0].ring_fill == pytest.approx(0.25)
    lying = Figures(ring_fill_bytes=5e9, ring_capacity_bytes=1.0)
    view = aggregate("demo", ["km1"], {"km1": sample("km1", 0.0, lying)}, {})
    assert view.nodes[0].ring_fill == 1.0


# --- the graph, leaders and down nodes ----------------------------------------------------------


def link_states(view: Any) -> dict[str, str]:
    return {f"{link.a}-{link.b}": link.state for link in view.links}


def test_links_are_up_one_way_or_down_from_both_ends() -> None:
    now = {
        "km1": sample("km1", 0.0, peers=["km2", "km3"]),
        "km2": sample("km2", 0.0, peers=["km1"]),
        "km3": sample("km3", 0.0, peers=[]),
    }
    view = aggregate("demo", NAMES, now, {})
    assert link_states(view) == {"km1-km2": "up", "km1-km3": "one-way", "km2-km3": "down"}


def test_a_node_that_does_not_answer_is_down_with_its_links() -> None:
    now = healthy(0.0, 1)
    now["km1"] = NodeSample("km1", 0.0, error="not reachable (ClientConnectorError)", down=True)
    view = aggregate("demo", NAMES, now, healthy(-1.0, 1))
    km1 = view.nodes[0]
    assert km1.state == "down" and "not reachable" in km1.detail
    assert km1.role is None and km1.release_rate is None
    assert link_states(view) == {"km1-km2": "down", "km1-km3": "down", "km2-km3": "up"}
    # The others still name km1 as the leader; nobody answering leads: no leader is shown.
    assert view.leader is None and view.term == 3


def test_a_node_missing_from_the_poll_is_down_and_a_bad_answer_is_an_error() -> None:
    now = {"km2": NodeSample("km2", 0.0, error="answered HTTP 500")}
    view = aggregate("demo", NAMES, now, {})
    assert [(n.name, n.state) for n in view.nodes] == [
        ("km1", "down"),
        ("km2", "error"),
        ("km3", "down"),
    ]
    assert all(link.state == "down" for link in view.links)


def test_the_leader_of_the_highest_term_wins_over_a_stale_one() -> None:
    now = {
        "km1": sample("km1", 0.0, term=3),  # cut off: still thinks it leads
        "km2": NodeSample("km2", 0.0, status=status("km2", "leader", "km2", term=4)),
        "km3": NodeSample("km3", 0.0, status=status("km3", "follower", "km2", term=4)),
    }
    view = aggregate("demo", NAMES, now, {})
    assert view.leader == "km2" and view.term == 4


def test_readiness_states_follow_the_status() -> None:
    now = {
        "km1": sample("km1", 0.0),
        "km2": NodeSample("km2", 0.0, status=status("km2", ready=False, leader=None, peers=[])),
        "km3": NodeSample("km3", 0.0, status=status("km3", ready=False, recovering=True)),
    }
    view = aggregate("demo", NAMES, now, {})
    assert [n.state for n in view.nodes] == ["ready", "not ready", "recovering"]
    assert "waiting for a leader" in view.nodes[1].detail


@pytest.mark.parametrize(
    "body",
    [
        {"term": "3"},
        {"commit": -1},
        {"ready": "yes"},
        {"peers": ["km2"]},
        {"peers": {"km2": {"attested": 1}}},
        {"role": "x" * 65},
        {"peers": {f"n{i}": {"attested": True} for i in range(300)}},
    ],
    ids=["term-text", "negative", "ready-text", "peers-list", "attested-int", "long", "many"],
)
def test_a_status_of_another_shape_is_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        NodeStatus.model_validate_json(json.dumps(body))


# --- polling real HTTP ----------------------------------------------------------------------------

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def config(tmp_path: Path, ports: list[int]) -> ClusterConfig:
    data = ClusterConfig.default(len(ports)).model_dump(mode="json")
    peers = free_ports(len(ports) + 1)
    for node, api, peer in zip(data["nodes"], ports, peers, strict=False):
        node["api_port"], node["peer_port"] = api, peer
    data["mqtt"]["embedded_port"] = peers[-1]
    data["state_dir"] = str(tmp_path / "state")
    return ClusterConfig.model_validate(data)


@pytest.fixture
async def fake_node() -> AsyncIterator[Callable[[Route, Route], Awaitable[int]]]:
    """Starts a node's two open routes on a free port; every one stopped at the end."""
    runners: list[web.AppRunner] = []

    async def start(status_route: Route, metrics_route: Route) -> int:
        app = web.Application()
        app.router.add_get("/v1/status", status_route)
        app.router.add_get("/metrics", metrics_route)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def answer(body: Any, code: int = 200) -> Route:
    async def route(request: web.Request) -> web.StreamResponse:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(body=data, status=code)

    return route


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(30)  # cut short: the test's server is cleaned up after the poll
    return web.Response()


GOOD = {"node": "km1", "ready": True, "role": "leader", "leader": "km1", "term": 2}


async def poll(tmp_path: Path, port: int, timeout: float = 2.0) -> NodeSample:
    node = config(tmp_path, [port]).nodes[0]
    async with aiohttp.ClientSession() as session:
        return await sample_node(session, node, timeout)


async def test_a_node_is_read_from_its_status_and_metrics(
    tmp_path: Path, fake_node: Callable[[Route, Route], Awaitable[int]]
) -> None:
    port = await fake_node(answer(GOOD), answer(SCRAPE.encode()))
    got = await poll(tmp_path, port)
    assert got.status is not None and got.status.role == "leader" and got.error is None
    assert got.figures is not None and got.figures.releases == 32


async def test_garbage_metrics_leave_the_status_and_drop_the_rates(
    tmp_path: Path, fake_node: Callable[[Route, Route], Awaitable[int]]
) -> None:
    for metrics in (answer(b"\xff\xfe not prometheus {"), answer(b"", 500)):
        port = await fake_node(answer(GOOD), metrics)
        got = await poll(tmp_path, port)
        assert got.status is not None and got.figures is None


@pytest.mark.parametrize(
    ("route", "expected", "down"),
    [
        (answer({"error": "boom"}, 500), "answered HTTP 500", False),
        (answer(b"not json"), "another shape", False),
        (answer({**GOOD, "node": "km9"}), "answers as node 'km9'", False),
        (answer(b" " * (MAX_STATUS_BYTES + 1)), "more than", False),
        (slow, "no answer within 0.3s", True),
    ],
    ids=["http-500", "not-json", "impostor", "oversize", "silent"],
)
async def test_a_bad_or_silent_node_is_shown_so_and_never_read(
    tmp_path: Path,
    fake_node: Callable[[Route, Route], Awaitable[int]],
    route: Route,
    expected: str,
    down: bool,
) -> None:
    port = await fake_node(route, answer(SCRAPE.encode()))
    got = await poll(tmp_path, port, timeout=0.3)
    assert got.status is None and got.down is down
    assert got.error is not None and expected in got.error


async def test_a_closed_port_is_down(tmp_path: Path) -> None:
    got = await poll(tmp_path, free_ports(1)[0])
    assert got.down and got.error is not None and got.error.startswith("not reachable")


# --- audit records ----------------------------------------------------------------------------


def feed() -> AuditFeed:
    return AuditFeed(BrokerAddress("127.0.0.1", 1, False), "kmsim", "demo")


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_audit_records_are_unpacked_bounded_and_newest_first() -> None:
    audit = feed()
    for i in range(KEEP + 5):
        record = {"release": f"r{i}", "key": "k", "status": "provisioned"}
        audit.take("kmsim/demo/km1/audit", json.dumps(record).encode(), NOW)
    batch = {"records": [{"release": "rA", "status": "refused"}, {"release": "rB"}]}
    audit.take("kmsim/demo/km2/audit", json.dumps(batch).encode(), NOW)
    records = audit.state().records
    assert len(records) == KEEP
    assert [json.loads(r.summary)["release"] for r in records[:3]] == ["rB", "rA", "r24"]
    assert records[1].status == "refused" and records[1].node == "km2"
    assert records[0].time == "03:04:05"


def test_audit_takes_only_this_clusters_audit_topic_and_bounds_what_it_keeps() -> None:
    audit = feed()
    audit.take("kmsim/other/km1/audit", b'{"release": "r1"}', NOW)
    audit.take("kmsim/demo/km1/events", b'{"event": "x"}', NOW)
    assert audit.state().records == []
    audit.take("kmsim/demo/km1/audit", b"\xff<script>alert(1)</script>" + b"x" * 1000, NOW)
    audit.take("kmsim/demo/km1/audit", b"y" * (2 << 20), NOW)
    oversize, text = audit.state().records
    assert oversize.summary == f"<{2 << 20} bytes, not shown>"
    assert len(text.summary) == SUMMARY_CHARS and text.summary.endswith("…")
    assert text.summary.startswith("\ufffd<script>") and text.status is None


def test_audit_says_when_the_broker_cannot_be_reached() -> None:
    async def run() -> str | None:
        audit = AuditFeed(BrokerAddress("127.0.0.1", free_ports(1)[0], False), "kmsim", "demo")
        task = asyncio.create_task(audit.run())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if audit.error and "cannot reach" in audit.error:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not audit.state().connected
        return audit.error

    error = asyncio.run(run())
    assert error is not None and "cannot reach the MQTT broker at 127.0.0.1" in error


# --- the server ---------------------------------------------------------------------------------


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[str]:
    """The dashboard's app (its poll never run: every node is down) on a free port."""
    dashboard = Dashboard(config(tmp_path, free_ports(3)))
    runner = web.AppRunner(dashboard.app("127.0.0.1"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield url_of(runner.addresses[0])
    await runner.cleanup()


async def test_the_page_and_its_view_are_served_under_a_strict_policy(page_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(page_server) as response:
            assert response.status == 200 and "text/html" in response.content_type
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert 'src="/app.js"' in await response.text()
        for path, kind in (("app.js", "javascript"), ("app.css", "css")):
            async with session.get(page_server + path) as response:
                assert response.status == 200 and kind in response.content_type
        async with session.get(page_server + "api/cluster") as response:
            page = await response.json()
    assert page["interval"] == 1.0
    assert [n["state"] for n in page["view"]["nodes"]] == ["down"] * 3
    assert page["view"]["leader"] is None and len(page["view"]["links"]) == 3
    assert page["audit"]["connected"] is False and page["audit"]["records"] == []


async def test_the_server_is_read_only_and_answers_only_loopback_names(page_server: str) -> None:
    async with aiohttp.ClientSession() as session:
        for method in ("POST", "PUT", "DELETE"):
            async with session.request(method, page_server + "api/cluster") as response:
                assert response.status == 405
        rebound = {"Host": "attacker.example"}
        async with session.get(page_server + "api/cluster", headers=rebound) as response:
            assert response.status == 421
        async with session.get(page_server + "../../etc/passwd") as response:
            assert response.status == 404
        port = page_server.rsplit(":", 1)[1].rstrip("/")
        async with session.get(page_server, headers={"Host": f"localhost:{port}"}) as response:
            assert response.status == 200


# --- kmctl status --watch -----------------------------------------------------------------------


def kmctl_status(tmp_path: Path, *args: str) -> Any:
    path = tmp_path / "cluster.yaml"
    path.write_text(json.dumps(config(tmp_path, free_ports(3)).model_dump(mode="json")))
    return CliRunner().invoke(cli, ["-c", str(path), "status", *args])


def test_status_watch_redraws_the_table_and_keeps_the_exit_codes(tmp_path: Path) -> None:
    result = kmctl_status(tmp_path, "--watch", "--interval", "0.1", "--count", "2")
    assert result.exit_code == 3, result.output  # no node answers (as every command exits)
    assert result.stdout.count("cluster 'demo'") == 2
    assert len(re.findall(r"km2\s*│\s*down", result.stdout)) == 2
    assert "every 0.1s; Ctrl-C stops" in result.stdout


def test_status_watch_is_for_people(tmp_path: Path) -> None:
    result = kmctl_status(tmp_path, "--watch", "--json")
    assert result.exit_code == 2 and "--watch" in result.stderr
