"""The KM state machine that Raft replicates: keys, policy, members, releases, ledger chain.

Every KM enclave applies the same committed commands in the same order and must reach the same
state, so ``apply`` is a pure function of (state, index, command bytes): no clock, no
randomness, no I/O, and refusals are results, not exceptions, because a command that one node
refuses every node refuses identically. Nothing here is secret: keys are *derived* inside the
enclave from the master secret and (name, generation), so the ledger only holds metadata and
the host may store it in plaintext.

Each applied command extends a hash chain (``chain_hash``, over index and bytes) so a ledger
copied off a node can be checked offline, and signatures over the chain by the leader's enclave
can be verified later. Raft's own entries (leader NOOPs, membership changes) never reach the
state machine, so indexes increase but need not be contiguous.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import Quote, QuoteVerifier, report_data_for
from kmnode.identity import PublicIdentity
from kmnode.km.command_base import EnclaveSigned
from kmnode.km.commands import (
    MAX_DEPLOY_CODE_BYTES,
    Action,
    Applied,
    AuthStamp,
    ChaosChanged,
    ChaosSet,
    ClusterInit,
    ClusterInitialised,
    Command,
    CommandModel,
    CommandRefused,
    ConstitutionChanged,
    ConstitutionSet,
    ContractCall,
    ContractCheckpoint,
    ContractCheckpointed,
    ContractDeploy,
    ContractOpCommitted,
    IdentityChanged,
    IdentityRemove,
    IdentitySet,
    KeyCreate,
    KeyGeneration,
    KeyRotate,
    LedgerSign,
    LedgerSigned,
    MemberAdd,
    MemberChanged,
    MemberRecord,
    MemberRemove,
    NodeAdmit,
    NodeAdmitted,
    PlatformRevoked,
    PolicyAllow,
    PolicyChanged,
    PolicyDisallow,
    PolicyReplaced,
    PolicyRevokePlatform,
    PolicySet,
    ProposalChanged,
    ProposalCreate,
    ProposalVote,
    ProposalWithdraw,
    Refused,
    ReleaseCompleted,
    ReleaseOutcome,
    ReleaseRequest,
    ReleaseRequested,
    canonical,
    parse,
)
from kmnode.km.data_commands import (
    DataApprove,
    DataCompute,
    DataConsume,
    DataDeny,
    DataGrant,
    DataOpRegister,
    DataRegister,
    DataRequest,
    DataRevoke,
    ServiceMeasured,
)
from kmnode.km.dataauth import WASM_MAGIC, DataAuthState
from kmnode.km.ledger_proof import SIGNER_LABEL, head_message, signature_holds
from kmnode.km.recovery_commands import RecoveryShare, RecoveryShares, RecoveryThresholdSet
from kmnode.km.recovery_state import RecoveryState

#: Releases per ``json.dumps`` call when a snapshot is serialised: each call holds the GIL, so
#: chunks keep a snapshot taken in a worker thread from stalling the event loop for long.
SNAPSHOT_CHUNK = 1000
GENESIS_HASH = bytes(32)
#: How long a committed request id is kept (seconds of creation time before the newest one):
#: longer than a signature is accepted (``kmnode.identity.MAX_AGE_S`` plus the clock skew),
#: so a replay is refused as a replay, or as too old, never applied.
REQUEST_RETAIN_S = 180


def encode_command(op: str, **fields: Any) -> bytes:
    """Canonical bytes for any command-shaped object, checked or not: what tests and tools use
    to write what a faulty or malicious member could commit. Nodes build ``commands`` models."""
    return canonical({"op": op, **fields}, allow_nan=True)


def chain_step(previous: bytes, index: int, data: bytes) -> bytes:
    return hashlib.blake2b(previous + index.to_bytes(8, "big") + data, digest_size=32).digest()


@dataclass
class KeyRecord:
    name: str
    generation: int
    #: Service measurements (hex) allowed to receive this key; empty means "the policy's".
    allowed_service: list[str]
    created_index: int
    rotated_index: int


@dataclass
class Member:
    name: str
    platform_id: str
    host: str
    peer_port: int
    api_port: int
    joined_index: int


@dataclass(frozen=True)
class Release:
    """One release. Immutable: the outcome replaces the record, so a snapshot can share the
    records (it copies only the list of them) while later entries keep being applied."""

    id: str
    key: str
    generation: int
    node: str
    requested_index: int
    status: str = "requested"  # requested | provisioned | refused
    reason: str = ""
    service_measurement: str = ""
    completed_index: int = 0


@dataclass
class ContractRecord:
    """A deployed contract: its code (base64 wasm: a service enclave that restores from a
    checkpoint needs it long after the deploy left the log) and where it entered the sequence."""

    name: str
    code: str
    code_id: str
    deployed_seq: int
    deployed_index: int
    deployed_by: str
    calls: int = 0


@dataclass(frozen=True)
class ContractOp:
    """One committed contract operation, numbered in the contract sequence (``seq``): what a
    service enclave executes, in this order. Kept in the state from just after the older of
    the last two checkpoints, so a service that restarts from either can replay the rest."""

    seq: int
    index: int
    kind: str  # deploy | call
    contract: str
    function: str = ""
    #: Sealed to the contract-input key (base64): only service enclaves open it.
    args: str = ""
    caller: str = ""
    #: The caller's X25519 key (hex) at commit time: the result is sealed to it.
    caller_box_key: str = ""
    nonce: str = ""
    fuel: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """The state roots (hex, by contract) every service enclave must have after op ``seq``."""

    seq: int
    index: int
    roots: dict[str, str]


@dataclass
class Proposal:
    """A governance proposal: its actions (as their canonical JSON), who made it, the admins'
    ballots, and its state (``open``, then ``accepted``, ``failed``, ``rejected`` or
    ``withdrawn``)."""

    id: str
    proposer: str
    actions: list[dict[str, Any]]
    created_index: int
    state: str = "open"
    ballots: dict[str, str] = field(default_factory=dict)
    closed_index: int = 0
    error: str = ""


@dataclass
class KMState:
    cluster: str = ""
    #: Random id the genesis enclave chose (hex), and the chain hash right after the
    #: ``cluster.init`` entry: what sealed state is bound to (see ``KMEnclave.check_binding``).
    cluster_id: str = ""
    genesis_hash: bytes = b""
    policy: Policy = field(default_factory=Policy)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    releases: dict[str, Release] = field(default_factory=dict)
    applied_index: int = 0
    chain_hash: bytes = GENESIS_HASH
    #: Index the newest ledger signature covers, and the index of that ``ledger.sign`` entry.
    last_signed_index: int = 0
    last_signature_entry: int = 0
    #: Operator identities and their roles (genesis from cluster.yaml, then governance).
    identities: dict[str, PublicIdentity] = field(default_factory=dict)
    #: Ids of the signed requests committed in the last ``REQUEST_RETAIN_S`` (id -> created),
    #: in commit order, and the newest creation time seen (see ``_check_auth``).
    requests: dict[str, int] = field(default_factory=dict)
    newest_request: int = 0
    #: Governance: proposals by id, admins' votes a proposal needs (0: a majority of the
    #: admins), and whether the chaos routes are open.
    proposals: dict[str, Proposal] = field(default_factory=dict)
    threshold: int = 0
    chaos_enabled: bool = False
    #: Nodes governance admitted (name -> the member record they may join with), and nodes
    #: a rejected proposal would have admitted (refused when they ask).
    admitted: dict[str, MemberRecord] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)
    #: Confidential contracts: deployed contracts, the last operation's number, the
    #: operations a service may still need to replay, the newest two checkpoints (oldest
    #: first), and the nonces of the calls among those operations.
    contracts: dict[str, ContractRecord] = field(default_factory=dict)
    contract_seq: int = 0
    contract_ops: list[ContractOp] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    call_nonces: set[str] = field(default_factory=set)
    #: Data authorization: datasets, requests, grants, tokens (``kmnode.km.dataauth``).
    data: DataAuthState = field(default_factory=DataAuthState)
    #: Recovery: the split of the master secret and a recovery's shares
    #: (``kmnode.km.recovery_state``).
    recovery: RecoveryState = field(default_factory=RecoveryState)
    #: Checks quotes in enclave-signed commands against the vendor root (the enclave sets it;
    #: not part of the replicated data). Every node has the same root, so the verdict is the
    #: same everywhere; freshness is judged at the quote's own time, for the same reason.
    quote_verifier: QuoteVerifier | None = field(default=None, compare=False, repr=False)

    @property
    def member_names(self) -> frozenset[str]:
        return frozenset(self.members)

    # --- applying ---------------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> Applied:
        """Apply the committed command at ``index``; its result (``Refused`` if refused)."""
        if index <= self.applied_index:
            raise ValueError(f"apply out of order: got {index}, applied {self.applied_index}")
        self.applied_index = index
        self.chain_hash = chain_step(self.chain_hash, index, data)
        try:
            command = parse(data)
            self._check_auth(command)
            if command.auth is not None:
                # Spent even if the command is refused below: a request refused now must not
                # apply later, replayed into a state that would accept it.
                self._remember(command.auth)
            return _HANDLERS[type(command)](self, index, command)
        except CommandRefused as exc:
            return Refused(str(exc), exc.code)
        except Exception as exc:  # a committed entry must never stop the log
            # A case no check foresaw. Every node runs the same code on the same bytes, so
            # every node refuses it alike; raising would stop the Raft driver on every node,
            # and again after every restart, since the entry replays.
            return Refused(f"command could not be applied ({type(exc).__name__})")

    # --- who may ask ------------------------------------------------------------------------

    def _check_auth(self, command: Command) -> None:
        """An operator's command must come from a signed request of an identity that holds
        its role now, made at most ``REQUEST_RETAIN_S`` before the newest one committed, whose
        id has not committed before. A cluster without identities (a ledger from before
        they existed) applies its commands as it always did."""
        role, auth = command.ROLE, command.auth
        if role is None or not self.identities:
            return
        if type(command) in _PROPOSAL_ONLY:
            raise CommandRefused(
                f"{command.op} takes effect only as a passed proposal", "forbidden"
            )
        if auth is None:
            raise CommandRefused(f"{command.op} needs a signed request", "forbidden")
        identity = self.identities.get(auth.by)
        if identity is None:
            raise CommandRefused(f"no identity named {auth.by!r}", "unknown_identity")
        if not identity.may(role):
            raise CommandRefused(
                f"{auth.by!r} ({', '.join(identity.roles)}) may not {command.op}: "
                f"it needs the {role} role",
                "forbidden",
            )
        if auth.request in self.requests:
            raise CommandRefused(f"request {auth.request} was made before", "replay")
        if auth.created < self.newest_request - REQUEST_RETAIN_S:
            raise CommandRefused(
                f"request {auth.request} is older than {REQUEST_RETAIN_S} s", "replay"
            )

    def _remember(self, auth: AuthStamp) -> None:
        """Commit a request id; forget those older than the window (the oldest were committed
        first, so pruning stops at the first that is still young enough)."""
        self.requests[auth.request] = auth.created
        self.newest_request = max(self.newest_request, auth.created)
        horizon = self.newest_request - REQUEST_RETAIN_S
        while self.requests:
            oldest = next(iter(self.requests))
            if self.requests[oldest] >= horizon:
                break
            del self.requests[oldest]

    # --- handlers ---------------------------------------------------------------------------

    def _init(self, index: int, cmd: ClusterInit) -> Applied:
        if self.cluster:
            raise CommandRefused(f"cluster {self.cluster!r} is already initialised")
        policy = _policy(cmd.policy)
        previous, self.policy = self.policy, policy
        try:
            self._add_member(index, cmd.member)  # judged under the cluster's policy
        except CommandRefused:
            self.policy = previous  # a refused command changes nothing
            raise
        self.cluster = cmd.cluster
        self.cluster_id = cmd.cluster_id
        self.identities = {i.name: i for i in cmd.identities}
        self.chaos_enabled = bool(cmd.chaos_enabled)
        self.admitted = {m.name: m for m in cmd.admitted or []}
        self.recovery.threshold = cmd.recovery_threshold or 0
        self.genesis_hash = self.chain_hash
        return ClusterInitialised(cmd.cluster)

    def _member_add(self, index: int, cmd: MemberAdd) -> Applied:
        self._require_init()
        if self.identities and self.admitted.get(cmd.member.name) != cmd.member:
            # A governed cluster: only a node a proposal (or genesis) admitted, as admitted.
            raise CommandRefused(f"{cmd.member.name!r} is not admitted as that member")
        member = self._add_member(index, cmd.member)
        return MemberChanged(member.name)

    def _add_member(self, index: int, record: MemberRecord) -> Member:
        name, platform_id = record.name, record.platform_id
        if name in self.members:
            raise CommandRefused(f"{name!r} is already a member")
        if platform_id in self.policy.revoked_platforms:
            raise CommandRefused(f"platform {platform_id!r} is revoked")
        if any(m.platform_id == platform_id for m in self.members.values()):
            raise CommandRefused(f"platform {platform_id!r} already hosts a member")
        member = Member(
            name=name,
            platform_id=platform_id,
            host=record.host,
            peer_port=record.peer_port,
            api_port=record.api_port,
            joined_index=index,
        )
        self.members[name] = member
        return member

    def _member_remove(self, index: int, cmd: MemberRemove) -> Applied:
        self._require_init()
        if cmd.name not in self.members:
            raise CommandRefused(f"{cmd.name!r} is not a member")
        if len(self.members) == 1:
            raise CommandRefused("cannot remove the last member")
        del self.members[cmd.name]
        self.admitted.pop(cmd.name, None)  # to come back, it needs admitting again
        return MemberChanged(cmd.name)

    def _key_create(self, index: int, cmd: KeyCreate) -> Applied:
        self._require_init()
        if cmd.name in self.keys:
            raise CommandRefused(f"key {cmd.name!r} already exists")
        allowed = sorted(set(cmd.allowed_service))
        self.keys[cmd.name] = KeyRecord(cmd.name, 1, allowed, index, index)
        return KeyGeneration(cmd.name, 1)

    def _key_rotate(self, index: int, cmd: KeyRotate) -> Applied:
        record = self._key(cmd.key)
        record.generation += 1
        record.rotated_index = index
        return KeyGeneration(record.name, record.generation)

    def _release_request(self, index: int, cmd: ReleaseRequest) -> Applied:
        record = self._key(cmd.key)
        if cmd.node not in self.members:
            raise CommandRefused(f"{cmd.node!r} is not a member")
        generation = record.generation if cmd.generation is None else cmd.generation
        if not 1 <= generation <= record.generation:
            raise CommandRefused(
                f"key {record.name!r} has generations 1..{record.generation}, not {generation!r}"
            )
        release = Release(f"r{index}", record.name, generation, cmd.node, index)
        self.releases[release.id] = release
        return ReleaseRequested(release.id, record.name, generation, cmd.node)

    def _release_outcome(self, index: int, cmd: ReleaseOutcome) -> Applied:
        release = self.releases.get(cmd.release)
        if release is None:
            raise CommandRefused(f"no release {cmd.release!r}")
        if release.status != "requested":
            raise CommandRefused(f"release {cmd.release} is already {release.status}")
        if cmd.node != release.node:
            raise CommandRefused(f"release {cmd.release} targets {release.node!r}")
        measurement = cmd.service_measurement
        if cmd.status == "provisioned" and not self.service_allowed(release.key, measurement):
            raise CommandRefused(
                f"measurement {measurement[:16]}… is not allowed to receive {release.key!r}"
            )
        self.releases[cmd.release] = replace(
            release,
            status=cmd.status,
            reason=cmd.reason[:500],
            service_measurement=measurement,
            completed_index=index,
        )
        return ReleaseCompleted(cmd.release, cmd.status)

    def _policy_set(self, index: int, cmd: PolicySet) -> Applied:
        self._require_init()
        self.policy = _policy(cmd.policy)
        return PolicyReplaced(self.policy.to_dict())

    def _policy_change(self, index: int, cmd: PolicyAllow | PolicyDisallow) -> Applied:
        role, measurement = EnclaveRole(cmd.role), bytes.fromhex(cmd.measurement)
        change = self.policy.allow if isinstance(cmd, PolicyAllow) else self.policy.disallow
        self.policy = change(role, measurement)
        return PolicyChanged(role.value, cmd.measurement)

    def _policy_revoke_platform(self, index: int, cmd: PolicyRevokePlatform) -> Applied:
        self.policy = self.policy.revoke_platform(cmd.platform_id)
        return PlatformRevoked(cmd.platform_id)

    # --- governance ---------------------------------------------------------------------------

    def admins(self) -> list[str]:
        return sorted(n for n, i in self.identities.items() if "admin" in i.roles)

    def votes_needed(self) -> int:
        """Votes that pass a proposal: the constitution's threshold, else a majority."""
        return self.threshold or len(self.admins()) // 2 + 1

    def _proposal_create(self, index: int, cmd: ProposalCreate) -> Applied:
        self._require_init()
        assert cmd.auth is not None  # _check_auth: a proposal comes from a signed request
        proposal = Proposal(
            id=f"p{index}",
            proposer=cmd.auth.by,
            actions=[a.model_dump(mode="json", exclude_none=True) for a in cmd.actions],
            created_index=index,
            ballots={cmd.auth.by: "for"},
        )
        self.proposals[proposal.id] = proposal
        return self._tally(index, proposal, cmd.actions)

    def _proposal_vote(self, index: int, cmd: ProposalVote) -> Applied:
        assert cmd.auth is not None
        proposal = self._open_proposal(cmd.proposal)
        proposal.ballots[cmd.auth.by] = cmd.ballot
        actions = [_ACTION.validate_python(a) for a in proposal.actions]
        return self._tally(index, proposal, actions)

    def _proposal_withdraw(self, index: int, cmd: ProposalWithdraw) -> Applied:
        assert cmd.auth is not None
        proposal = self._open_proposal(cmd.proposal)
        if proposal.proposer != cmd.auth.by:
            raise CommandRefused(
                f"only {proposal.proposer!r}, who made {proposal.id}, may withdraw it", "forbidden"
            )
        proposal.state, proposal.closed_index = "withdrawn", index
        return self._view(proposal)

    def _open_proposal(self, proposal_id: str) -> Proposal:
        self._require_init()
        proposal = self.proposals.get(proposal_id)
        if proposal is None:
            raise CommandRefused(f"no proposal {proposal_id!r}")
        if proposal.state != "open":
            raise CommandRefused(f"proposal {proposal_id} is {proposal.state}")
        return proposal

    def _tally(self, index: int, proposal: Proposal, actions: list[Action]) -> Applied:
        """Count the ballots of today's admins; apply the actions, all or none, once enough
        are for it; reject it once too many are against it to ever pass."""
        admins = set(self.admins())
        needed = self.votes_needed()
        votes_for = [n for n, b in proposal.ballots.items() if b == "for" and n in admins]
        against = [n for n, b in proposal.ballots.items() if b == "against" and n in admins]
        if len(votes_for) >= needed:
            proposal.state, proposal.closed_index = "accepted", index
            error = self._apply_actions(index, actions)
            if error:
                proposal.state, proposal.error = "failed", error
        elif len(against) > len(admins) - needed:
            proposal.state, proposal.closed_index = "rejected", index
            self.denied |= {a.member.name for a in actions if isinstance(a, NodeAdmit)}
        return self._view(proposal)

    def _apply_actions(self, index: int, actions: list[Action]) -> str:
        """Apply every action, or none: the first refusal restores what the others changed
        and is returned."""
        saved = (
            self.policy,
            dict(self.members),
            dict(self.identities),
            self.threshold,
            self.chaos_enabled,
            dict(self.admitted),
            set(self.denied),
            self.recovery.threshold,
        )
        try:
            for action in actions:
                _HANDLERS[type(action)](self, index, action)
            admins = self.admins()
            if not admins:
                raise CommandRefused("no admin would be left: nobody could govern")
            if self.threshold > len(admins):
                raise CommandRefused(
                    f"{self.threshold} votes could never be cast by {len(admins)} admin(s)"
                )
        except CommandRefused as exc:
            (
                self.policy,
                self.members,
                self.identities,
                self.threshold,
                self.chaos_enabled,
                self.admitted,
                self.denied,
                self.recovery.threshold,
            ) = saved
            return str(exc)
        return ""

    def _view(self, proposal: Proposal) -> ProposalChanged:
        admins = set(self.admins())
        return ProposalChanged(
            proposal.id,
            proposal.state,
            sorted(n for n, b in proposal.ballots.items() if b == "for" and n in admins),
            sorted(n for n, b in proposal.ballots.items() if b == "against" and n in admins),
            self.votes_needed(),
            proposal.error,
        )

    def _identity_set(self, index: int, cmd: IdentitySet) -> Applied:
        self.identities[cmd.identity.name] = cmd.identity
        return IdentityChanged(cmd.identity.name)

    def _identity_remove(self, index: int, cmd: IdentityRemove) -> Applied:
        if self.identities.pop(cmd.name, None) is None:
            raise CommandRefused(f"no identity named {cmd.name!r}")
        return IdentityChanged(cmd.name)

    def _constitution_set(self, index: int, cmd: ConstitutionSet) -> Applied:
        self.threshold = cmd.threshold
        return ConstitutionChanged(cmd.threshold)

    def _node_admit(self, index: int, cmd: NodeAdmit) -> Applied:
        record = cmd.member
        if record.name in self.members:
            raise CommandRefused(f"{record.name!r} is already a member")
        if record.platform_id in self.policy.revoked_platforms:
            raise CommandRefused(f"platform {record.platform_id!r} is revoked")
        self.admitted[record.name] = record
        self.denied.discard(record.name)
        return NodeAdmitted(record.name)

    def _chaos_set(self, index: int, cmd: ChaosSet) -> Applied:
        self.chaos_enabled = cmd.enabled
        return ChaosChanged(cmd.enabled)

    def _ledger_sign(self, index: int, cmd: LedgerSign) -> Applied:
        """Count a signature of the ledger only if it is one (its key signed that head) by the
        enclave of a member at this point (the quote's platform hosts a member): a signature
        that does not count must not make the leader think the ledger is signed. The quote is
        checked against the vendor root too (``check_enclave_proof``); that the signed chain
        hash is the history's is checked offline (``kmnode.ledger``), which has the history."""
        if not cmd.index < index:
            raise CommandRefused("ledger signature must cover an earlier index")
        if cmd.index <= self.last_signed_index:
            raise CommandRefused(f"index {cmd.index} is already covered by a signature")
        message = head_message(cmd.index, bytes.fromhex(cmd.chain_hash))
        self.check_enclave_proof(cmd, message, "ledger signature")
        self.last_signed_index = cmd.index
        self.last_signature_entry = index
        return LedgerSigned(cmd.index)

    def check_enclave_proof(self, cmd: EnclaveSigned, message: bytes, what: str) -> None:
        """Refuse ``cmd`` unless its signature over ``message`` is by a key its quote binds,
        from a KM enclave the policy allows, on a member's platform."""
        public_key = bytes.fromhex(cmd.public_key)
        try:
            signature = bytes.fromhex(cmd.signature)
            quote = Quote.decode(bytes.fromhex(cmd.quote))
        except (ValueError, AttestationError):
            raise CommandRefused(f"{what}: quote or signature is malformed") from None
        body = quote.body
        if body.report_data != report_data_for(SIGNER_LABEL, public_key):
            raise CommandRefused(f"{what}: the quote does not bind the signing key")
        if not signature_holds(public_key, message, signature):
            raise CommandRefused(f"{what} does not verify under its key")
        platform = body.platform_id
        if not any(m.platform_id == platform for m in self.members.values()):
            raise CommandRefused(f"{what} by platform {platform!r}, not a member's")
        if platform in self.policy.revoked_platforms or (
            body.identity.measurement not in self.policy.measurements_for(EnclaveRole.KM)
        ):
            raise CommandRefused(f"{what} by an enclave the policy does not allow")
        # Last: that the quote is the hardware's (vendor root, certificate, signature).
        if self.quote_verifier is not None:
            try:
                self.quote_verifier.verify(
                    quote,
                    self.policy,
                    body.report_data,
                    role=EnclaveRole.KM,
                    now=body.timestamp_ms / 1000,
                )
            except AttestationError as exc:
                raise CommandRefused(f"{what}: the quote does not verify: {exc}") from None

    # --- contracts ---------------------------------------------------------------------------

    def _contract_deploy(self, index: int, cmd: ContractDeploy) -> Applied:
        self._require_init()
        if cmd.name in self.contracts:
            raise CommandRefused(f"a contract named {cmd.name!r} exists")
        try:
            code = base64.b64decode(cmd.code, validate=True)
        except ValueError:
            raise CommandRefused("code: not base64") from None
        if len(code) > MAX_DEPLOY_CODE_BYTES or not code.startswith(WASM_MAGIC):
            raise CommandRefused(
                f"code: a WebAssembly binary of at most {MAX_DEPLOY_CODE_BYTES} bytes "
                "(kmctl compiles .wat)"
            )
        self.contract_seq += 1
        by = cmd.auth.by if cmd.auth is not None else ""
        self.contracts[cmd.name] = ContractRecord(
            cmd.name, cmd.code, hashlib.sha256(code).hexdigest(), self.contract_seq, index, by
        )
        self.contract_ops.append(ContractOp(self.contract_seq, index, "deploy", cmd.name))
        return ContractOpCommitted(cmd.name, self.contract_seq, "deploy")

    def _contract_call(self, index: int, cmd: ContractCall) -> Applied:
        self._require_init()
        if cmd.auth is None:
            raise CommandRefused("a contract call needs a signed request", "forbidden")
        contract = self.contracts.get(cmd.contract)
        if contract is None:
            raise CommandRefused(f"no contract named {cmd.contract!r}")
        if cmd.nonce in self.call_nonces:
            raise CommandRefused(f"nonce {cmd.nonce} was used before", "replay")
        caller = self.identities.get(cmd.auth.by)
        if caller is None:  # _check_auth found it; kept for a ledger without identities
            raise CommandRefused(f"no identity named {cmd.auth.by!r}", "unknown_identity")
        self.contract_seq += 1
        contract.calls += 1
        self.call_nonces.add(cmd.nonce)
        self.contract_ops.append(
            ContractOp(
                self.contract_seq,
                index,
                "call",
                cmd.contract,
                cmd.function,
                cmd.args,
                caller.name,
                caller.box_key,
                cmd.nonce,
                cmd.fuel,
            )
        )
        return ContractOpCommitted(cmd.contract, self.contract_seq, "call")

    def _contract_checkpoint(self, index: int, cmd: ContractCheckpoint) -> Applied:
        self._require_init()
        newest = self.checkpoints[-1].seq if self.checkpoints else 0
        if not newest < cmd.seq <= self.contract_seq:
            raise CommandRefused(
                f"a checkpoint now is for an operation after {newest} and at most "
                f"{self.contract_seq}, not {cmd.seq}"
            )
        expected = {c.name for c in self.contracts.values() if c.deployed_seq <= cmd.seq}
        if set(cmd.roots) != expected:
            raise CommandRefused(
                f"roots: for the contracts deployed by operation {cmd.seq}: "
                f"{sorted(expected)}, not {sorted(cmd.roots)}"
            )
        self.checkpoints = [*self.checkpoints, Checkpoint(cmd.seq, index, dict(cmd.roots))][-2:]
        # What a service restoring from the older kept checkpoint must replay stays; with one
        # checkpoint, everything (a service that had not reached it replays from the start).
        keep_after = self.checkpoints[0].seq if len(self.checkpoints) == 2 else 0
        dropped = [op for op in self.contract_ops if op.seq <= keep_after]
        if dropped:
            self.contract_ops = [op for op in self.contract_ops if op.seq > keep_after]
            self.call_nonces.difference_update(op.nonce for op in dropped if op.nonce)
        return ContractCheckpointed(cmd.seq)

    def contract_ops_after(self, seq: int) -> list[ContractOp]:
        """The kept operations after ``seq``, in order (a service's position)."""
        start = bisect.bisect_right([op.seq for op in self.contract_ops], seq)
        return self.contract_ops[start:]

    # --- queries ----------------------------------------------------------------------------

    def service_allowed(self, key: str, measurement_hex: str) -> bool:
        """May a service enclave with this measurement receive ``key``?"""
        record = self.keys.get(key)
        if record is None:
            return False
        if record.allowed_service:
            return measurement_hex in record.allowed_service
        return bytes.fromhex(measurement_hex or "00" * 32) in self.policy.measurements_for(
            EnclaveRole.SERVICE
        )

    def _key(self, name: str) -> KeyRecord:
        self._require_init()
        record = self.keys.get(name)
        if record is None:
            raise CommandRefused(f"no key named {name!r}")
        return record

    def _require_init(self) -> None:
        if not self.cluster:
            raise CommandRefused("the cluster is not initialised yet")

    # --- snapshots --------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return self.snapshot_capture()()

    def snapshot_capture(self) -> Callable[[], bytes]:
        """A consistent image of the state now, and a function that serialises it later.

        The capture is cheap (the small records are copied, the releases list is copied by
        reference: releases are immutable), so it can be taken on the event loop between two
        applies and serialised in a thread while applying goes on. Serialising the releases is
        the expensive part (it grows with the history): it runs chunk by chunk, without
        ``dataclasses.asdict``'s recursive deep copy (a frozen record's ``__dict__`` is already
        the flat dict), and the output is the same JSON that `restore` has always read.
        """
        head = {
            "cluster": self.cluster,
            "cluster_id": self.cluster_id,
            "genesis_hash": self.genesis_hash.hex(),
            "policy": self.policy.to_dict(),
            "keys": [asdict(k) for k in self.keys.values()],
            "members": [asdict(m) for m in self.members.values()],
            "applied_index": self.applied_index,
            "chain_hash": self.chain_hash.hex(),
            "last_signed_index": self.last_signed_index,
            "last_signature_entry": self.last_signature_entry,
            "identities": [i.model_dump(mode="json") for i in self.identities.values()],
            "requests": dict(self.requests),
            "newest_request": self.newest_request,
            "proposals": [asdict(p) for p in self.proposals.values()],
            "threshold": self.threshold,
            "chaos_enabled": self.chaos_enabled,
            "admitted": [m.model_dump(mode="json") for m in self.admitted.values()],
            "denied": sorted(self.denied),
            "contracts": [asdict(c) for c in self.contracts.values()],
            "contract_seq": self.contract_seq,
            "contract_ops": [vars(op) for op in self.contract_ops],
            "checkpoints": [asdict(c) for c in self.checkpoints],
        }
        head["recovery"] = self.recovery.capture()
        data = self.data.capture()
        releases = list(self.releases.values())

        def serialise() -> bytes:
            # The releases array is encoded in chunks and spliced into the object, whose keys
            # are written in sorted order: the bytes equal one json.dumps(sort_keys=True).
            parts = [b"["]
            for start in range(0, len(releases), SNAPSHOT_CHUNK):
                chunk = [vars(r) for r in releases[start : start + SNAPSHOT_CHUNK]]
                body = json.dumps(chunk, sort_keys=True, separators=(",", ":")).encode()
                parts.append(body[1:-1] if start == 0 else b"," + body[1:-1])
            parts.append(b"]")
            fields = {
                k: json.dumps(v, sort_keys=True, separators=(",", ":")).encode()
                for k, v in head.items()
            }
            fields["releases"] = b"".join(parts)
            fields["data"] = json.dumps(data(), sort_keys=True, separators=(",", ":")).encode()
            return (
                b"{"
                + b",".join(b'"%s":%s' % (k.encode(), fields[k]) for k in sorted(fields))
                + b"}"
            )

        return serialise

    @classmethod
    def restore(cls, blob: bytes) -> KMState:
        data = json.loads(blob)
        return cls(
            cluster=data["cluster"],
            cluster_id=data.get("cluster_id", ""),
            genesis_hash=bytes.fromhex(data.get("genesis_hash", "")),
            policy=Policy.from_dict(data["policy"]),
            keys={k["name"]: KeyRecord(**k) for k in data["keys"]},
            members={m["name"]: Member(**m) for m in data["members"]},
            releases={r["id"]: Release(**r) for r in data["releases"]},
            applied_index=data["applied_index"],
            chain_hash=bytes.fromhex(data["chain_hash"]),
            last_signed_index=data["last_signed_index"],
            last_signature_entry=data["last_signature_entry"],
            identities={
                i["name"]: PublicIdentity.model_validate(i) for i in data.get("identities", [])
            },
            requests=dict(data.get("requests", {})),
            newest_request=data.get("newest_request", 0),
            proposals={p["id"]: Proposal(**p) for p in data.get("proposals", [])},
            threshold=data.get("threshold", 0),
            chaos_enabled=data.get("chaos_enabled", False),
            admitted={m["name"]: MemberRecord.model_validate(m) for m in data.get("admitted", [])},
            denied=set(data.get("denied", [])),
            contracts={c["name"]: ContractRecord(**c) for c in data.get("contracts", [])},
            contract_seq=data.get("contract_seq", 0),
            contract_ops=[ContractOp(**op) for op in data.get("contract_ops", [])],
            checkpoints=[Checkpoint(**c) for c in data.get("checkpoints", [])],
            call_nonces={op["nonce"] for op in data.get("contract_ops", []) if op["nonce"]},
            data=DataAuthState.from_json(data.get("data")),
            recovery=RecoveryState.from_json(data.get("recovery")),
        )


_HANDLERS: dict[type[CommandModel], Callable[[KMState, int, Any], Applied]] = {
    ClusterInit: KMState._init,
    MemberAdd: KMState._member_add,
    MemberRemove: KMState._member_remove,
    KeyCreate: KMState._key_create,
    KeyRotate: KMState._key_rotate,
    ReleaseRequest: KMState._release_request,
    ReleaseOutcome: KMState._release_outcome,
    PolicySet: KMState._policy_set,
    PolicyAllow: KMState._policy_change,
    PolicyDisallow: KMState._policy_change,
    PolicyRevokePlatform: KMState._policy_revoke_platform,
    LedgerSign: KMState._ledger_sign,
    ProposalCreate: KMState._proposal_create,
    ProposalVote: KMState._proposal_vote,
    ProposalWithdraw: KMState._proposal_withdraw,
    IdentitySet: KMState._identity_set,
    IdentityRemove: KMState._identity_remove,
    ConstitutionSet: KMState._constitution_set,
    ChaosSet: KMState._chaos_set,
    NodeAdmit: KMState._node_admit,
    ContractDeploy: KMState._contract_deploy,
    ContractCall: KMState._contract_call,
    ContractCheckpoint: KMState._contract_checkpoint,
    DataOpRegister: lambda s, i, c: s.data.register_op(i, c, s),
    DataRegister: lambda s, i, c: s.data.register(i, c, s),
    DataGrant: lambda s, i, c: s.data.grant(i, c, s),
    DataRequest: lambda s, i, c: s.data.request(i, c, s),
    DataApprove: lambda s, i, c: s.data.approve(i, c, s),
    DataDeny: lambda s, i, c: s.data.deny(i, c, s),
    DataRevoke: lambda s, i, c: s.data.revoke(i, c, s),
    DataCompute: lambda s, i, c: s.data.compute(i, c, s),
    DataConsume: lambda s, i, c: s.data.consume(i, c, s),
    ServiceMeasured: lambda s, i, c: s.data.measured(i, c, s),
    RecoveryShares: lambda s, i, c: s.recovery.commit(i, c, s),
    RecoveryShare: lambda s, i, c: s.recovery.submit(i, c, s),
    RecoveryThresholdSet: lambda s, i, c: s.recovery.set_threshold(i, c, s),
}
_ACTION: TypeAdapter[Action] = TypeAdapter(Action)
#: Governance changes: in a cluster with identities, only a passed proposal applies them.
_PROPOSAL_ONLY: frozenset[type[CommandModel]] = frozenset(
    {PolicySet, PolicyAllow, PolicyDisallow, PolicyRevokePlatform, MemberRemove}
)


def _policy(raw: dict[str, Any]) -> Policy:
    try:
        return Policy.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CommandRefused(f"invalid policy: {exc}") from None
