"""The KM state machine's commands and their results, as typed records.

A command in the Raft log is one of these models, as canonical JSON (sorted keys, no spaces, no
unset optional fields), so the same command always has the same bytes and the ledger's hash
chain can cover them. ``parse`` turns committed bytes into exactly one model, or raises
``CommandRefused`` naming the field and what is wrong with it; the state machine never reads a
dict. Validation is strict (a ``true`` is not a generation, a ``NaN`` is no number, unknown
fields are refused): a committed command that every node refuses alike is harmless, one that
some code path accepts half-way is not. What depends on the state (does the key exist, is the
node a member) is the state machine's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from kmnode.identity import IdentityName, PublicIdentity
from kmnode.jsondepth import deeper_than
from kmnode.km.command_base import (
    MAX_COMMAND_BYTES,
    MAX_COMMAND_DEPTH,
    Applied,
    AuthStamp,
    Base64,
    CommandModel,
    CommandRefused,
    EnclaveSigned,
    Hex32,
    Name,
    PolicyJson,
    Port,
    RefusalCode,
    Refused,
    Text,
    canonical,
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
from kmnode.km.recovery_commands import (
    MAX_RECOVERY_HOLDERS,
    RecoveryShare,
    RecoveryShares,
    RecoveryThresholdSet,
)


class MemberRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Name
    platform_id: Name
    host: Text
    peer_port: Port
    api_port: Port


class ClusterInit(CommandModel):
    op: Literal["cluster.init"] = "cluster.init"
    cluster: Text
    #: Random id the genesis enclave chose (32 hex digits), or empty in old ledgers.
    cluster_id: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")] = ""
    policy: PolicyJson
    member: MemberRecord
    #: The genesis identities and their roles (cluster.yaml); later changes are governance.
    identities: list[PublicIdentity] = Field(default_factory=list, max_length=256)
    #: Whether the chaos routes are open from genesis (cluster.yaml ``governance.chaos``).
    chaos_enabled: bool | None = None
    #: The nodes cluster.yaml lists at genesis, admitted from the start (others need a proposal).
    admitted: list[MemberRecord] | None = Field(default=None, max_length=64)
    #: Shares that rebuild the master secret (cluster.yaml ``governance.recovery_threshold``).
    recovery_threshold: Annotated[int, Field(ge=0, le=MAX_RECOVERY_HOLDERS)] | None = None


class MemberAdd(CommandModel):
    op: Literal["member.add"] = "member.add"
    member: MemberRecord


class MemberRemove(CommandModel):
    op: Literal["member.remove"] = "member.remove"
    ROLE = "admin"
    name: Name


class KeyCreate(CommandModel):
    op: Literal["key.create"] = "key.create"
    ROLE = "operator"
    name: Name
    #: Service measurements allowed to receive this key; empty means "the policy's".
    allowed_service: list[Hex32] = Field(default_factory=list, max_length=64)


class KeyRotate(CommandModel):
    op: Literal["key.rotate"] = "key.rotate"
    ROLE = "operator"
    key: Name


class ReleaseRequest(CommandModel):
    op: Literal["release.request"] = "release.request"
    ROLE = "operator"
    key: Name
    node: Name
    #: Which generation to release; unset means the key's current one.
    generation: Annotated[int, Field(ge=1)] | None = None


class ReleaseOutcome(CommandModel):
    op: Literal["release.outcome"] = "release.outcome"
    release: Text
    node: Name
    status: Literal["provisioned", "refused"]
    #: Why it was refused (the state keeps the first 500 characters).
    reason: str = ""
    service_measurement: Hex32 | Literal[""] = ""


class PolicySet(CommandModel):
    op: Literal["policy.set"] = "policy.set"
    ROLE = "admin"
    policy: PolicyJson


class _RoleMeasurement(CommandModel):
    """A measurement allowed or disallowed for an enclave role."""

    ROLE = "admin"

    role: Literal["km", "service"]
    measurement: Hex32


class PolicyAllow(_RoleMeasurement):
    op: Literal["policy.allow"] = "policy.allow"


class PolicyDisallow(_RoleMeasurement):
    op: Literal["policy.disallow"] = "policy.disallow"


class PolicyRevokePlatform(CommandModel):
    op: Literal["policy.revoke_platform"] = "policy.revoke_platform"
    ROLE = "admin"
    platform_id: Name


class LedgerSign(EnclaveSigned):
    op: Literal["ledger.sign"] = "ledger.sign"
    #: The signer's applied index (8 bytes in what is signed: ``ledger_proof.head_message``).
    index: Annotated[int, Field(ge=1, lt=2**63)]
    chain_hash: Hex32


# --- confidential contracts (``kmnode.contracts``; executed by every service enclave) -------

#: A contract's name: also part of its state key's derivation and of every record's AAD.
ContractName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
#: The largest contract code a deploy carries (wasm binary; base64 in the command, which must
#: stay under ``MAX_COMMAND_BYTES``).
MAX_DEPLOY_CODE_BYTES = 40 * 1024
#: Longest sealed arguments of a call (base64 of a sealed box: 48 bytes of overhead, and the
#: caller's name and nonce beside the arguments).
MAX_SEALED_ARGS_CHARS = 24 * 1024
#: Most fuel a call may ask for (``kmnode.contracts.vm.MAX_FUEL``).
MAX_CALL_FUEL = 100_000_000


class ContractDeploy(CommandModel):
    """Deploy ``code`` (WebAssembly, base64) as contract ``name``: an operator's decision,
    which is also the consensus to provide its state key to every allowed service enclave."""

    op: Literal["contract.deploy"] = "contract.deploy"
    ROLE = "operator"
    name: ContractName
    code: Annotated[
        Base64, StringConstraints(min_length=8, max_length=MAX_DEPLOY_CODE_BYTES * 4 // 3 + 4)
    ]


class ContractCall(CommandModel):
    """Call ``function`` of ``contract``. ``args`` is sealed to the cluster's contract-input
    key (only service enclaves open it) and carries the caller's name and ``nonce`` too, so
    sealed arguments cut from one call are refused in another's; the nonce commits once."""

    op: Literal["contract.call"] = "contract.call"
    ROLE = "user"
    contract: ContractName
    function: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
    args: Annotated[Base64, StringConstraints(min_length=64, max_length=MAX_SEALED_ARGS_CHARS)]
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    fuel: Annotated[int, Field(ge=1, le=MAX_CALL_FUEL)] = 10_000_000


class ContractCheckpoint(CommandModel):
    """The state roots every service enclave must have reached after contract operation
    ``seq`` (hex, by contract): the leader proposes what its own service computed; a node
    whose roots differ stops executing contracts."""

    op: Literal["contract.checkpoint"] = "contract.checkpoint"
    seq: Annotated[int, Field(ge=1, lt=2**63)]
    roots: Annotated[dict[ContractName, Hex32], Field(max_length=1024)]


# --- governance: proposals, and the actions they carry ----------------------------------------


class IdentitySet(CommandModel):
    """Add an identity, or replace its keys and roles."""

    op: Literal["identity.set"] = "identity.set"
    identity: PublicIdentity


class IdentityRemove(CommandModel):
    op: Literal["identity.remove"] = "identity.remove"
    name: IdentityName


class ConstitutionSet(CommandModel):
    """How many admins' votes pass a proposal; 0 means a majority of the admins."""

    op: Literal["constitution.set"] = "constitution.set"
    threshold: Annotated[int, Field(ge=0, le=256)]


class NodeAdmit(CommandModel):
    """Admit a joining node: it may become a member on that platform, at these addresses
    (the proposal's, not the joiner's own claims), and then receive the master secret."""

    op: Literal["node.admit"] = "node.admit"
    member: MemberRecord


class ChaosSet(CommandModel):
    """Whether the chaos (fault injection) routes are open, to admins."""

    op: Literal["chaos.set"] = "chaos.set"
    enabled: bool


#: What a proposal may do once enough admins voted for it (each applied as its own command
#: would be, all or none).
Action = Annotated[
    PolicyAllow | PolicyDisallow | PolicyRevokePlatform | MemberRemove | IdentitySet
    | IdentityRemove | ConstitutionSet | ChaosSet | NodeAdmit | RecoveryThresholdSet,
    Field(discriminator="op"),
]  # fmt: skip
ProposalId = Annotated[str, StringConstraints(pattern=r"^p[0-9]{1,19}$")]


class ProposalCreate(CommandModel):
    """Propose ``actions``; the proposer's own ballot is for them."""

    op: Literal["proposal.create"] = "proposal.create"
    ROLE = "admin"
    actions: Annotated[list[Action], Field(min_length=1, max_length=16)]


class ProposalVote(CommandModel):
    op: Literal["proposal.vote"] = "proposal.vote"
    ROLE = "admin"
    proposal: ProposalId
    ballot: Literal["for", "against"]


class ProposalWithdraw(CommandModel):
    """Only the proposer may withdraw an open proposal."""

    op: Literal["proposal.withdraw"] = "proposal.withdraw"
    ROLE = "admin"
    proposal: ProposalId


Command = Annotated[
    ClusterInit | MemberAdd | MemberRemove | KeyCreate | KeyRotate | ReleaseRequest
    | ReleaseOutcome | PolicySet | PolicyAllow | PolicyDisallow | PolicyRevokePlatform
    | LedgerSign | ProposalCreate | ProposalVote | ProposalWithdraw | ContractDeploy
    | ContractCall | ContractCheckpoint | DataOpRegister | DataRegister | DataGrant
    | DataRequest | DataApprove | DataDeny | DataRevoke | DataCompute | DataConsume
    | ServiceMeasured | RecoveryShares | RecoveryShare,
    Field(discriminator="op"),
]  # fmt: skip
_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


# --- results: what applying a command did (the same on every node) ---------------------------


@dataclass(frozen=True, slots=True)
class ClusterInitialised(Applied):
    cluster: str


@dataclass(frozen=True, slots=True)
class MemberChanged(Applied):
    """A member was added or removed."""

    member: str


@dataclass(frozen=True, slots=True)
class KeyGeneration(Applied):
    """A key was created or rotated: its current generation."""

    key: str
    generation: int


@dataclass(frozen=True, slots=True)
class ReleaseRequested(Applied):
    release: str
    key: str
    generation: int
    node: str


@dataclass(frozen=True, slots=True)
class ReleaseCompleted(Applied):
    release: str
    status: str


@dataclass(frozen=True, slots=True)
class PolicyReplaced(Applied):
    policy: dict[str, JsonValue]


@dataclass(frozen=True, slots=True)
class PolicyChanged(Applied):
    role: str
    measurement: str


@dataclass(frozen=True, slots=True)
class PlatformRevoked(Applied):
    revoked: str


@dataclass(frozen=True, slots=True)
class ProposalChanged(Applied):
    """A proposal was made, voted on or withdrawn: its state after that, the admins' ballots
    for and against it, and how many votes it needs. ``error`` says why an accepted
    proposal's actions were not applied (state ``failed``)."""

    proposal: str
    state: str
    votes_for: list[str]
    votes_against: list[str]
    needed: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class IdentityChanged(Applied):
    identity: str


@dataclass(frozen=True, slots=True)
class ConstitutionChanged(Applied):
    threshold: int


@dataclass(frozen=True, slots=True)
class NodeAdmitted(Applied):
    node: str


@dataclass(frozen=True, slots=True)
class ChaosChanged(Applied):
    enabled: bool


@dataclass(frozen=True, slots=True)
class LedgerSigned(Applied):
    signed_index: int


@dataclass(frozen=True, slots=True)
class ContractOpCommitted(Applied):
    """A contract was deployed or called: the operation's place in the contract sequence
    (every service enclave executes them in this order)."""

    contract: str
    seq: int
    kind: str


@dataclass(frozen=True, slots=True)
class ContractCheckpointed(Applied):
    seq: int


def parse(data: bytes) -> Command:
    """The command ``data`` holds; ``CommandRefused`` saying what is wrong otherwise."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandRefused(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    if deeper_than(data, MAX_COMMAND_DEPTH):
        raise CommandRefused(f"command is nested deeper than {MAX_COMMAND_DEPTH}")
    try:
        return _COMMAND.validate_json(data)
    except ValidationError as exc:
        raise CommandRefused(explain(exc)) from None


def explain(exc: ValidationError, tagged: bool = True) -> str:
    """One line naming the first problem: the field (dotted) and what it must be."""
    error = exc.errors(include_url=False)[0]
    kind, loc = error["type"], error["loc"]
    if kind == "json_invalid":
        return f"command is not JSON: {error['msg']}"
    if kind == "union_tag_invalid":
        return f"unknown operation {error['ctx']['tag'][:64]!r}"
    if kind in ("union_tag_not_found", "model_attributes_type", "model_type") and not loc:
        return "command must be an object with a string 'op'"
    if not loc:
        return f"command must be an object with a string 'op' ({error['msg']})"
    return f"{field_path(exc, tagged)!r}: {error['msg']}"


def field_path(exc: ValidationError, tagged: bool = True) -> str | None:
    """The dotted path of the field the first problem is in (``actions.0.measurement``); past
    the command's own tag when ``tagged`` (an error from ``parse``, which validates the union of
    commands, starts with it); None if the problem is the command as a whole."""
    loc = exc.errors(include_url=False)[0]["loc"]
    if not loc:
        return None
    return ".".join(str(part) for part in loc[1 if tagged else 0 :]) or str(loc[0])


__all__ = [
    "MAX_COMMAND_BYTES",
    "Action",
    "Applied",
    "AuthStamp",
    "ChaosChanged",
    "ChaosSet",
    "ClusterInit",
    "ClusterInitialised",
    "Command",
    "CommandModel",
    "CommandRefused",
    "ConstitutionChanged",
    "ConstitutionSet",
    "IdentityChanged",
    "IdentityRemove",
    "IdentitySet",
    "KeyCreate",
    "KeyGeneration",
    "KeyRotate",
    "LedgerSign",
    "LedgerSigned",
    "MemberAdd",
    "MemberChanged",
    "MemberRecord",
    "MemberRemove",
    "NodeAdmit",
    "NodeAdmitted",
    "PlatformRevoked",
    "PolicyAllow",
    "PolicyChanged",
    "PolicyDisallow",
    "PolicyReplaced",
    "PolicyRevokePlatform",
    "PolicySet",
    "ProposalChanged",
    "ProposalCreate",
    "ProposalVote",
    "ProposalWithdraw",
    "RefusalCode",
    "Refused",
    "ReleaseCompleted",
    "ReleaseOutcome",
    "ReleaseRequest",
    "ReleaseRequested",
    "canonical",
    "explain",
    "field_path",
    "parse",
]
