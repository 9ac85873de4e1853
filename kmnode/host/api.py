"""The operator API (docs/operator-api.md): JSON over HTTP, served by every node's host.

Handlers are thin: validate the request, turn it into one typed request to the KM enclave
process (``kmnode.km_messages``), and map its answer to a status code an operator can act on
(421 with the leader's address, 409 with the state machine's reason, 504 when the outcome is
unknown). The host composes no KM command and reads no state itself: the enclave decides, from
its own Raft and state. Nothing returned here contains key material: keys are shown by
fingerprint (a MAC), never by value.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from kmnode.circuit import CircuitClosed
from kmnode.host.chaos_api import add_chaos_routes
from kmnode.host.node import KMNode
from kmnode.km_messages import (
    AttestRequest,
    CreateKey,
    DataReply,
    Failed,
    FailureCode,
    HealLinks,
    LinkRulesRequest,
    PolicyChange,
    Prove,
    ReadRequest,
    ReleaseKey,
    RemoveMember,
    Reply,
    Request,
    RevokePlatform,
    RotateKey,
    ServiceCrash,
    StatusReply,
    StatusRequest,
    UpdateLinkRule,
)
from kmnode.linkfaults import FaultRuleError

Handler = Callable[[web.Request], Awaitable[web.Response]]
R = TypeVar("R", bound=Reply)
MAX_BODY = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]*$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Longest challenge the proof workload takes, in bytes (``kmnode.service_pipe``).
MAX_CHALLENGE = 1024
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
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        get, post = app.router.add_get, app.router.add_post
        get("/v1/status", self.status)
        get("/v1/keys", self.reader("keys"))
        post("/v1/keys", self.create_key)
        get("/v1/keys/{name}", self.show_key)
        post("/v1/keys/{name}/rotate", self.rotate_key)
        post("/v1/keys/{name}/release", self.release_key)
        get("/v1/releases", self.list_releases)
        post("/v1/service/prove", self.prove)
        get("/v1/policy", self.reader("policy"))
        post("/v1/policy/allow", self.policy_change("policy.allow"))
        post("/v1/policy/disallow", self.policy_change("policy.disallow"))
        post("/v1/policy/revoke-platform", self.revoke_platform)
        get("/v1/members", self.reader("members"))
        post("/v1/members/remove", self.remove_member)
        get("/v1/attest", self.attest)
        node = self.node
        add_chaos_routes(
            app,
            _RemoteLinkRules(self),
            node.ring_stall,
            self.crash_service,
            lambda: [n.name for n in node.config.nodes if n.name != node.name],
        )
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

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return body

    @staticmethod
    def _request(build: Callable[[], Request]) -> Request:
        """Build a typed request from a body's fields; a field of the wrong type is a 400."""
        try:
            return build()
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise ApiError(400, "bad_request", f"{field!r}: {error['msg']}", field=field) from None

    async def ask(self, request: Request, reply_type: type[R]) -> R:
        return await self.node.km.call(request, reply_type)

    async def data(self, request: Request) -> Any:
        return (await self.ask(request, DataReply)).data

    @staticmethod
    def _linearizable(request: web.Request) -> bool:
        return request.query.get("linearizable") not in (None, "", "0", "false")

    @staticmethod
    def _hex(body: dict[str, Any], field: str, size: int | None = None) -> str:
        value = body.get(field)
        if not isinstance(value, str) or not _HEX.match(value) or len(value) % 2:
            raise ApiError(400, "bad_request", f"{field!r} must be a lowercase hex string")
        if size is not None and len(value) != size * 2:
            raise ApiError(400, "bad_request", f"{field!r} must be {size} bytes")
        return value

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
                "service": {
                    **km.service,
                    # Challenged while a release to it was still being committed (the key
                    # itself only ever follows the commit).
                    "early_attestations": km.early_attestations,
                    "outputs": node.service_output.outputs,
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

    def reader(self, what: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            read = self._request(
                lambda: ReadRequest.model_validate(
                    {"what": what, "linearizable": self._linearizable(request)}
                )
            )
            return _json(await self.data(read))

        return handler

    async def show_key(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        read = ReadRequest(what="key", name=name, linearizable=self._linearizable(request))
        return _json(await self.data(read))

    async def list_releases(self, request: web.Request) -> web.Response:
        key = request.query.get("key")
        read = ReadRequest(what="releases", name=key, linearizable=self._linearizable(request))
        return _json(await self.data(read))

    async def attest(self, request: web.Request) -> web.Response:
        """A fresh quote of this node's KM enclave, verified against the replicated policy."""
        return _json(await self.data(AttestRequest()))

    # --- writes -----------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        create = self._request(
            lambda: CreateKey(
                name=body.get("name"), allowed_service=body.get("allowed_service", [])
            )
        )
        return _json(await self.data(create), 201)

    async def rotate_key(self, request: web.Request) -> web.Response:
        return _json(await self.data(RotateKey(name=request.match_info["name"])))

    async def release_key(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        fields = {k: body[k] for k in ("node", "generation", "timeout") if k in body}
        if isinstance(fields.get("timeout"), int) and not isinstance(fields["timeout"], bool):
            fields["timeout"] = float(fields["timeout"])
        release = self._request(
            lambda: ReleaseKey.model_validate({"key": request.match_info["name"], **fields})
        )
        return _json(await self.data(release))

    async def prove(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        challenge = self._hex(body, "challenge")
        key, generation = body.get("key"), body.get("generation")
        if not isinstance(key, str) or not isinstance(generation, int):
            raise ApiError(400, "bad_request", "'key' (string) and 'generation' (int) are required")
        if not _KEY_NAME.match(key) or generation < 1:
            raise ApiError(400, "bad_request", "'key' must be a key name, 'generation' >= 1")
        if not 0 < len(challenge) <= 2 * MAX_CHALLENGE:
            raise ApiError(400, "bad_request", f"'challenge' must be 1..{MAX_CHALLENGE} bytes")
        prove = Prove(key=key, generation=generation, challenge=bytes.fromhex(challenge))
        mac = (await self.data(prove))["mac"]
        return _json({"node": self.node.name, "key": key, "generation": generation, "mac": mac})

    async def crash_service(self) -> int | None:
        """Chaos: the KM enclave process kills its service enclave child; its pid or None."""
        killed = (await self.data(ServiceCrash()))["killed"]
        return killed if isinstance(killed, int) else None

    def policy_change(self, op: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await self._body(request)
            measurement = self._hex(body, "measurement", 32)
            change = self._request(
                lambda: PolicyChange.model_validate(
                    {"change": op, "role": body.get("role"), "measurement": measurement}
                )
            )
            return _json(await self.data(change))

        return handler

    async def revoke_platform(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return _json(await self.data(RevokePlatform(platform_id=body.get("platform_id"))))

    async def remove_member(self, request: web.Request) -> web.Response:
        """The member record, then the Raft voter (the enclave does both; safe to retry)."""
        body = await self._body(request)
        return _json(await self.data(RemoveMember(name=body.get("name"))))
