"""The operator API (docs/operator-api.md): JSON over HTTP, served by every node.

Handlers are thin: validate the request, turn it into a KM command or a read of the applied
state, and map failures to status codes an operator can act on (421 with the leader's address,
409 with the state machine's reason, 504 when the outcome is unknown). Nothing returned here
contains key material: keys are shown by fingerprint (a MAC), never by value.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.quote import CheckLog
from consensus.types import ConfChange, ConfChangeType, NotLeader, ProposalTimeout, RaftError
from kmnode.host.chaos_api import add_chaos_routes
from kmnode.host.faults import service_pid
from kmnode.host.node import KMNode
from kmnode.host.service_link import ServiceUnavailable
from kmnode.km.state import encode_command

Handler = Callable[[web.Request], Awaitable[web.Response]]
MAX_BODY = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]*$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Longest challenge the proof workload takes, in bytes (``kmnode.service_pipe``).
MAX_CHALLENGE = 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class OperatorApi:
    def __init__(self, node: KMNode) -> None:
        self.node = node

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        get, post = app.router.add_get, app.router.add_post
        get("/v1/status", self.status)
        get("/v1/keys", self.list_keys)
        post("/v1/keys", self.create_key)
        get("/v1/keys/{name}", self.show_key)
        post("/v1/keys/{name}/rotate", self.rotate_key)
        post("/v1/keys/{name}/release", self.release_key)
        get("/v1/releases", self.list_releases)
        post("/v1/service/prove", self.prove)
        get("/v1/policy", self.get_policy)
        post("/v1/policy/allow", self.policy_change("policy.allow"))
        post("/v1/policy/disallow", self.policy_change("policy.disallow"))
        post("/v1/policy/revoke-platform", self.revoke_platform)
        get("/v1/members", self.list_members)
        post("/v1/members/remove", self.remove_member)
        get("/v1/attest", self.attest)
        node = self.node
        add_chaos_routes(
            app,
            node.faults,
            node.ring_stall,
            service_pid(node.service),
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
        except NotLeader as exc:
            return self._not_leader(exc.leader)
        except ProposalTimeout as exc:
            return _json({"error": str(exc), "code": "timeout"}, 504)
        except (RaftError, ServiceUnavailable) as exc:
            return _json({"error": str(exc), "code": "unavailable"}, 503)
        except web.HTTPException as exc:
            return _json({"error": exc.reason, "code": "bad_request"}, exc.status)

    def _not_leader(self, leader: str) -> web.Response:
        member = self.node.enclave.state.members.get(leader) if leader else None
        leader_api = f"http://{member.host}:{member.api_port}" if member else None
        return _json(
            {
                "error": "not the leader",
                "code": "not_leader",
                "leader": leader or None,
                "leader_api": leader_api,
            },
            421,
        )

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "body must be a JSON object")
        return body

    async def _read_barrier(self, request: web.Request) -> None:
        """With ``?linearizable=1``, confirm with the leader that this node is up to date."""
        if request.query.get("linearizable") not in (None, "", "0", "false"):
            self._require_ready()
            driver = self.node.driver
            assert driver is not None
            await driver.read_index()

    def _require_ready(self) -> None:
        if not self.node.ready:
            raise ApiError(503, "not_ready", "node is not ready (no leader yet, or not joined)")

    async def _commit(self, command: bytes, timeout: float = 5.0) -> dict[str, Any]:
        self._require_ready()
        driver = self.node.driver
        if driver is None or not driver.is_leader:
            raise NotLeader(driver.leader if driver else "")
        result = await self.node.propose(command, timeout)
        if not result.get("ok"):
            raise ApiError(409, "refused", str(result.get("error", "refused")))
        return result

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
        driver = node.driver
        state = node.enclave.state
        raft: dict[str, Any] = {}
        if driver is not None:
            st = driver.status
            raft = {
                "role": st.role.name.lower(),
                "leader": st.leader or None,
                "term": st.term,
                "commit": st.commit,
                "applied": driver.applied_index,
                # Moving average of a synced log write; under 0.5 ms it is done inline.
                "fsync_avg_ms": round(driver.fsync_avg_s * 1000, 3),
                "voters": list(st.conf.voters),
            }
        peers = node.transport.attested_peers()
        stats = node.events.stats()
        return _json(
            {
                "node": node.name,
                "cluster": state.cluster or None,
                "ready": node.ready,
                **raft,
                "members": sorted(state.members),
                "peers": {
                    name: {"attested": True, "platform_id": platform}
                    for name, platform in sorted(peers.items())
                },
                "has_master_secret": node.enclave.has_master_secret,
                "service": {
                    "running": node.service.running,
                    "measurement": node.service.measurement,
                    # Challenged while a release to it was still being committed (the key
                    # itself only ever follows the commit).
                    "early_attestations": dataclasses.asdict(node.early_attestations),
                },
                "mqtt": {"published": stats.published, "dropped": stats.dropped},
                # Peer-link counters since start: drops, refusals and reconnects explain a
                # node that falls behind during a chaos run.
                "links": dataclasses.asdict(node.transport.stats),
            }
        )

    async def list_keys(self, request: web.Request) -> web.Response:
        await self._read_barrier(request)
        keys = [dataclasses.asdict(k) for k in self.node.enclave.state.keys.values()]
        return _json({"keys": sorted(keys, key=lambda k: k["name"])})

    async def show_key(self, request: web.Request) -> web.Response:
        await self._read_barrier(request)
        name = request.match_info["name"]
        record = self.node.enclave.state.keys.get(name)
        if record is None:
            raise ApiError(404, "not_found", f"no key named {name!r}")
        fingerprints = {
            str(g): self.node.enclave.key_fingerprint(name, g)
            for g in range(1, record.generation + 1)
        }
        return _json({**dataclasses.asdict(record), "fingerprints": fingerprints})

    async def list_releases(self, request: web.Request) -> web.Response:
        await self._read_barrier(request)
        key = request.query.get("key")
        releases = [
            dataclasses.asdict(r)
            for r in self.node.enclave.state.releases.values()
            if key is None or r.key == key
        ]
        return _json({"releases": releases})

    async def get_policy(self, request: web.Request) -> web.Response:
        await self._read_barrier(request)
        return _json(self.node.enclave.state.policy.to_dict())

    async def list_members(self, request: web.Request) -> web.Response:
        await self._read_barrier(request)
        members = [dataclasses.asdict(m) for m in self.node.enclave.state.members.values()]
        voters = list(self.node.driver.status.conf.voters) if self.node.driver else []
        return _json({"members": members, "voters": voters})

    async def attest(self, request: web.Request) -> web.Response:
        """A fresh quote of this node's KM enclave, verified against the replicated policy."""
        enclave = self.node.enclave
        now = time.time()
        binding, quote = enclave.show_quote(now)
        log = CheckLog()
        error = None
        try:
            enclave.verifier.verify(
                quote, enclave.state.policy, binding, role=EnclaveRole.KM, now=now, log=log
            )
        except AttestationError as exc:
            error = f"{type(exc).__name__}: {exc}"
        identity = enclave.identity
        return _json(
            {
                "node": self.node.name,
                "platform_id": enclave.platform_id,
                "quote": quote.hex(),
                "identity": {
                    "measurement": identity.measurement.hex(),
                    "signer": identity.signer.hex(),
                    "svn": identity.svn,
                    "product_id": identity.product_id,
                },
                "verification": {
                    "accepted": error is None,
                    "error": error,
                    "checks": [{"check": c, "detail": d} for c, d in log.passed],
                },
            }
        )

    # --- writes -----------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        allowed = body.get("allowed_service", [])
        result = await self._commit(
            encode_command("key.create", name=body.get("name"), allowed_service=allowed)
        )
        return _json({"key": result["key"], "generation": result["generation"]}, 201)

    async def rotate_key(self, request: web.Request) -> web.Response:
        result = await self._commit(encode_command("key.rotate", key=request.match_info["name"]))
        return _json({"key": result["key"], "generation": result["generation"]})

    async def release_key(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        name = request.match_info["name"]
        target = body.get("node", "all")
        timeout = float(body.get("timeout", 10.0))
        state = self.node.enclave.state
        targets = sorted(state.members) if target == "all" else [target]
        fields: dict[str, Any] = {}
        if "generation" in body:
            fields["generation"] = body["generation"]
        release_ids = []
        for node in targets:
            result = await self._commit(
                encode_command("release.request", key=name, node=node, **fields)
            )
            release_ids.append(str(result["release"]))

        deadline = time.monotonic() + min(max(timeout, 0.1), 60.0)
        for release_id in release_ids:
            await self.node.wait_release(release_id, max(deadline - time.monotonic(), 0.0))
        releases = []
        for release_id in release_ids:
            r = state.releases[release_id]
            releases.append(
                {
                    "release": r.id,
                    "node": r.node,
                    "key": r.key,
                    "generation": r.generation,
                    "status": r.status,
                    "reason": r.reason,
                }
            )
        return _json({"releases": releases})

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
        try:
            mac = await self.node.service.prove(key, generation, bytes.fromhex(challenge))
        except ServiceUnavailable as exc:
            raise ApiError(409, "refused", f"service enclave cannot prove it: {exc}") from None
        return _json({"node": self.node.name, "key": key, "generation": generation, "mac": mac})

    def policy_change(self, op: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await self._body(request)
            measurement = self._hex(body, "measurement", 32)
            result = await self._commit(
                encode_command(op, role=body.get("role"), measurement=measurement)
            )
            return _json(result)

        return handler

    async def revoke_platform(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        result = await self._commit(
            encode_command("policy.revoke_platform", platform_id=body.get("platform_id"))
        )
        return _json(result)

    async def remove_member(self, request: web.Request) -> web.Response:
        """Two commits: the member record, then the Raft voter. Safe to retry: a retry after
        the first succeeded (and the conf change was busy or timed out) finishes the second."""
        body = await self._body(request)
        name = body.get("name")
        driver = self.node.driver
        voter = driver is not None and isinstance(name, str) and name in driver.status.conf.voters
        if voter and name not in self.node.enclave.state.members:
            self._require_ready()
            if driver is None or not driver.is_leader:
                raise NotLeader(driver.leader if driver else "")
            result: dict[str, Any] = {"ok": True, "member": name}
        else:
            result = await self._commit(encode_command("member.remove", name=name))
        if voter and isinstance(name, str) and driver is not None:
            # A RaftError here (another change in flight) is a 503: the caller retries.
            await driver.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, name))
        return _json(result)
