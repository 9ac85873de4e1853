"""Operator requests, answered inside the KM enclave process.

The host relays each API request as its client signed it (``ApiCall``). Here the signature is
checked against this enclave's own replicated identities (``kmnode.identity``), the signed
method, path and body are parsed into one typed request (``kmnode.api_routes``), the signer's
role is checked, and the request becomes a KM command (stamped with who asked and the request
id, which commits once) or a read of the applied state, decided by this process's own Raft and
state. The answer is public data or a ``Failure`` whose code the host maps to an HTTP status
(unsigned, forbidden, a replay, not the leader, refused by the state machine, ...). The host
never composes a command nor an operator request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from pydantic import JsonValue, ValidationError

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.quote import CheckLog
from consensus.types import ConfChange, ConfChangeType, NotLeader, ProposalTimeout, RaftError
from kmnode.api_routes import RECOVERY_PATHS, BadCall, parse_call
from kmnode.dataauth.ops import BUILTIN_OPS
from kmnode.identity import AuthError, Verified, verify_request
from kmnode.km.audit import audit_records
from kmnode.km.commands import (
    Applied,
    AuthStamp,
    CommandModel,
    ContractCall,
    ContractDeploy,
    ContractOpCommitted,
    KeyCreate,
    KeyGeneration,
    KeyRotate,
    MemberChanged,
    ProposalChanged,
    ProposalCreate,
    ProposalVote,
    ProposalWithdraw,
    Refused,
    ReleaseRequest,
    ReleaseRequested,
    explain,
    field_path,
)
from kmnode.km.data_commands import (
    DataApprove,
    DataCompute,
    DataDeny,
    DataGrant,
    DataOpRegister,
    DataRegister,
    DataRequest,
    DataRevoke,
    TokenIssued,
)
from kmnode.km.enclave import EnclaveStateError
from kmnode.km.node import KMNode
from kmnode.km.recovery_commands import RecoveryShare
from kmnode.km.service_link import ServiceRefused
from kmnode.km.snapshot_source import SnapshotSource
from kmnode.km.state import ContractRecord, Proposal
from kmnode.km_messages import (
    ApiCall,
    AttestRequest,
    AuditRead,
    CallContract,
    ChaosCheck,
    ContractRead,
    CreateKey,
    DataRead,
    DataReply,
    DataWrite,
    DeployContract,
    Failed,
    FailureCode,
    HealLinks,
    LinkRulesRequest,
    PolicyChange,
    Propose,
    Prove,
    ReadRequest,
    RecoveryRead,
    ReleaseKey,
    RemoveMember,
    Reply,
    Request,
    ResyncContracts,
    RevokePlatform,
    RotateKey,
    ServiceCrash,
    SnapshotRead,
    StatusReply,
    StatusRequest,
    SubmitShare,
    TransferLeader,
    UpdateLinkRule,
    Vote,
    Withdraw,
)
from kmnode.linkfaults import FaultRuleError, LocalLinkRules
from kmnode.recovery.shares import RecoveryError
from kmnode.service_pipe import ServiceUnavailable

#: Longest wait for release outcomes an operator may ask for, in seconds.
MAX_RELEASE_WAIT = 60.0
#: How often a leadership transfer looks whether it has happened.
TRANSFER_POLL_S = 0.05
#: How long a deploy waits for this node's service enclave to take it.
CONTRACT_WAIT_S = 10.0


class Operator:
    """Answers the host's operator requests from one node's Raft and state."""

    def __init__(self, node: KMNode) -> None:
        self.node = node
        self.links = LocalLinkRules(node.faults)
        self.snapshots = SnapshotSource(node)

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
            case ApiCall():
                return await self.call(request)
            case LinkRulesRequest():
                return DataReply(data=await self.links.view())
            case UpdateLinkRule(peer=peer, changes=changes):
                try:
                    return DataReply(data=await self.links.update(peer, changes))
                except FaultRuleError as exc:
                    raise Failed.of("bad_request", str(exc), field=exc.field) from None
            case HealLinks(peer=peer):
                return DataReply(data=list(await self.links.heal(peer)))
            case ServiceCrash():
                return DataReply(data={"killed": self.node.service.crash()})
        raise Failed.of("bad_request", f"{type(request).__name__} is not an operator request")

    async def call(self, call: ApiCall) -> Reply:
        """An operator API request as its client signed it: verify the signature against our
        own replicated identities, parse what was signed, check the signer's role, serve."""
        identities = self.node.enclave.state.identities
        try:
            verified = verify_request(
                call.method, call.target, call.headers, call.body, identities.get
            )
        except AuthError as exc:
            message = str(exc)
            if not identities and exc.code == "unknown_identity":
                message += (
                    "; this cluster was created before operator identities existed and has "
                    "none, so no request can be signed: recreate it (kmctl down, then remove "
                    "its state directory)"
                    if self.node.enclave.state.cluster
                    else "; this node has not joined its cluster yet: ask another node"
                )
            raise Failed.of(exc.code, message) from None
        try:
            route, request = parse_call(
                call.method, call.target, call.body, self.node.config.limits
            )
        except BadCall as exc:
            code: FailureCode = "not_found" if exc.status == 404 else "bad_request"
            raise Failed.of(code, str(exc), field=exc.field) from None
        identity = verified.identity
        if self.node.recovery.recovering and route.path not in RECOVERY_PATHS:
            have = len(self.node.enclave.state.recovery.submitted)
            current = self.node.enclave.state.recovery.current
            need = current.threshold if current is not None else "?"
            raise Failed.of(
                "not_ready",
                f"node {self.node.name} is in recovery mode ({have} of {need} recovery shares "
                "submitted): it serves only status and recovery routes until the holders "
                "submit their shares (kmctl recovery submit --as NAME)",
            )
        if not any(identity.may(role) for role in route.roles):
            raise Failed.of(
                "forbidden",
                f"{identity.name!r} ({', '.join(identity.roles)}) may not "
                f"{route.method} {route.path}: it needs the {' or '.join(route.roles)} role",
            )
        return DataReply(data=await self._serve(request, verified))

    async def _serve(self, request: Request, by: Verified) -> JsonValue:
        match request:
            case ReadRequest():
                return await self.read(request)  # type: ignore[no-any-return]
            case AttestRequest():
                return self.attest()
            case CreateKey(name=name, allowed_service=allowed):
                stamp = _stamp(by)
                created = await self._commit(
                    KeyCreate, auth=stamp, name=name, allowed_service=allowed
                )
                return _key_view(created)
            case RotateKey(name=name):
                return _key_view(await self._commit(KeyRotate, auth=_stamp(by), key=name))
            case ReleaseKey():
                return await self.release(request, by)
            case PolicyChange(change=change, role=role, measurement=measurement):
                action = {"op": change, "role": role, "measurement": measurement}
                return (await self.propose([action], by)).public()
            case RevokePlatform(platform_id=platform_id):
                action = {"op": "policy.revoke_platform", "platform_id": platform_id}
                return (await self.propose([action], by)).public()
            case RemoveMember(name=name):
                return await self.remove_member(name, by)
            case ChaosCheck():
                if not self.node.enclave.state.chaos_enabled:
                    raise Failed.of(
                        "not_found",
                        "chaos is not enabled on this cluster (an admin proposal enables it: "
                        '{"op": "chaos.set", "enabled": true})',
                    )
                return {"authorized": True}
            case Propose(actions=actions):
                return (await self.propose(actions, by)).public()
            case Vote(proposal=proposal, ballot=ballot):
                voted = await self._commit(
                    ProposalVote, auth=_stamp(by), proposal=proposal, ballot=ballot
                )
                await self._after_governance(voted)
                return voted.public()
            case Withdraw(proposal=proposal):
                withdrawn = await self._commit(ProposalWithdraw, auth=_stamp(by), proposal=proposal)
                return withdrawn.public()
            case DeployContract(name=name, code=code):
                deployed = await self._commit(ContractDeploy, auth=_stamp(by), name=name, code=code)
                assert isinstance(deployed, ContractOpCommitted)
                outcome = await self.node.contracts.outcome(deployed.seq, CONTRACT_WAIT_S)
                return {
                    "contract": deployed.contract,
                    "seq": deployed.seq,
                    "code_id": self.node.enclave.state.contracts[deployed.contract].code_id,
                    "status": outcome.status if outcome is not None else "pending",
                }
            case CallContract():
                return await self.call_contract(request, by)
            case ContractRead():
                return await self.read_contracts(request)  # type: ignore[no-any-return]
            case DataWrite():
                return await self.data_write(request, by)
            case DataRead():
                return self.data_read(request, by)  # type: ignore[no-any-return]
            case RecoveryRead(what="status"):
                return self.recovery_status()
            case RecoveryRead():
                return self.recovery_key()
            case SubmitShare():
                return await self.submit_share(request, by)
            case TransferLeader(to=to, timeout=timeout):
                return await self.transfer_leader(to, timeout)
            case AuditRead(since=since, limit=limit):
                return audit_records(self.node.enclave.state, since, limit)
            case SnapshotRead(offset=offset, snapshot=wanted):
                return await self.snapshots.chunk(offset, wanted)
            case ResyncContracts():
                self.node.contracts.resync()
                return {"node": self.node.name, "resync": "started"}
            case Prove(key=key, generation=generation, challenge=challenge):
                try:
                    mac = await self.node.service.prove(key, generation, challenge)
                except ServiceRefused as exc:  # e.g. that key was never provisioned here
                    raise Failed.of(
                        "not_found", f"service enclave cannot prove it: {exc}"
                    ) from None
                except ServiceUnavailable as exc:
                    message = f"service enclave cannot prove it: {exc}"
                    raise Failed.of("service_unavailable", message) from None
                return {"node": self.node.name, "key": key, "generation": generation, "mac": mac}
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
        self,
        kind: type[CommandModel],
        *,
        auth: AuthStamp,
        timeout: float = 5.0,
        ready: bool = True,
        **fields: Any,
    ) -> Applied:
        """Build a ``kind`` command from the request's fields (refused here, before anything
        is proposed, if a field is malformed or the request was made before) and commit it on
        this leader (``ready=False``: the caller checked the leadership, recovery mode allows
        it). The state machine checks the request id and role again when it applies the
        command: two copies proposed at once commit once."""
        if ready:
            self._require_leader()
        if auth.request in self.node.enclave.state.requests:
            raise Failed.of("replay", f"request {auth.request} was made before")
        try:
            command = kind(auth=auth, **fields)
        except ValidationError as exc:  # malformed: the same check the state machine makes
            raise Failed.of(
                "bad_request", explain(exc, tagged=False), field=field_path(exc, tagged=False)
            ) from None
        result = await self.node.propose(command.encode(), timeout)
        if isinstance(result, Refused):
            raise Failed.of(result.code, result.error)
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
            mode=node.mode,
            recovering=node.recovery.recovering,
        )

    async def read(self, request: ReadRequest) -> Any:
        node = self.node
        if request.linearizable:
            self._require_ready()
            await node.raft().read_index()
        state = node.enclave.state
        match request.what:
            case "keys":
                # In pages of names (a reply is one circuit record: 100,000 keys at once
                # would be refused); ``next`` is the name to ask after, None at the end.
                names = sorted(n for n in state.keys if request.after is None or n > request.after)
                page = names[: request.limit]
                more = len(names) > request.limit
                return {
                    "keys": [dataclasses.asdict(state.keys[n]) for n in page],
                    "next": page[-1] if more else None,
                }
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
            case "proposals":
                return {"proposals": [self._proposal_view(p) for p in state.proposals.values()]}
            case "proposal":
                proposal = state.proposals.get(request.name or "")
                if proposal is None:
                    raise Failed.of("not_found", f"no proposal {request.name!r}")
                return self._proposal_view(proposal)
            case "identities":
                return {
                    "identities": [i.model_dump(mode="json") for i in state.identities.values()],
                    "admins": state.admins(),
                    "votes_needed": state.votes_needed(),
                    "threshold": state.threshold,
                    "chaos_enabled": state.chaos_enabled,
                }

    def _proposal_view(self, proposal: Proposal) -> dict[str, Any]:
        """A proposal as the API shows it: its record and, while open, the votes it needs."""
        state = self.node.enclave.state
        return {**dataclasses.asdict(proposal), "needed": state.votes_needed()}

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

    # --- leadership ---------------------------------------------------------------------------

    async def transfer_leader(self, to: str, timeout: float) -> dict[str, Any]:
        """Ask Raft to hand the leadership to ``to`` (a voting member) and wait, at most
        ``timeout`` seconds, until this node sees it lead."""
        self._require_leader()
        node = self.node
        driver = node.raft()
        if to == node.name:
            return {"leader": to, "previous": to, "moved": False}
        if to not in driver.status.conf.voters:
            raise Failed.of("bad_request", f"{to!r} is not a voting member", field="to")
        driver.transfer_leadership(to)
        for _ in range(int(timeout / TRANSFER_POLL_S) + 1):
            if driver.leader == to:
                return {"leader": to, "previous": node.name, "moved": True}
            await asyncio.sleep(TRANSFER_POLL_S)
        raise Failed.of(
            "timeout",
            f"the leadership did not move to {to} within {timeout:g} s (is it behind, or "
            "unreachable? it may still move)",
        )

    # --- recovery ---------------------------------------------------------------------------

    def recovery_status(self) -> dict[str, Any]:
        node = self.node
        state = node.enclave.state
        return {
            "node": node.name,
            "mode": node.mode,
            "recovering": node.recovery.recovering,
            "error": node.recovery.error or None,
            "has_master_secret": node.enclave.has_master_secret,
            "cluster": state.cluster or None,
            "applied": state.applied_index,
            "members": [
                {
                    "name": m.name,
                    "platform_id": m.platform_id,
                    "host": m.host,
                    "api_port": m.api_port,
                }
                for m in sorted(state.members.values(), key=lambda m: m.name)
            ],
            **state.recovery.view(state.identities),
        }

    def recovery_key(self) -> dict[str, Any]:
        enclave = self.node.enclave
        try:
            box_key, quote = enclave.recovery_key(time.time())
        except EnclaveStateError as exc:
            raise Failed.of("not_found", str(exc)) from None
        return {
            "node": self.node.name,
            "platform_id": enclave.platform_id,
            "box_key": box_key,
            "quote": quote.hex(),
        }

    async def submit_share(self, request: SubmitShare, by: Verified) -> dict[str, Any]:
        """Check the share against its commitment here, at once (a bogus one is refused naming
        its holder and never reaches the ledger), then commit it, boxes and all. A node in
        recovery mode is not ready, but its Raft is: the leader takes shares."""
        driver = self.node.driver
        if driver is None or not driver.is_leader:
            raise NotLeader(driver.leader if driver else "")
        holder = by.identity.name
        try:
            self.node.enclave.check_recovery_share(holder, request.generation, request.boxes)
        except (EnclaveStateError, RecoveryError) as exc:
            raise Failed.of("refused", f"{exc}; nothing was recorded") from None
        accepted = await self._commit(
            RecoveryShare,
            auth=_stamp(by),
            ready=False,
            generation=request.generation,
            boxes=request.boxes,
        )
        return accepted.public()

    # --- contracts --------------------------------------------------------------------------

    async def call_contract(self, request: CallContract, by: Verified) -> dict[str, Any]:
        """Commit the call, then wait for this node's service enclave to execute it: the
        result comes back sealed to the caller (the host sees ciphertext only)."""
        called = await self._commit(
            ContractCall,
            auth=_stamp(by),
            contract=request.contract,
            function=request.function,
            args=request.args,
            nonce=request.nonce,
            fuel=request.fuel,
        )
        assert isinstance(called, ContractOpCommitted)
        outcome = await self.node.contracts.outcome(called.seq, min(request.timeout, 60.0))
        if outcome is None:
            halted = self.node.contracts.halted
            return {"seq": called.seq, "status": "pending", "halted": halted or None}
        return {"seq": called.seq, **outcome.model_dump()}

    async def read_contracts(self, request: ContractRead) -> Any:
        state = self.node.enclave.state
        match request.what:
            case "contracts":
                return {"contracts": [_contract_view(c) for c in state.contracts.values()]}
            case "contract":
                record = state.contracts.get(request.name or "")
                if record is None:
                    raise Failed.of("not_found", f"no contract named {request.name!r}")
                checkpoints = [
                    {"seq": c.seq, "index": c.index, "root": c.roots.get(record.name)}
                    for c in state.checkpoints
                    if record.name in c.roots
                ]
                return {**_contract_view(record), "checkpoints": checkpoints}
            case "input-key":
                self._require_ready()
                return {"input_key": self.node.enclave.contract_input_key().hex()}
            case "node":
                return {
                    **await self.node.contracts.status(),
                    "checkpoints": [dataclasses.asdict(c) for c in state.checkpoints],
                }

    # --- data authorization -------------------------------------------------------------------

    async def data_write(self, request: DataWrite, by: Verified) -> dict[str, Any]:
        """Commit a data command; for a computation (the authentication transaction, on this
        node unless ``node`` names another platform), wait up to ``timeout`` for its token to
        end, and hand back the sealed result if this node computed it."""
        kind = DATA_COMMANDS[request.command]
        fields: dict[str, Any] = dict(request.fields)
        reserved = sorted({"auth", "op", "timeout"} & fields.keys())
        if reserved:
            raise Failed.of("bad_request", f"{reserved[0]!r} is not a field a request may set")
        if kind is DataCompute:
            fields.setdefault("node", self.node.name)
        result = await self._commit(kind, auth=_stamp(by), **fields)
        if not isinstance(result, TokenIssued):
            return result.public()
        feed = self.node.data
        await feed.wait_finished(result.token, min(request.timeout, 60.0))
        token = self.node.enclave.state.data.tokens[result.token]
        view: dict[str, Any] = {**result.public(), **token.public()}
        outcome = feed.result(result.token)
        if outcome is not None:
            view["sealed"] = outcome.sealed
        return view

    def data_read(self, request: DataRead, by: Verified) -> Any:
        data = self.node.enclave.state.data
        filters = request.filters
        match request.what:
            case "datasets":
                return {"datasets": [asdict(d) for d in data.datasets.values()]}
            case "dataset":
                dataset = data.datasets.get(request.name or "")
                if dataset is None:
                    raise Failed.of("not_found", f"no dataset named {request.name!r}")
                grants = [asdict(g) for g in data.grants.values() if g.dataset == dataset.name]
                return {**asdict(dataset), "grants": grants}
            case "grants":
                return {"grants": _filtered(map(asdict, data.grants.values()), filters)}
            case "requests":
                return {"requests": _filtered(map(asdict, data.requests.values()), filters)}
            case "tokens":
                return {"tokens": _filtered((t.public() for t in data.tokens.values()), filters)}
            case "token":
                token = data.tokens.get(request.name or "")
                if token is None:
                    raise Failed.of("not_found", f"no token {request.name!r}")
                self._require_ready()
                body, signature = self.node.enclave.token_signature(token.id)
                return {**token.public(), "body": body.decode(), "signature": signature}
            case "result":
                return self._data_result(request.name or "", by)
            case "keys":
                self._require_ready()
                return {
                    **self.node.enclave.data_public_keys(),
                    "input_key": self.node.enclave.contract_input_key().hex(),
                }
            case "node":
                return self.node.data.status()
            case "ops":
                builtin = [
                    {"name": s.name, "version": s.version, "kind": s.kind,
                     "checksum": s.checksum, "wasm": False}
                    for s in BUILTIN_OPS.values()
                ]  # fmt: skip
                registered = [
                    {"name": o.name, "version": o.version, "kind": "aggregate",
                     "checksum": o.checksum, "wasm": True, "by": o.by}
                    for o in data.ops.values()
                ]  # fmt: skip
                return {"ops": builtin + registered}

    def _data_result(self, token_id: str, by: Verified) -> dict[str, Any]:
        token = self.node.enclave.state.data.tokens.get(token_id)
        if token is None:
            raise Failed.of("not_found", f"no token {token_id!r}")
        if token.user != by.identity.name:
            raise Failed.of("forbidden", f"token {token_id} is {token.user}'s")
        outcome = self.node.data.result(token_id)
        if outcome is None:
            where = f"node {token.node}" if token.node != self.node.name else "this node"
            raise Failed.of(
                "not_found",
                f"{where} holds no result for {token_id} (state {token.state}); results are "
                f"kept by their platform node and published on MQTT",
            )
        return {**token.public(), "sealed": outcome.sealed}

    # --- writes -----------------------------------------------------------------------------

    async def release(self, request: ReleaseKey, by: Verified) -> dict[str, Any]:
        """Commit one release request per target node, then wait for their outcomes."""
        node = self.node
        state = node.enclave.state
        targets = sorted(state.members) if request.node == "all" else [request.node]
        release_ids = []
        for part, target in enumerate(targets):
            result = await self._commit(
                ReleaseRequest,
                auth=_stamp(by, part if len(targets) > 1 else None),
                key=request.key,
                node=target,
                generation=request.generation,
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

    async def propose(self, actions: list[Any], by: Verified) -> Applied:
        """Commit a proposal of ``actions`` with the proposer's vote for it; if that passed it
        (one admin, or a threshold of one), what the actions need besides the state follows."""
        proposed = await self._commit(ProposalCreate, auth=_stamp(by), actions=actions)
        await self._after_governance(proposed)
        return proposed

    async def _after_governance(self, result: Applied) -> None:
        """A proposal that removed members passed: take them out of Raft's voters too (the
        leader that committed it does; a retry of `members remove` finishes it otherwise)."""
        if not isinstance(result, ProposalChanged) or result.state != "accepted":
            return
        proposal = self.node.enclave.state.proposals[result.proposal]
        driver = self.node.driver
        for action in proposal.actions:
            if (
                action["op"] == "member.remove"
                and driver is not None
                and action["name"] in driver.status.conf.voters
            ):
                await driver.propose_conf_change(
                    ConfChange(ConfChangeType.REMOVE_NODE, action["name"])
                )

    async def remove_member(self, name: Any, by: Verified) -> dict[str, JsonValue]:
        """A proposal to remove the member, then the Raft voter once it passed. A retry after
        the proposal passed (and the conf change was busy or timed out) finishes the second."""
        driver = self.node.driver
        voter = driver is not None and isinstance(name, str) and name in driver.status.conf.voters
        if voter and name not in self.node.enclave.state.members:
            self._require_leader()
            assert driver is not None
            # A RaftError here (another change in flight) is a 503: the caller retries.
            await driver.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, name))
            return MemberChanged(name).public()
        return (await self.propose([{"op": "member.remove", "name": name}], by)).public()


DATA_COMMANDS: dict[str, type[CommandModel]] = {
    "data.register": DataRegister,
    "data.grant": DataGrant,
    "data.request": DataRequest,
    "data.approve": DataApprove,
    "data.deny": DataDeny,
    "data.revoke": DataRevoke,
    "data.compute": DataCompute,
    "data.op_register": DataOpRegister,
}


def _filtered(records: Iterable[dict[str, Any]], filters: Mapping[str, str]) -> list[Any]:
    """The records whose fields equal every filter (``dataset``, ``user``, ``state``...)."""
    return [r for r in records if all(str(r.get(k, "")) == v for k, v in filters.items())]


def _stamp(by: Verified, part: int | None = None) -> AuthStamp:
    """The command's record of the signed request it comes from (``part`` numbers the
    commands of a request that commits several)."""
    request = by.request_id if part is None else f"{by.request_id}/{part}"
    return AuthStamp(by=by.identity.name, request=request, created=by.created)


def _contract_view(record: ContractRecord) -> dict[str, Any]:
    """A contract as the API lists it (its code stays in the state: it is public, but large)."""
    view = dataclasses.asdict(record)
    del view["code"]
    return view


def _key_view(result: Applied) -> dict[str, JsonValue]:
    """What a key's creation or rotation answers: the key and its current generation."""
    assert isinstance(result, KeyGeneration)
    return {"key": result.key, "generation": result.generation}
