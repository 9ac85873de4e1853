"""`/v1/chaos/...`: fault injection on one node through its operator API.

Only faults that must happen inside the node process live here (link rules, the ring stall,
the service enclave crash); process and disk faults are done from outside (kmnode.chaos.faults).
Every change is validated completely before anything is modified, so a 400 leaves the node's
fault state exactly as it was. Errors follow docs/operator-api.md, plus ``field`` naming the
offending body field.

    GET  /v1/chaos/rules         -> {"rules": {peer: rule}, "stats": {peer: counts}, "seed",
                                     "ring_stalled"}
    POST /v1/chaos/rules         {"peer", "drop"?, "delay_ms"?, "jitter_ms"?, "duplicate"?,
                                  "partition"?} -> {"peer", "rule"}; fields not given keep
                                  their current value
    POST /v1/chaos/heal          {"peer"?} -> {"healed": [peers]}
    POST /v1/chaos/ring-stall    {"stalled": bool} -> {"stalled"}
    POST /v1/chaos/service-crash -> {"killed": pid}; 409 if no service enclave runs
    POST /v1/chaos/tamper-blob   {"digest": HEX} -> {"tampered": HEX}
    POST /v1/chaos/tamper-state  {"mode": flip|swap|rollback|drop, "contract"?, "seed"?} ->
                                 {"tampered": what}: the host changes its stored contract
                                 state (409 if there is nothing to change that way)
    POST /v1/chaos/poison        {"enabled": bool, "seed"?: int, "rate"?: number} ->
                                 {"enabled", "seed", "stats"}: this host feeds garbage into
                                 every input it holds (``kmnode.host.poison``); disabling
                                 returns what was sent, what came back, and any finding
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web

from kmnode.api_routes import BadCall, parse_body
from kmnode.host.faults import RingStall
from kmnode.host.poison import Poisoner
from kmnode.linkfaults import FaultRuleError


class _BadRequest(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message, "code": code}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


def _body(raw: bytes) -> dict[str, Any]:
    """The body as every API route parses it (``api_routes.parse_body``: UTF-8, a JSON object,
    nesting bounded)."""
    try:
        return parse_body(raw)
    except BadCall as exc:
        raise _BadRequest(exc.field, str(exc)) from None


def _peer(body: dict[str, Any], known: list[str], required: bool) -> str | None:
    peer = body.get("peer")
    if peer is None and not required:
        return None
    if not isinstance(peer, str) or not peer:
        raise _BadRequest("peer", "'peer' must name a peer node")
    if peer not in known:
        raise _BadRequest("peer", f"'peer' {peer!r} is not a peer of this node (peers: {known})")
    return peer


class LinkRules(Protocol):
    """Where the link rules live: in the KM enclave process (reached through the circuit),
    or, in tests, ``kmnode.linkfaults.LocalLinkRules``."""

    async def view(self) -> dict[str, Any]: ...

    async def update(self, peer: str, changes: Mapping[str, Any]) -> dict[str, Any]: ...

    async def heal(self, peer: str | None) -> list[str]: ...


def add_chaos_routes(
    app: web.Application,
    rules: LinkRules,
    stall: RingStall,
    crash_service: Callable[[], Awaitable[int | None]],
    peers: Callable[[], list[str]],
    authorize: Callable[[web.Request, bytes], Awaitable[None]] | None = None,
    poisoner: Poisoner | None = None,
    tamper_state: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    tamper_blob: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Mount the chaos endpoints on ``app``. ``peers`` lists the names a rule may target
    (every other node of the cluster); ``crash_service`` kills the service enclave and gives
    its pid, or None if none was running. ``authorize`` is asked first with the request and
    its body's bytes, and raises to refuse it (a node's API: the KM enclave checks the signature,
    the role and that governance enabled chaos). ``poisoner``: the node's ``poison`` fault
    (404 without one). ``tamper_state``: change the node's stored contract state as a hostile
    host would (``kmnode.host.contract_host``; 404 without it). ``tamper_blob``: flip a bit of
    a dataset blob the host keeps (``kmnode.host.blob_host``; 404 without it)."""

    async def authorized(request: web.Request) -> bytes:
        """The request's body, once ``authorize`` (if any) let it through."""
        raw = await request.read()
        if authorize is not None:
            await authorize(request, raw)
        return raw

    def guarded(
        handler: Callable[[dict[str, Any]], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Any]:
        async def route(request: web.Request) -> web.Response:
            raw = await authorized(request)
            try:
                return await handler(_body(raw))
            except _BadRequest as exc:
                return _error(400, "bad_request", str(exc), exc.field)

        return route

    async def get_rules(request: web.Request) -> web.Response:
        await authorized(request)
        return web.json_response({**await rules.view(), "ring_stalled": stall.stalled})

    async def set_rule(body: dict[str, Any]) -> web.Response:
        peer = _peer(body, peers(), required=True)
        assert peer is not None
        changes = {k: v for k, v in body.items() if k != "peer"}
        try:
            rule = await rules.update(peer, changes)
        except FaultRuleError as exc:
            raise _BadRequest(exc.field, str(exc)) from None
        return web.json_response({"peer": peer, "rule": rule})

    async def heal(body: dict[str, Any]) -> web.Response:
        # A peer that has a rule may be healed even if it has since left the membership.
        with_rules = (await rules.view())["rules"]
        peer = _peer(body, sorted({*peers(), *with_rules}), required=False)
        return web.json_response({"healed": await rules.heal(peer)})

    async def ring_stall(body: dict[str, Any]) -> web.Response:
        stalled = body.get("stalled")
        if not isinstance(stalled, bool):
            raise _BadRequest("stalled", f"'stalled' must be true or false, not {stalled!r}")
        stall.set(stalled)
        return web.json_response({"stalled": stall.stalled})

    async def service_crash(body: dict[str, Any]) -> web.Response:
        pid = await crash_service()
        if pid is None:
            return _error(409, "refused", "the service enclave is not running")
        return web.json_response({"killed": pid})

    async def poison(body: dict[str, Any]) -> web.Response:
        if poisoner is None:
            return _error(404, "not_found", "this node has no poison fault")
        enabled, seed, rate = body.get("enabled"), body.get("seed", 0), body.get("rate", 40)
        if not isinstance(enabled, bool):
            raise _BadRequest("enabled", f"'enabled' must be true or false, not {enabled!r}")
        if type(seed) is not int or not 0 <= seed < 2**63:
            raise _BadRequest("seed", "'seed' must be an integer from 0 to 2**63 - 1")
        if type(rate) not in (int, float) or not 0 < rate <= 1000:
            raise _BadRequest("rate", "'rate' must be a number of actions per second, 0..1000")
        if enabled:
            poisoner.start(seed, float(rate))
            stats = poisoner.stats
        else:
            stats = await poisoner.stop()
        return web.json_response(
            {"enabled": poisoner.enabled, "seed": poisoner.seed, "stats": stats.as_dict()}
        )

    async def tamper(body: dict[str, Any]) -> web.Response:
        if tamper_state is None:
            return _error(404, "not_found", "this node has no contract store")
        try:
            return web.json_response(tamper_state(body))
        except ValueError as exc:
            field, _, _ = str(exc).partition(":")
            known = field if field in ("mode", "contract", "seed") else None
            if known is None:
                return _error(409, "refused", str(exc))
            raise _BadRequest(known, str(exc)) from None

    async def blob(body: dict[str, Any]) -> web.Response:
        if tamper_blob is None:
            return _error(404, "not_found", "this node keeps no dataset blobs")
        try:
            return web.json_response(tamper_blob(body))
        except ValueError as exc:
            if str(exc).startswith("digest:"):
                raise _BadRequest("digest", str(exc)) from None
            return _error(409, "refused", str(exc))

    app.router.add_get("/v1/chaos/rules", get_rules)
    app.router.add_post("/v1/chaos/tamper-blob", guarded(blob))
    app.router.add_post("/v1/chaos/tamper-state", guarded(tamper))
    app.router.add_post("/v1/chaos/rules", guarded(set_rule))
    app.router.add_post("/v1/chaos/heal", guarded(heal))
    app.router.add_post("/v1/chaos/ring-stall", guarded(ring_stall))
    app.router.add_post("/v1/chaos/service-crash", guarded(service_crash))
    app.router.add_post("/v1/chaos/poison", guarded(poison))
