"""The data-authorization commands (issue 15, S5) and their results, as typed records.

Who signs what: a data **owner** registers a dataset (its digests, its privacy level, the
operations it allows and its data key wrapped to the cluster's data-wrap key: the data itself
never enters the ledger), grants a user operations with a number of uses and a lifetime,
approves or denies a user's request for one, and revokes a grant. A data **user** requests a
grant and asks for a computation (``data.compute``: the authentication transaction, whose
committed form is the token). The nodes propose two things themselves: what their service
enclave measured as (``service.measured``, after local attestation), and how a token ended
(``data.consume``). What depends on the state (does the grant exist, is it expired) is
``kmnode.km.dataauth``'s to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kmnode.identity import IdentityName
from kmnode.km.command_base import Applied, Base64, CommandModel, Hex32, Name

#: A dataset's name (also in the AAD its blob is encrypted under).
DatasetName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
#: An operation's name (``kmnode.dataauth.ops.BUILTIN_OPS``).
OpName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
OpNames = Annotated[list[OpName], Field(min_length=1, max_length=16)]
Privacy = Literal["low", "high"]
GrantId = Annotated[str, StringConstraints(pattern=r"^g[1-9][0-9]{0,18}$")]
RequestId = Annotated[str, StringConstraints(pattern=r"^q[1-9][0-9]{0,18}$")]
TokenId = Annotated[str, StringConstraints(pattern=r"^t[1-9][0-9]{0,18}$")]
#: The most uses one grant gives, and the longest a grant lives (seconds).
MAX_USES = 1_000_000
MAX_TTL_S = 366 * 24 * 3600
#: Sealed parameters of one computation (base64; a private-set-intersection's items are the
#: largest parameters, and the command must stay under ``MAX_COMMAND_BYTES``).
MAX_SEALED_PARAMS_CHARS = 48 * 1024
#: A wrapped data key: a sealed box (48 bytes) around 32 bytes, in base64.
WRAPPED_KEY_CHARS = 108
#: A WebAssembly operation's module in base64 (``wasm_op.MAX_OP_CODE_BYTES`` of wasm).
MAX_OP_CODE_CHARS = 40 * 1024 * 4 // 3 + 4
#: The largest dataset (plaintext bytes) a registration may declare.
MAX_DATASET_BYTES = 16 << 20


class DataRegister(CommandModel):
    """Register a dataset: the owner keeps the blob (the hosts store copies by digest); the
    ledger holds its digests and its data key wrapped to the cluster's data-wrap key, which
    only a KM enclave unwraps, for an attested service enclave, under a committed token."""

    op: Literal["data.register"] = "data.register"
    ROLE = "owner"
    name: DatasetName
    digest_ct: Hex32
    digest_pt: Hex32
    size: Annotated[int, Field(ge=0, le=MAX_DATASET_BYTES)]
    privacy: Privacy
    ops: OpNames
    wrapped_key: Annotated[
        Base64, StringConstraints(min_length=WRAPPED_KEY_CHARS, max_length=WRAPPED_KEY_CHARS)
    ]
    #: Aggregates over fewer rows are refused (and smaller histogram bins suppressed).
    min_group_size: Annotated[int, Field(ge=2, le=1_000_000)] = 5
    #: Service measurements allowed to compute on it; empty means "the policy's".
    allowed_service: list[Hex32] = Field(default_factory=list, max_length=64)


class _GrantTerms(CommandModel):
    dataset: DatasetName
    ops: OpNames
    uses: Annotated[int, Field(ge=1, le=MAX_USES)]
    #: Seconds from the signed request's creation time until the grant expires.
    ttl: Annotated[int, Field(ge=1, le=MAX_TTL_S)]


class DataOpRegister(CommandModel):
    """Register a data operation written in WebAssembly (``kmnode.dataauth.wasm_op``): an
    operator's act; owners then allow it by name, and tokens bind its checksum. A name is
    registered once (a new version is a new name), so what an owner allowed never changes."""

    op: Literal["data.op_register"] = "data.op_register"
    ROLE = "operator"
    name: OpName
    version: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    code: Annotated[Base64, StringConstraints(min_length=8, max_length=MAX_OP_CODE_CHARS)]


class DataGrant(_GrantTerms):
    """The dataset's owner grants ``user`` these operations, ``uses`` times, for ``ttl`` s."""

    op: Literal["data.grant"] = "data.grant"
    ROLE = "owner"
    user: IdentityName


class DataRequest(_GrantTerms):
    """A user asks the dataset's owner for a grant (published on the owner's MQTT topic)."""

    op: Literal["data.request"] = "data.request"
    ROLE = "user"


class DataApprove(CommandModel):
    """The owner approves a request: a grant on the requested terms, from the approval on."""

    op: Literal["data.approve"] = "data.approve"
    ROLE = "owner"
    request: RequestId


class DataDeny(CommandModel):
    op: Literal["data.deny"] = "data.deny"
    ROLE = "owner"
    request: RequestId


class DataRevoke(CommandModel):
    """The owner revokes a grant: no token is issued under it from this entry on, and a token
    already issued is refused once the platform's service enclave has seen the revocation."""

    op: Literal["data.revoke"] = "data.revoke"
    ROLE = "owner"
    grant: GrantId


class DataCompute(CommandModel):
    """The authentication transaction: ``user`` (the signer) asks node ``node`` (the privacy
    computing platform) to run ``operation`` on ``dataset``. ``params`` is the digest of the
    parameters (``kmnode.dataauth.ops.params_digest``), ``sealed`` the parameters themselves
    sealed to the cluster's input key together with the user's name and ``nonce``, so only a
    service enclave opens them, and only under this computation. Applied, it checks the grant
    and issues a token, or is refused with the reason."""

    op: Literal["data.compute"] = "data.compute"
    ROLE = "user"
    dataset: DatasetName
    operation: OpName
    params: Hex32
    sealed: Annotated[Base64, StringConstraints(min_length=64, max_length=MAX_SEALED_PARAMS_CHARS)]
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    node: Name


class TokenEnd(BaseModel):
    """How one token ended: ``consumed`` with the hash of the sealed result the user receives,
    or ``refused`` with the reason (a refused token's use is never given back)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    token: TokenId
    status: Literal["consumed", "refused"]
    result_hash: Hex32 | Literal[""] = ""
    reason: Annotated[str, StringConstraints(max_length=500)] = ""


#: Token ends one ``data.consume`` carries (a platform commits the ends of a batch of jobs
#: at once: one Raft entry, not one each).
MAX_ENDS = 256


class DataConsume(CommandModel):
    """How tokens ended on platform ``node``, proposed by that node."""

    op: Literal["data.consume"] = "data.consume"
    node: Name
    ends: Annotated[list[TokenEnd], Field(min_length=1, max_length=MAX_ENDS)]


class ServiceMeasured(CommandModel):
    """Node ``node``'s KM enclave attested its service enclave locally at ``measurement``:
    what a token for that node binds, and what the policy must allow for data work."""

    op: Literal["service.measured"] = "service.measured"
    node: Name
    measurement: Hex32


DataCommand = (
    DataOpRegister
    | DataRegister
    | DataGrant
    | DataRequest
    | DataApprove
    | DataDeny
    | DataRevoke
    | DataCompute
    | DataConsume
    | ServiceMeasured
)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatasetRegistered(Applied):
    dataset: str
    owner: str


@dataclass(frozen=True, slots=True)
class OpRegistered(Applied):
    name: str
    version: int
    checksum: str


@dataclass(frozen=True, slots=True)
class GrantChanged(Applied):
    """A grant was made (directly or by approving ``request``) or revoked."""

    grant: str
    dataset: str
    user: str
    state: str
    uses_left: int
    request: str = ""


@dataclass(frozen=True, slots=True)
class RequestChanged(Applied):
    """A user's request was made or denied (an approval reports a ``GrantChanged``)."""

    request: str
    dataset: str
    user: str
    owner: str
    state: str


@dataclass(frozen=True, slots=True)
class TokenIssued(Applied):
    token: str
    grant: str
    node: str
    user: str
    uses_left: int


@dataclass(frozen=True, slots=True)
class TokensFinished(Applied):
    """The tokens whose end was applied (in order), and those skipped with the reason (already
    ended, unknown, another node's)."""

    node: str
    finished: list[str]
    skipped: list[str]


@dataclass(frozen=True, slots=True)
class PlatformMeasured(Applied):
    node: str
    measurement: str
