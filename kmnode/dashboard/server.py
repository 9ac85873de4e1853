"""The dashboard's web server: the page, its JSON view, and the loop that keeps the view fresh.

One poll loop serves every viewer (a page open in ten tabs does not ask the nodes ten times),
and rates are taken between its rounds. The server is read-only (GET only) and by default
binds the loopback; on a loopback address it answers only requests whose Host header is a
loopback name, so a web site the operator visits cannot read the page by DNS rebinding. The
page runs under a content security policy that allows only its own script, style and JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from kmnode.config import ClusterConfig
from kmnode.dashboard.audit import AuditFeed, AuditState
from kmnode.dashboard.model import ClusterView, NodeSample, aggregate
from kmnode.dashboard.poll import TIMEOUT_S, sample_all
from kmnode.host.broker import broker_address

POLL_INTERVAL_S = 1.0
#: The page's files: (route, file under static/, content type).
_FILES = (
    ("/", "index.html", "text/html"),
    ("/app.js", "app.js", "text/javascript"),
    ("/app.css", "app.css", "text/css"),
    ("/favicon.svg", "favicon.svg", "image/svg+xml"),
)
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Page:
    """What ``GET /api/cluster`` answers."""

    view: ClusterView
    audit: AuditState
    #: Seconds between the server's polls (the page polls at the same pace).
    interval: float


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The poll loop and the audit feed of one cluster, and the app that shows them."""

    def __init__(
        self, cfg: ClusterConfig, interval: float = POLL_INTERVAL_S, timeout: float = TIMEOUT_S
    ) -> None:
        self.cfg, self.interval, self.timeout = cfg, interval, timeout
        self.names = [n.name for n in cfg.nodes]
        mqtt = cfg.mqtt
        self.audit = AuditFeed(broker_address(mqtt), mqtt.topic_prefix, cfg.cluster)
        self.view = aggregate(cfg.cluster, self.names, {}, {})
        self._samples: dict[str, NodeSample] = {}

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        samples = await sample_all(session, self.cfg.nodes, self.timeout)
        self.view = aggregate(self.cfg.cluster, self.names, samples, self._samples)
        self._samples = samples

    async def poll_forever(self, session: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll_once(session)
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def page(self) -> Page:
        return Page(self.view, self.audit.state(), self.interval)

    def app(self, bound_host: str) -> web.Application:
        app = web.Application(middlewares=[_guard(bound_host)])
        for route, name, kind in _FILES:
            body = files("kmnode.dashboard").joinpath("static", name).read_bytes()
            app.router.add_get(route, _static(body, kind))
        app.router.add_get("/api/cluster", self._cluster)
        return app

    async def _cluster(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self.page()))


def _static(body: bytes, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=kind, charset="utf-8")

    return handler


def _guard(bound_host: str) -> Middleware:
    """Security headers on every answer; on a loopback bind, loopback Host headers only."""
    loopback = is_loopback(bound_host)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback and _host_name(request.host) not in _LOOPBACK_NAMES | {bound_host}:
            response: web.StreamResponse = web.Response(
                status=421, text="this dashboard answers only on its loopback address\n"
            )
        else:
            response = await handler(request)
        response.headers.update(_HEADERS)
        return response

    return guard


def _host_name(host: str) -> str:
    """The name of a Host header, without its port (``[::1]:80`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def url_of(address: Any) -> str:
    """The page's URL from a bound socket address (an IPv6 one in brackets)."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve(
    cfg: ClusterConfig,
    host: str,
    port: int,
    ready: Callable[[str], None],
    stop: asyncio.Event,
    interval: float = POLL_INTERVAL_S,
) -> None:
    """Serve the page until ``stop`` is set, then close everything it opened.

    The first poll runs before the server listens, so the page never shows a made-up state;
    ``ready`` gets the URL once it listens. An address that cannot be bound raises OSError.
    """
    dashboard = Dashboard(cfg, interval)
    connector = aiohttp.TCPConnector(limit_per_host=4)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        audit = asyncio.create_task(dashboard.audit.run(), name="dashboard-audit")
        # A Ctrl-C must not wait long for a page's request in flight (each takes milliseconds).
        runner = web.AppRunner(dashboard.app(host), access_log=None, shutdown_timeout=1.0)
        try:
            await dashboard.poll_once(session)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            ready(url_of(runner.addresses[0]))
            poller = asyncio.create_task(dashboard.poll_forever(session), name="dashboard-poll")
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({poller, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (poller, stopping):
                    task.cancel()
                await asyncio.gather(poller, stopping, return_exceptions=True)
            if not poller.cancelled():  # the poll loop ends only by failing: say why
                poller.result()
        finally:
            audit.cancel()
            await asyncio.gather(audit, return_exceptions=True)
            await runner.cleanup()
