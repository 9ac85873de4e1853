"""The messages between a node's host and its service enclave, as typed records.

The host relays them over the service process's stdin and stdout, one JSON object a line,
each request with an ``id`` its reply repeats. Both ends treat what arrives as hostile (the
host may send anything to the enclave; a compromised service may answer anything): every line
is parsed into exactly one of the models below, with types, sizes and hex checked, and
anything else is refused with a specific error. Nothing here is secret: challenges, reports,
measurements and boxed keys.

The service enclave's output ring has a channel of its own, a unix SEQPACKET socket between
the host and the service process (a pipe cannot carry a file descriptor): the service asks for
a ring (``RingRequest``: at start, and when its ring failed, naming the error), and the host
answers with a ``RingGrant`` carrying the current ring's sealed memfd (SCM_RIGHTS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

#: Longest line either side reads (a boxed key is about 200 bytes; a report about 400; a batch
#: of contract operations, which the KM side bounds by ``MAX_OPS_BATCH_BYTES``, more).
MAX_LINE = 1024 * 1024
#: The most contract operations, and their bytes, one request carries.
MAX_OPS_BATCH = 256
MAX_OPS_BATCH_BYTES = 512 * 1024

Hex = Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{2})*$", max_length=16_384)]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
KeyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


#: Data bytes of the service enclave's output ring: the host makes it this size and the
#: service maps nothing else (a ring of another size is refused).
SERVICE_RING_CAPACITY = 1 << 20

#: Longest ring-control message either side reads.
MAX_RING_MESSAGE = 4096


class PipeError(ValueError):
    """A line that is not one of the pipe's messages; the message says what is wrong."""


class ServiceUnavailable(Exception):
    """The service enclave is not running or did not answer."""


class PipeMessage(BaseModel):
    """Every request and reply: strict types, no unknown fields, an optional id."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: int | None = Field(default=None, ge=0)


class IdentityRequest(PipeMessage):
    """Which measurement the service enclave runs with."""

    op: Literal["identity"] = "identity"


class ChallengeRequest(PipeMessage):
    """Local attestation: a report for the KM enclave, binding the challenge and the box key."""

    op: Literal["challenge"] = "challenge"
    km_measurement: Hex32
    challenge: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class KeyRequest(PipeMessage):
    """A key boxed by the KM enclave to the key the service bound in its report."""

    op: Literal["key"] = "key"
    ciphertext: Hex
    #: The KM enclave's local report vouching for the box key (``attest.local.vouch``).
    vouch: Hex


class ProveRequest(PipeMessage):
    """The proof workload: a MAC of ``challenge`` under a provisioned key."""

    op: Literal["prove"] = "prove"
    key: KeyName
    generation: int = Field(ge=1)
    challenge: Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{2})+$", max_length=2048)]


class ModulesRequest(PipeMessage):
    """Which project modules the service process has loaded (checked against its measurement)."""

    op: Literal["modules"] = "modules"


# --- confidential contracts (``kmnode.service.contracts``) ----------------------------------

ContractName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=128 * 1024)]
Seq = Annotated[int, Field(ge=0, lt=2**63)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PipeOperation(_Strict):
    """One committed contract operation (``kmnode.km.state.ContractOp``), with the code of a
    deploy."""

    seq: Annotated[int, Field(ge=1, lt=2**63)]
    kind: Literal["deploy", "call"]
    contract: ContractName
    function: Annotated[str, StringConstraints(max_length=64)] = ""
    args: Base64 = ""
    caller: Annotated[str, StringConstraints(max_length=32)] = ""
    caller_box_key: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$")] = ""
    nonce: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")] = ""
    fuel: Annotated[int, Field(ge=0, le=100_000_000)] = 0
    code: Base64 = ""


class PipeCheckpoint(_Strict):
    seq: Seq
    roots: Annotated[dict[ContractName, Hex32], Field(max_length=4096)]


class PipeDeployed(_Strict):
    name: ContractName
    code: Base64
    deployed_seq: Annotated[int, Field(ge=1, lt=2**63)]


class ContractKeysRequest(PipeMessage):
    """The contract keys, boxed by the KM enclave (like ``KeyRequest``)."""

    op: Literal["contract.keys"] = "contract.keys"
    ciphertext: Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{2})*$", max_length=1 << 20)]
    vouch: Hex


class ContractOpsRequest(PipeMessage):
    """The next committed operations, in order."""

    op: Literal["contract.ops"] = "contract.ops"
    ops: Annotated[list[PipeOperation], Field(min_length=1, max_length=MAX_OPS_BATCH)]


class ContractCheckRequest(PipeMessage):
    """A committed checkpoint: the roots the service must have after operation ``seq``."""

    op: Literal["contract.check"] = "contract.check"
    checkpoint: PipeCheckpoint


class ContractRestoreRequest(PipeMessage):
    """Start over from the host store's kept copy matching a committed checkpoint (newest
    first), or from nothing if ``from_genesis``; ``contracts``: every deployed contract."""

    op: Literal["contract.restore"] = "contract.restore"
    checkpoints: Annotated[list[PipeCheckpoint], Field(max_length=2)]
    contracts: Annotated[list[PipeDeployed], Field(max_length=1024)]
    from_genesis: bool


class ContractStatusRequest(PipeMessage):
    op: Literal["contract.status"] = "contract.status"


class DataJobRequest(PipeMessage):
    """One computation (issue 15): its token, data key, input key and sealed parameters, boxed
    to this service enclave by its KM enclave, which vouches for the box key it used."""

    op: Literal["data.job"] = "data.job"
    ciphertext: Annotated[
        str, StringConstraints(pattern=r"^(?:[0-9a-f]{2})*$", max_length=MAX_LINE - 4096)
    ]
    vouch: Hex


class DataRevokeRequest(PipeMessage):
    """Grants revoked in the committed state: their tokens are refused from now on."""

    op: Literal["data.revoke"] = "data.revoke"
    grants: Annotated[
        list[Annotated[str, StringConstraints(pattern=r"^g[1-9][0-9]{0,18}$")]],
        Field(min_length=1, max_length=4096),
    ]


class DataReleaseRequest(PipeMessage):
    """Tokens whose end (consumed) is committed: their held results may leave now."""

    op: Literal["data.release"] = "data.release"
    tokens: Annotated[
        list[Annotated[str, StringConstraints(pattern=r"^t[1-9][0-9]{0,18}$")]],
        Field(min_length=1, max_length=4096),
    ]


Request = Annotated[
    IdentityRequest | ChallengeRequest | KeyRequest | ProveRequest | ModulesRequest
    | ContractKeysRequest | ContractOpsRequest | ContractCheckRequest | ContractRestoreRequest
    | ContractStatusRequest | DataJobRequest | DataRevokeRequest | DataReleaseRequest,
    Field(discriminator="op"),
]  # fmt: skip
_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)


class Reply(PipeMessage):
    """Every reply: ``ok`` or the error, and the fields of its request's answer."""

    ok: bool = True
    error: str = ""


class IdentityReply(Reply):
    measurement: Hex32 = ""


class ChallengeReply(Reply):
    response: Hex = ""


class KeyReply(Reply):
    key: str = ""
    generation: int = 0


class ProveReply(Reply):
    mac: Hex = ""


class ModulesReply(Reply):
    modules: list[str] = Field(default_factory=list, max_length=1024)


class ContractKeysReply(Reply):
    contracts: list[str] = Field(default_factory=list, max_length=4096)


class PipeOutcome(_Strict):
    """What one operation did, as it may leave the enclave (``service.contracts.Outcome``)."""

    seq: Annotated[int, Field(ge=1, lt=2**63)]
    status: Literal["ok", "reverted", "trapped", "refused", "deployed"]
    sealed: Base64 = ""
    digest: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{32})?$")] = ""
    fuel_used: Annotated[int, Field(ge=0)] = 0


class ContractStateReply(Reply):
    """Where the service's contract execution is: the last operation it executed, why it
    stopped (empty while it runs), whether it lacks keys for the next operation, the outcomes
    of the operations just executed and the roots of the checkpoints they crossed."""

    position: Seq = 0
    halted: Annotated[str, StringConstraints(max_length=1024)] = ""
    need_keys: bool = False
    outcomes: Annotated[list[PipeOutcome], Field(max_length=MAX_OPS_BATCH)] = []
    checkpoints: Annotated[list[PipeCheckpoint], Field(max_length=MAX_OPS_BATCH)] = []


class ContractStatusReply(ContractStateReply):
    restores: Annotated[int, Field(ge=0)] = 0
    contracts: Annotated[list[ContractName], Field(max_length=4096)] = []
    cache: dict[str, int | float] = Field(default_factory=dict, max_length=64)
    cache_config: dict[str, int] = Field(default_factory=dict, max_length=64)


class JobEnd(BaseModel):
    """How one computation ended: ``consumed`` with the result sealed to the data user
    (base64) and its hash, or ``refused`` with the reason."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    token: Annotated[str, StringConstraints(pattern=r"^t[1-9][0-9]{0,18}$")]
    status: Literal["consumed", "refused"]
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    sealed: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=1 << 14)
    ] = ""
    result_hash: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{64})?$")] = ""


class DataJobReply(Reply):
    """How each computation of a batch ended, in the batch's order."""

    ends: Annotated[list[JobEnd], Field(max_length=256)] = []


class DataRevokeReply(Reply):
    revoked: Annotated[int, Field(ge=0)] = 0


class DataReleaseReply(Reply):
    released: Annotated[int, Field(ge=0)] = 0


R = TypeVar("R", bound=Reply)
M = TypeVar("M", bound=PipeMessage)


def _explain(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "line"
    return f"{where}: {first['msg']}"


def encode(message: BaseModel) -> bytes:
    """One line of the pipe."""
    return message.model_dump_json().encode() + b"\n"


def decode_request(line: bytes) -> Request:
    """The request on ``line``, or a PipeError saying what is wrong with it."""
    if len(line) > MAX_LINE:
        raise PipeError(f"request of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        return _REQUEST.validate_json(line)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "union_tag_invalid":
            op = exc.errors()[0].get("ctx", {}).get("tag")
            raise PipeError(f"unknown operation {op!r}") from None
        raise PipeError(f"malformed request: {_explain(exc)}") from None


def decode_reply(line: bytes, reply_type: type[R]) -> R:
    """The reply on ``line`` as ``reply_type`` (a failed request's reply is accepted too)."""
    if len(line) > MAX_LINE:
        raise PipeError(f"reply of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        return reply_type.model_validate_json(line)
    except ValidationError as exc:
        try:
            failed = Reply.model_validate_json(line)
        except ValidationError:
            raise PipeError(f"malformed reply: {_explain(exc)}") from None
        if failed.ok:
            raise PipeError(f"malformed reply: {_explain(exc)}") from None
        return reply_type(id=failed.id, ok=False, error=failed.error)


class _AnyId(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int | None = None


def line_id(line: bytes) -> int | None:
    """The ``id`` of a line whatever else it holds (None if it has no readable one): lets a
    reply be matched to its request before its type is known, and an error reply name the
    request it refuses."""
    try:
        return _AnyId.model_validate_json(line).id
    except ValidationError:
        return None


class RingRequest(PipeMessage):
    """Service -> host: "send me the current output ring".

    ``ring`` identifies the ring the service holds (its memfd's inode; 0: none), so that the
    host replaces a ring only once however many reports of its failure arrive; ``error`` names
    why it failed (the ring error's type and message: offsets and sizes, nothing secret), or is
    empty when the service only checks it holds the current one (at start).
    """

    op: Literal["ring.request"] = "ring.request"
    ring: int = Field(ge=0)
    error: str = Field(default="", max_length=512)


class RingGrant(PipeMessage):
    """Host -> service, with the ring's memfd attached: the ring to write to from now on."""

    op: Literal["ring.grant"] = "ring.grant"
    ring: int = Field(ge=0)


def decode_ring_message(data: bytes, kind: type[M]) -> M:
    """The ring-control message ``data`` as ``kind``, or a PipeError saying what is wrong."""
    if len(data) > MAX_RING_MESSAGE:
        raise PipeError(f"ring message of {len(data)} bytes exceeds {MAX_RING_MESSAGE}")
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        raise PipeError(f"malformed {kind.__name__}: {_explain(exc)}") from None


@dataclass(frozen=True)
class RingHandoff:
    """The descriptors a service enclave process inherits (``pass_fds``), through the KM
    enclave process that starts it: the output ring's sealed memfd and the service's end of
    the ring-control socket."""

    ring_fd: int
    control_fd: int

    @property
    def fds(self) -> tuple[int, int]:
        return (self.ring_fd, self.control_fd)
