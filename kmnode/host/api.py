"""The operator API (docs/operator-api.md): JSON over HTTP, served by every node's host.

Handlers are thin. Every route but ``/v1/status`` (open, for probes) and the chaos routes is
relayed to the KM enclave process as the client signed it (``ApiCall``: method, path and query,
the signature headers, the body's bytes); the enclave verifies the signature against its own
replicated identities, parses the request (``kmnode.api_routes``) and decides, and the host maps
its answer to a status code an operator can act on (401 unsigned or a bad signature, 403 a role
that may not, 409 refused or a replay, 421 with the leader's address, 504 when the outcome is
unknown). The host composes no KM command and reads no state itself. Nothing returned here
contains key material: keys are shown by fingerprint (a MAC), never by value.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from kmnode.api_routes import OPENAPI_PATH, ROUTES, Route
from kmnode.circuit import CircuitClosed
from kmnode.config import NodeSpec
from kmnode.host.chaos_api import add_chaos_routes
from kmnode.host.node import KMNode
from kmnode.host.observe import MONITORING_PATHS, Observer
from kmnode.identity import SIGNATURE_HEADERS
from kmnode.km_messages import (
    ApiCall,
    DataReply,
    Failed,
    FailureCode,
    HealLinks,
    LinkRulesRequest,
    Reply,
    Request,
    ServiceCrash,
    StatusReply,
    StatusRequest,
    UpdateLinkRule,
)
from kmnode.linkfaults import FaultRuleError

Handler = Callable[[web.Request], Awaitable[web.Response]]
#: The shipped OpenAPI document, read once (the host does not import its builder, which reads
#: the KM enclave's types: the host reaches the enclave through the circuit only).
_OPENAPI = importlib.resources.files("kmnode").joinpath("openapi.json").read_bytes()
R = TypeVar("R", bound=Reply)
#: HTTP status of each way the enclave can refuse a request.
_STATUS: dict[FailureCode, int] = {
    "not_leader": 421,
    "not_ready": 503,
    "refused": 409,
    "timeout": 504,
    "unavailable": 503,
    "not_found": 404,
    "bad_request": 400,
    "service_unavailable": 409,
    "internal": 500,
    "unsigned": 401,
    "bad_signature": 401,
    "unknown_identity": 401,
    "expired": 401,
    "forbidden": 403,
    "replay": 409,
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def _api_hosts(spec: NodeSpec) -> frozenset[str]:
    """The ``host:port`` names of a node's API (its listen and advertised addresses;
    ``localhost`` too when one is a loopback address)."""
    names = {spec.host, spec.address}
    with contextlib.suppress(ValueError):
        listening = [ipaddress.ip_address(n) for n in names if not _is_name(n)]
        # Every interface includes loopback (a published port, a port-forward).
        if any(a.is_loopback or a.is_unspecified for a in listening):
            names |= {"localhost", "127.0.0.1"}
    return frozenset(f"{name}:{spec.api_port}".lower() for name in names)


def _is_name(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return True
    return False


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class _RemoteLinkRules:
    """The chaos link rules, which live in the KM enclave process's peer transport."""

    def __init__(self, api: OperatorApi) -> None:
        self.api = api

    async def view(self) -> dict[str, Any]:
        data = await self.api.data(LinkRulesRequest())
        assert isinstance(data, dict)
        return data

    async def update(self, peer: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        try:
            data = await self.api.data(UpdateLinkRule(peer=peer, changes=dict(changes)))
        except Failed as exc:
            if exc.failure.code == "bad_request":
                raise FaultRuleError.restored(
                    exc.failure.field or "rule", exc.failure.message
                ) from None
            raise
        assert isinstance(data, dict)
        return data

    async def heal(self, peer: str | None) -> list[str]:
        data = await self.api.data(HealLinks(peer=peer))
        assert isinstance(data, list)
        return [str(p) for p in data]


class OperatorApi:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        #: The names a request may give as its Host (and, as http://..., its Origin): the
        #: node's address does not change while it runs, so they are worked out once.
        self._hosts = _api_hosts(node.config.node(node.name))
        self._origins = frozenset(f"http://{h}" for h in self._hosts)

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.node.config.limits.api_body_bytes,
            middlewares=[self._errors, self._same_origin],
        )
        app.router.add_get("/v1/status", self.status)
        Observer(self.node).routes(app)
        app.router.add_get(OPENAPI_PATH, self.openapi)
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self.relay(route))
        node = self.node
        add_chaos_routes(
            app,
            _RemoteLinkRules(self),
            node.ring_stall,
            self.crash_service,
            lambda: [n.name for n in node.config.nodes if n.name != node.name],
            self.authorize,
            node.poisoner,
            node.contracts.tamper,
            node.blobs.tamper,
        )
        node.contracts.mount(app)
        node.blobs.mount(app)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _json({"error": str(exc), "code": exc.code, **exc.extra}, exc.status)
        except Failed as exc:
            failure = exc.failure
            body: dict[str, Any] = {"error": failure.message, "code": failure.code}
            if failure.code == "not_leader":
                body.update(leader=failure.leader, leader_api=failure.leader_api)
            elif failure.code == "service_unavailable":
                body["code"] = "refused"
            if failure.field is not None:
                body["field"] = failure.field
            return _json(body, _STATUS[failure.code])
        except TimeoutError:
            return _json({"error": "the KM enclave did not answer in time", "code": "timeout"}, 504)
        except CircuitClosed as exc:
            return _json({"error": str(exc), "code": "unavailable"}, 503)
        except web.HTTPException as exc:
            return _json({"error": exc.reason, "code": "bad_request"}, exc.status)

    @web.middleware
    async def _same_origin(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A request must name this node as its ``Host`` (a page whose name an attacker
        re-pointed at 127.0.0.1, DNS rebinding, does not) and, if it comes from a browser, from
        a page of this node (``Origin``): no other site's page can drive the API."""
        host = request.headers.get("Host", "")
        # The monitoring routes answer whatever name a scraper or a probe uses (a pod IP, a
        # port-forward): they read public figures only, and a foreign page cannot read them.
        if host.lower() not in self._hosts and request.path not in MONITORING_PATHS:
            raise ApiError(403, "bad_host", f"Host {host[:100]!r} is not this node's address")
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in self._origins:
            raise ApiError(403, "bad_origin", f"requests from {origin[:100]!r} are not accepted")
        return await handler(request)

    # --- helpers ----------------------------------------------------------------------------

    async def ask(self, request: Request, reply_type: type[R]) -> R:
        return await self.node.km.call(request, reply_type)

    async def data(self, request: Request) -> Any:
        return (await self.ask(request, DataReply)).data

    # --- status and reads -------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        node = self.node
        km = await self.ask(StatusRequest(), StatusReply)
        stats = node.events.stats()
        return _json(
            {
                "node": km.node,
                "cluster": km.cluster,
                "ready": km.ready,
                **km.raft,
                "members": km.members,
                "peers": {
                    name: {"attested": True, "platform_id": platform}
                    for name, platform in km.peers.items()
                },
                "has_master_secret": km.has_master_secret,
                "mode": km.mode,
                "recovering": km.recovering,
                "service": {
                    **km.service,
                    # Challenged while a release to it was still being committed (the key
                    # itself only ever follows the commit).
                    "early_attestations": km.early_attestations,
                    "outputs": node.service_output.outputs,
                    # Fresh sealed rings granted after the service enclave reported a ring
                    # error (each one also a ``service.ring_failed`` event).
                    "ring_replacements": node.service_output.replacements,
                },
                "km_enclave": {
                    "pid": node.km.pid,
                    "circuit": node.config.enclave.circuit,
                    # What the host does for it: peer sockets and files (cluster.yaml
                    # ``enclave``); a peer that stopped reading is dropped, and counted.
                    "peer_sockets": node.config.enclave.peer_sockets,
                    "storage": node.config.enclave.storage,
                    "peer_connections_dropped_slow": node.km.sockets.dropped_slow,
                    "fsync_avg_ms": (
                        round(node.km.disks.fsync_avg_s * 1000, 3)
                        if node.km.disks is not None
                        else None
                    ),
                },
                "mqtt": {"published": stats.published, "dropped": stats.dropped},
                # Peer-link counters since start: drops, refusals and reconnects explain a
                # node that falls behind during a chaos run.
                "links": km.links,
            }
        )

    async def openapi(self, request: web.Request) -> web.Response:
        """The API's OpenAPI document (``kmnode/openapi.json``, built by ``kmnode.openapi``):
        open, like the status, since it describes the API and holds nothing of the node's."""
        return web.Response(body=_OPENAPI, content_type="application/json")

    # --- the enclave's routes ---------------------------------------------------------------

    def relay(self, route: Route) -> Handler:
        """Relay a request on ``route`` to the KM enclave exactly as its client signed it: the
        enclave verifies the signature, parses the request and decides (``ApiCall``)."""

        async def handler(request: web.Request) -> web.Response:
            call = self._call(request, await request.read())
            return _json(await self.data(call), route.status)

        return handler

    async def authorize(self, request: web.Request, body: bytes) -> None:
        """A chaos request, checked by the KM enclave like any other (signature, role) and
        served only while the cluster's governance has chaos enabled: raises if refused."""
        await self.data(self._call(request, body))

    @staticmethod
    def _call(request: web.Request, body: bytes) -> ApiCall:
        """The request as its client signed it, for the KM enclave. A POST must be JSON: what
        a web page may send to another site without asking (a form, text) is refused."""
        if request.method == "POST" and request.content_type != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"a POST body must be application/json, not {request.content_type!r}",
            )
        headers = {k: request.headers[k] for k in SIGNATURE_HEADERS if k in request.headers}
        try:
            return ApiCall.model_validate(
                {
                    "method": request.method,
                    "target": request.raw_path,
                    "headers": headers,
                    "body": body,
                }
            )
        except ValidationError as exc:
            message = f"request too large: {exc.errors()[0]['msg']}"
            raise ApiError(400, "bad_request", message) from None

    async def crash_service(self) -> int | None:
        """Chaos: the KM enclave process kills its service enclave child; its pid or None."""
        killed = (await self.data(ServiceCrash()))["killed"]
        return killed if isinstance(killed, int) else None
