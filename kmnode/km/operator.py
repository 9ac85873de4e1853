"""Operator requests, answered inside the KM enclave process.

The host's API turns an HTTP request into one typed circuit request (``kmnode.km_messages``);
this module turns that into a KM command or a read of the applied state, decided by this
process's own Raft and state, and answers with public data or a ``Failure`` whose code the host
maps to an HTTP status (not the leader, refused by the state machine, outcome unknown, ...).
The host never composes a command: a request is a record of typed fields, and the command
string is built here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pydantic import JsonValue, ValidationError

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.quote import CheckLog
from consensus.types import ConfChange, ConfChangeType, NotLeader, ProposalTimeout, RaftError
from kmnode.km.commands import (
    Applied,
    CommandModel,
    KeyCreate,
    KeyGeneration,
    KeyRotate,
    MemberChanged,
    MemberRemove,
    PolicyAllow,
    PolicyDisallow,
    PolicyRevokePlatform,
    Refused,
    ReleaseRequest,
    ReleaseRequested,
    explain,
)
from kmnode.km.node import KMNode
from kmnode.km_messages import (
    AttestRequest,
    CreateKey,
    DataReply,
    Failed,
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
from kmnode.linkfaults import FaultRuleError, LocalLinkRules
from kmnode.service_pipe import ServiceUnavailable

#: Longest wait for release outcomes an operator may ask for, in seconds.
MAX_RELEASE_WAIT = 60.0


class Operator:
    """Answers the host's operator requests from one node's Raft and state."""

    def __init__(self, node: KMNode) -> None:
        self.node = node
        self.links = LocalLinkRules(node.faults)

    async def handle(self, request: Request) -> Reply:
        """The reply to ``request``; raises ``Failed`` with the reason it cannot be served."""
        try:
            return await self._handle(request)
        except NotLeader as exc:
            raise self._not_leader(exc.leader) from None
        except ProposalTimeout as exc:
            raise Failed.of("timeout", str(exc)) from None
        except RaftError as exc:
            raise Failed.of("unavailable", str(exc)) from None

    async def _handle(self, request: Request) -> Reply:
        match request:
            case StatusRequest():
                return self.status()
            case ReadRequest():
                return DataReply(data=await self.read(request))
            case AttestRequest():
                return DataReply(data=self.attest())
            case CreateKey(name=name, allowed_service=allowed):
                created = await self._commit(KeyCreate, name=name, allowed_service=allowed)
                return DataReply(data=_key_view(created))
            case RotateKey(name=name):
                rotated = await self._commit(KeyRotate, key=name)
                return DataReply(data=_key_view(rotated))
            case ReleaseKey():
                return DataReply(data=await self.release(request))
            case PolicyChange(change=change, role=role, measurement=measurement):
                kind = PolicyAllow if change == "policy.allow" else PolicyDisallow
                changed = await self._commit(kind, role=role, measurement=measurement)
                return DataReply(data=changed.public())
            case RevokePlatform(platform_id=platform_id):
                return DataReply(
                    data=(
                        await self._commit(PolicyRevokePlatform, platform_id=platform_id)
                    ).public()
                )
            case RemoveMember(name=name):
                return DataReply(data=await self.remove_member(name))
            case LinkRulesRequest():
                return DataReply(data=await self.links.view())
            case UpdateLinkRule(peer=peer, changes=changes):
                try:
                    return DataReply(data=await self.links.update(peer, changes))
                except FaultRuleError as exc:
                    raise Failed.of("bad_request", str(exc), field=exc.field) from None
            case HealLinks(peer=peer):
                return DataReply(data=list(await self.links.heal(peer)))
            case Prove(key=key, generation=generation, challenge=challenge):
                try:
                    mac = await self.node.service.prove(key, generation, challenge)
                except ServiceUnavailable as exc:
                    message = f"service enclave cannot prove it: {exc}"
                    raise Failed.of("service_unavailable", message) from None
                return DataReply(data={"mac": mac})
            case ServiceCrash():
                return DataReply(data={"killed": self.node.service.crash()})
        raise Failed.of("bad_request", f"{type(request).__name__} is not an operator request")

    # --- helpers ----------------------------------------------------------------------------

    def _not_leader(self, leader: str) -> Failed:
        member = self.node.enclave.state.members.get(leader) if leader else None
        leader_api = f"http://{member.host}:{member.api_port}" if member else None
        return Failed.of(
            "not_leader", "not the leader", leader=leader or None, leader_api=leader_api
        )

    def _require_ready(self) -> None:
        if not self.node.ready:
            raise Failed.of("not_ready", "node is not ready (no leader yet, or not joined)")

    def _require_leader(self) -> None:
        self._require_ready()
        driver = self.node.driver
        if driver is None or not driver.is_leader:
            raise NotLeader(driver.leader if driver else "")

    async def _commit(
        self, kind: type[CommandModel], timeout: float = 5.0, **fields: Any
    ) -> Applied:
        """Build a ``kind`` command from the request's fields (refused here, before anything
        is proposed, if a field is malformed) and commit it on this leader."""
        self._require_leader()
        try:
            command = kind(**fields)
        except ValidationError as exc:
            raise Failed.of("refused", explain(exc)) from None
        result = await self.node.propose(command.encode(), timeout)
        if isinstance(result, Refused):
            raise Failed.of("refused", result.error)
        return result

    # --- reads ------------------------------------------------------------------------------

    def status(self) -> StatusReply:
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
        return StatusReply(
            node=node.name,
            cluster=state.cluster or None,
            ready=node.ready,
            raft=raft,
            members=sorted(state.members),
            peers=dict(sorted(node.transport.attested_peers().items())),
            has_master_secret=node.enclave.has_master_secret,
            early_attestations=dataclasses.asdict(node.early_attestations),
            links=dataclasses.asdict(node.transport.stats),
            service={
                "running": node.service.running,
                "measurement": node.service.measurement,
                "pid": node.service.pid,
                "restarts": node.service.restarts,
            },
        )

    async def read(self, request: ReadRequest) -> Any:
        node = self.node
        if request.linearizable:
            self._require_ready()
            await node.raft().read_index()
        state = node.enclave.state
        match request.what:
            case "keys":
                keys = [dataclasses.asdict(k) for k in state.keys.values()]
                return {"keys": sorted(keys, key=lambda k: k["name"])}
            case "key":
                record = state.keys.get(request.name or "")
                if record is None:
                    raise Failed.of("not_found", f"no key named {request.name!r}")
                fingerprints = {
                    str(g): node.enclave.key_fingerprint(record.name, g)
                    for g in range(1, record.generation + 1)
                }
                return {**dataclasses.asdict(record), "fingerprints": fingerprints}
            case "releases":
                releases = [
                    dataclasses.asdict(r)
                    for r in state.releases.values()
                    if request.name is None or r.key == request.name
                ]
                return {"releases": releases}
            case "policy":
                return state.policy.to_dict()
            case "members":
                members = [dataclasses.asdict(m) for m in state.members.values()]
                voters = list(node.driver.status.conf.voters) if node.driver else []
                return {"members": members, "voters": voters}

    def attest(self) -> dict[str, Any]:
        """A fresh quote of this enclave, verified against the replicated policy."""
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
        return {
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

    # --- writes -----------------------------------------------------------------------------

    async def release(self, request: ReleaseKey) -> dict[str, Any]:
        """Commit one release request per target node, then wait for their outcomes."""
        node = self.node
        state = node.enclave.state
        targets = sorted(state.members) if request.node == "all" else [request.node]
        release_ids = []
        for target in targets:
            result = await self._commit(
                ReleaseRequest, key=request.key, node=target, generation=request.generation
            )
            assert isinstance(result, ReleaseRequested)
            release_ids.append(result.release)
        deadline = time.monotonic() + min(max(request.timeout, 0.1), MAX_RELEASE_WAIT)
        for release_id in release_ids:
            await node.wait_release(release_id, max(deadline - time.monotonic(), 0.0))
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
        return {"releases": releases}

    async def remove_member(self, name: Any) -> dict[str, JsonValue]:
        """Two commits: the member record, then the Raft voter. Safe to retry: a retry after
        the first succeeded (and the conf change was busy or timed out) finishes the second."""
        driver = self.node.driver
        voter = driver is not None and isinstance(name, str) and name in driver.status.conf.voters
        if voter and name not in self.node.enclave.state.members:
            self._require_leader()
            result: Applied = MemberChanged(name)
        else:
            result = await self._commit(MemberRemove, name=name)
        if voter and isinstance(name, str) and driver is not None:
            # A RaftError here (another change in flight) is a 503: the caller retries.
            await driver.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, name))
        return result.public()


def _key_view(result: Applied) -> dict[str, JsonValue]:
    """What a key's creation or rotation answers: the key and its current generation."""
    assert isinstance(result, KeyGeneration)
    return {"key": result.key, "generation": result.generation}
