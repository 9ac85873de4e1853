"""The messages of the host ↔ KM enclave circuit (``kmnode.circuit``), as typed records.

Inbound to the enclave: operator API requests exactly as their client signed them
(``ApiCall``: the enclave verifies and parses them, so the host never composes a command nor
an operator request), status, chaos link rules and the service crash. Outbound: the replies
and notices (events for MQTT, audit records, start and stop).

Nothing in any of them is secret: the enclave puts no key, channel key or master secret in a
message, and the adversarial-host tests search every reply for them. Both sides parse what
they read into exactly one of these models (strict types, no unknown fields) and refuse
anything else with ``CircuitError``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
)

from kmnode.config import API_BODY_CAP

#: Timeouts an operator may ask for, in seconds (a NaN or a year is refused at the boundary).
Timeout = Field(default=10.0, ge=0.0, le=300.0, allow_inf_nan=False)


class CircuitError(ValueError):
    """A record that is not one of the circuit's messages, or a reply of the wrong kind."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Set by the circuit on requests; a reply repeats it.
    id: int | None = Field(default=None, ge=0)


class Request(Message):
    """Asks the other side for something; answered by a ``Reply``."""


class Reply(Message):
    """Answers the request with the same id."""


class Notice(Message):
    """Tells the other side something; nobody answers."""


# --- replies ---------------------------------------------------------------------------------


class Ack(Reply):
    op: Literal["ack"] = "ack"


class DataReply(Reply):
    """Public data the enclave renders as JSON (applied state, a command's result)."""

    op: Literal["data"] = "data"
    data: JsonValue


FailureCode = Literal[
    "not_leader",
    "not_ready",
    "refused",
    "timeout",
    "unavailable",
    "not_found",
    "bad_request",
    "service_unavailable",
    "internal",
    # The request's signature (``kmnode.identity``): 401, with what is wrong with it.
    "unsigned",
    "bad_signature",
    "unknown_identity",
    "expired",
    # The signer's roles do not allow the request: 403.
    "forbidden",
    # The request was made before (its id committed): 409.
    "replay",
]


class Failure(Reply):
    """Why a request failed, as a code the host maps to an HTTP status."""

    op: Literal["failure"] = "failure"
    code: FailureCode
    message: str
    leader: str | None = None
    leader_api: str | None = None
    field: str | None = None


class Failed(Exception):
    """A request failed: raised by the side that handles it (and sent as its ``Failure``),
    raised again on the side that asked."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    @classmethod
    def of(
        cls,
        code: FailureCode,
        message: str,
        *,
        leader: str | None = None,
        leader_api: str | None = None,
        field: str | None = None,
    ) -> Failed:
        return cls(
            Failure(code=code, message=message, leader=leader, leader_api=leader_api, field=field)
        )


class StatusReply(Reply):
    op: Literal["status.reply"] = "status.reply"
    node: str
    cluster: str | None
    ready: bool
    raft: dict[str, JsonValue]
    members: list[str]
    peers: dict[str, str]
    has_master_secret: bool
    early_attestations: dict[str, int]
    links: dict[str, int]
    #: The service enclave (a child of the KM enclave process): running, measurement, pid.
    service: dict[str, JsonValue]
    #: How the node started (genesis, join, resume, recover), and whether it is still in
    #: recovery mode (no master secret yet: it serves only status and recovery routes).
    mode: str = ""
    recovering: bool = False


class MetricSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    labels: dict[str, str] = Field(default_factory=dict, max_length=8)
    value: float


class HistogramBucket(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: Upper bound (seconds); the last bucket is +Inf.
    le: float
    #: Observations at or below ``le`` (cumulative, as Prometheus counts them).
    count: int = Field(ge=0)


class MetricFamily(BaseModel):
    """One metric as the KM enclave reads it at scrape time (``kmnode.km.metrics``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]{0,99}$")]
    kind: Literal["counter", "gauge", "histogram"]
    help: Annotated[str, StringConstraints(max_length=300)]
    samples: list[MetricSample] = Field(default_factory=list, max_length=4096)
    buckets: list[HistogramBucket] = Field(default_factory=list, max_length=64)
    sum: float = 0.0


class MetricsReply(Reply):
    op: Literal["metrics.reply"] = "metrics.reply"
    families: list[MetricFamily] = Field(max_length=256)


class ModulesReply(Reply):
    op: Literal["modules.reply"] = "modules.reply"
    modules: list[str]
    pid: int


# --- host to enclave: operator requests --------------------------------------------------------


class StatusRequest(Request):
    op: Literal["status"] = "status"


class ReadRequest(Request):
    """A read of the applied public state; ``linearizable`` confirms with the leader first."""

    op: Literal["read"] = "read"
    what: Literal[
        "keys", "key", "releases", "policy", "members", "proposals", "proposal", "identities"
    ]
    name: str | None = None
    linearizable: bool = False
    #: Paging of long lists (keys): names after ``after``, at most ``limit``.
    after: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=10_000, ge=1, le=10_000)


class AttestRequest(Request):
    """A fresh quote of the KM enclave, verified against the replicated policy."""

    op: Literal["attest"] = "attest"


class CreateKey(Request):
    op: Literal["key.create"] = "key.create"
    #: Checked by the state machine (which refuses a bad one with its reason).
    name: JsonValue
    allowed_service: JsonValue = Field(default_factory=list)


class RotateKey(Request):
    op: Literal["key.rotate"] = "key.rotate"
    name: str


class ReleaseKey(Request):
    """Release ``key`` to ``node`` (a member, or ``all``) and wait for the outcomes."""

    op: Literal["key.release"] = "key.release"
    key: str
    node: JsonValue = "all"
    generation: JsonValue = None
    timeout: float = Timeout


class PolicyChange(Request):
    op: Literal["policy.change"] = "policy.change"
    change: Literal["policy.allow", "policy.disallow"]
    role: JsonValue
    measurement: str


class RevokePlatform(Request):
    op: Literal["policy.revoke_platform"] = "policy.revoke_platform"
    platform_id: JsonValue


class RemoveMember(Request):
    op: Literal["member.remove"] = "member.remove"
    name: JsonValue


class ApiCall(Request):
    """An operator API request as the client signed it: the KM enclave verifies the signature
    against its own replicated identities, then parses the request itself
    (``kmnode.api_routes``), so the host can neither mint a request nor change one."""

    op: Literal["api.call"] = "api.call"
    method: Literal["GET", "POST"]
    #: The path with its query string, as received.
    target: str = Field(max_length=4096)
    #: The signature headers (``kmnode.identity.SIGNATURE_HEADERS``), lower-case names.
    headers: dict[str, Annotated[str, StringConstraints(max_length=4096)]] = Field(max_length=3)
    body: bytes = Field(default=b"", max_length=API_BODY_CAP)


class ChaosCheck(Request):
    """May this (verified) chaos request be served? Only while governance enabled chaos."""

    op: Literal["chaos.check"] = "chaos.check"


class Propose(Request):
    """Propose governance actions (checked by the state machine's models)."""

    op: Literal["proposal.create"] = "proposal.create"
    actions: list[JsonValue] = Field(min_length=1, max_length=16)


class Vote(Request):
    op: Literal["proposal.vote"] = "proposal.vote"
    proposal: str
    ballot: JsonValue


class Withdraw(Request):
    op: Literal["proposal.withdraw"] = "proposal.withdraw"
    proposal: str


class LinkRulesRequest(Request):
    """Chaos: the link fault rules of the enclave's peer transport, and their counters."""

    op: Literal["links.get"] = "links.get"


class UpdateLinkRule(Request):
    op: Literal["links.set"] = "links.set"
    peer: str
    changes: dict[str, JsonValue]


class HealLinks(Request):
    op: Literal["links.heal"] = "links.heal"
    peer: str | None = None


class Prove(Request):
    """The proof workload: the service enclave's MAC of ``challenge`` under a released key."""

    op: Literal["service.prove"] = "service.prove"
    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    generation: int = Field(ge=1)
    challenge: bytes = Field(min_length=1, max_length=1024)


class DeployContract(Request):
    """Deploy a contract (fields checked by the ``contract.deploy`` command's model)."""

    op: Literal["contract.deploy"] = "contract.deploy"
    name: JsonValue
    code: JsonValue


class CallContract(Request):
    """Call a contract (fields checked by the ``contract.call`` command's model), then wait up
    to ``timeout`` for this node's service enclave to execute it."""

    op: Literal["contract.call"] = "contract.call"
    contract: str
    function: JsonValue
    args: JsonValue
    nonce: JsonValue
    fuel: JsonValue = 10_000_000
    timeout: float = Timeout


class ContractRead(Request):
    """Contracts as the state holds them, the contract-input key, or this node's execution."""

    op: Literal["contract.read"] = "contract.read"
    what: Literal["contracts", "contract", "input-key", "node"]
    name: str | None = None


class ResyncContracts(Request):
    """Restart this node's contract execution from the host store's kept copies (after
    ``kmctl contracts resync`` put a peer's there)."""

    op: Literal["contract.resync"] = "contract.resync"


class DataWrite(Request):
    """A data-authorization command (``kmnode.km.data_commands``; its model checks the
    fields), then, for a computation, a wait of up to ``timeout`` for the token to end."""

    op: Literal["data.write"] = "data.write"
    command: Literal[
        "data.register", "data.grant", "data.request", "data.approve", "data.deny",
        "data.revoke", "data.compute", "data.op_register",
    ]  # fmt: skip
    fields: dict[str, JsonValue]
    timeout: float = Timeout


class DataRead(Request):
    """Data-authorization records as the state holds them (``name``: one of them; ``filters``:
    dataset, user, grant, state), the cluster's data keys, a token's sealed result held by
    this node, or this node's data work."""

    op: Literal["data.read"] = "data.read"
    what: Literal[
        "datasets", "dataset", "grants", "requests", "tokens", "token", "result", "keys", "node",
        "ops",
    ]  # fmt: skip
    name: str | None = None
    filters: dict[str, str] = Field(default_factory=dict)


class RecoveryRead(Request):
    """The recovery records: the ledger's split and a recovery's progress as this node sees
    them (``status``), or this enclave's recovery key with a quote binding it (``key``)."""

    op: Literal["recovery.read"] = "recovery.read"
    what: Literal["status", "key"]


class SubmitShare(Request):
    """A recovery holder's share of split ``generation``, boxed to each recovering member's
    enclave recovery key (node name -> base64)."""

    op: Literal["recovery.submit"] = "recovery.submit"
    generation: int = Field(ge=0, lt=1 << 63)
    boxes: dict[str, str] = Field(min_length=1, max_length=64)


class SnapshotRead(Request):
    """A chunk of a signed snapshot of this node's state (``offset`` 0 without ``id``: take a
    new one; then the chunks of that one, named by its sha256)."""

    op: Literal["snapshot.read"] = "snapshot.read"
    offset: int = Field(default=0, ge=0, lt=1 << 40)
    snapshot: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class TransferLeader(Request):
    """Hand the leadership to member ``to`` (an admin's act), and wait until it has moved."""

    op: Literal["members.transfer_leader"] = "members.transfer_leader"
    to: str = Field(min_length=1, max_length=64)
    timeout: float = Field(default=5.0, ge=0.1, le=60.0, allow_inf_nan=False)


class AuditRead(Request):
    """The audit trail the replicated state holds (releases and proposals), in ledger order,
    after index ``since``, at most ``limit`` records."""

    op: Literal["audit.read"] = "audit.read"
    since: int = Field(default=0, ge=0, lt=1 << 63)
    limit: int = Field(default=1000, ge=1, le=10_000)


class ServiceCrash(Request):
    """Chaos: SIGKILL the service enclave (reply: ``{"killed": pid}``, pid None if none ran)."""

    op: Literal["service.crash"] = "service.crash"


class MetricsRequest(Request):
    """The KM enclave's counters for ``GET /metrics``, read when Prometheus scrapes."""

    op: Literal["metrics"] = "metrics"


class ModulesRequest(Request):
    """Which project modules the enclave process has loaded (measurement coverage)."""

    op: Literal["modules"] = "modules"


class StopRequest(Request):
    """Shut down in order: stop Raft, close the log, then exit."""

    op: Literal["stop"] = "stop"


# --- enclave to host -------------------------------------------------------------------------


# --- the peer network: the host owns the sockets, the enclave the bytes' meaning --------------

#: Most bytes of one connection in one record (a frame larger than this crosses in pieces).
MAX_NET_CHUNK = 256 * 1024
Port = Annotated[int, Field(ge=0, le=65535)]
HostName = Annotated[str, StringConstraints(min_length=1, max_length=253)]


class Listen(Request):
    """Enclave to host: accept peer connections on (host, port); reply ``Listening``."""

    op: Literal["net.listen"] = "net.listen"
    host: HostName
    port: Port


class Listening(Reply):
    op: Literal["net.listening"] = "net.listening"
    port: Port


class Connect(Request):
    """Enclave to host: open a connection to a peer; reply ``Connected`` with its number."""

    op: Literal["net.connect"] = "net.connect"
    host: HostName
    port: Port


class Connected(Reply):
    op: Literal["net.connected"] = "net.connected"
    conn: int = Field(ge=1)


class Accepted(Notice):
    """Host to enclave: a peer connected to our port (its address, as the socket says)."""

    op: Literal["net.accepted"] = "net.accepted"
    conn: int = Field(ge=1)
    peer_host: str = Field(max_length=253)
    peer_port: Port


class Data(Notice):
    """Bytes of one connection, either way: ciphertext frames and handshakes, never secrets."""

    op: Literal["net.data"] = "net.data"
    conn: int = Field(ge=1)
    data: bytes = Field(min_length=1, max_length=MAX_NET_CHUNK)


class Closed(Notice):
    """One side closed the connection (or the host dropped it)."""

    op: Literal["net.closed"] = "net.closed"
    conn: int = Field(ge=1)


# --- storage: the host holds the files, the enclave decides what they hold --------------------

#: The node's two directories the enclave stores in: its Raft log and snapshots, and the node
#: directory (sealed state, the join marker).
DiskArea = Literal["raft", "node"]
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
DiskOpKind = Literal["append", "truncate", "stage", "replace", "delete", "sync", "sync_dir"]
#: Most bytes of a file in one record (a larger write or read crosses in pieces).
MAX_DISK_CHUNK = 256 * 1024


class DiskOp(Notice):
    """Enclave to host: one file operation, done in order after every one before it.

    ``stage`` collects a large file's leading pieces on the host; the ``replace`` that follows
    writes them and its own ``data`` as the file. What crosses is what the files hold on disk:
    records tagged by the enclave, sealed blobs; never a key.
    """

    op: Literal["disk.op"] = "disk.op"
    area: DiskArea
    kind: DiskOpKind
    name: FileName
    data: bytes = Field(default=b"", max_length=MAX_DISK_CHUNK)
    #: ``truncate``: the new size.
    size: int = Field(default=0, ge=0, le=2**62)
    #: ``replace``: fsync the file before the rename and the directory after it.
    sync: bool = False


class DiskBarrier(Request):
    """Enclave to host: ``Ack`` once every ``DiskOp`` sent before it is done (with its fsync),
    ``Failure`` naming the first that failed."""

    op: Literal["disk.barrier"] = "disk.barrier"


class DiskList(Request):
    op: Literal["disk.list"] = "disk.list"
    area: DiskArea


class DiskListing(Reply):
    op: Literal["disk.listing"] = "disk.listing"
    files: dict[FileName, Annotated[int, Field(ge=0)]]


class DiskRead(Request):
    """Enclave to host: up to ``length`` bytes of a file from ``offset``."""

    op: Literal["disk.read"] = "disk.read"
    area: DiskArea
    name: FileName
    offset: int = Field(ge=0, le=2**62)
    length: int = Field(ge=1, le=MAX_DISK_CHUNK)


class DiskData(Reply):
    """Bytes read (fewer than asked at the end of the file)."""

    op: Literal["disk.data"] = "disk.data"
    data: bytes = Field(max_length=MAX_DISK_CHUNK)


class Event(Notice):
    """An event for the node's MQTT events topic."""

    op: Literal["event"] = "event"
    kind: str
    fields: dict[str, JsonValue]


class Audit(Notice):
    """One release outcome for the audit topic."""

    op: Literal["audit"] = "audit"
    record: dict[str, JsonValue]


class Tick(Notice):
    """Host to enclave: one Raft tick (``raft.tick_ms``) of the host's timer.

    An enclave has no trusted clock; time is the host's to give. A host that withholds ticks or
    floods them sways only liveness (elections, heartbeats), never what commits: pre-vote and
    check-quorum keep one node's hurried clock from unseating a healthy leader elsewhere.
    """

    op: Literal["tick"] = "tick"


class Started(Notice):
    op: Literal["started"] = "started"
    mode: Literal["genesis", "join", "resume", "recover"]


class Stopping(Notice):
    """The enclave stops (it refused its state, or was asked to); the node exits with it."""

    op: Literal["stopping"] = "stopping"
    exit_code: int
    reason: str


_ALL: tuple[type[Message], ...] = (
        Ack, DataReply, Failure, StatusReply, ModulesReply, MetricsReply,
        StatusRequest, MetricsRequest, ApiCall, LinkRulesRequest, UpdateLinkRule, HealLinks,
        ModulesRequest, StopRequest, ServiceCrash,
        Event, Audit, Started, Stopping, Tick,
        Listen, Listening, Connect, Connected, Accepted, Data, Closed,
        DiskOp, DiskBarrier, DiskList, DiskListing, DiskRead, DiskData,
)  # fmt: skip
#: Operator requests (``ReadRequest`` .. ``Prove``) are not in ``_ALL``: they never cross the
#: circuit. The enclave builds them from a verified ``ApiCall``, so a host cannot send one.
_TYPES: dict[str, type[Message]] = {cls.model_fields["op"].default: cls for cls in _ALL}
assert len(_TYPES) == len(_ALL), "every circuit message needs an op of its own"


def encode(message: Message) -> bytes:
    data: bytes = msgpack.packb(message.model_dump(), use_bin_type=True)
    return data


#: msgpack limits on one circuit record, which may come from a hostile host: the longest str
#: and bin (256 KiB chunks and 64 KiB bodies are the largest legitimate ones), the most
#: elements of one array or map, and the most arrays, maps and elements of a record together
#: (a record of nested empty arrays would otherwise cost 56 bytes of memory per byte sent).
MAX_RECORD_BYTES_FIELD = 4 * 1024 * 1024
MAX_RECORD_CONTAINER = 262_144
MAX_RECORD_ITEMS = 262_144


class _TooManyItems(ValueError):
    """A record holds more arrays, maps and elements than ``MAX_RECORD_ITEMS``."""


class _ItemBudget:
    """msgpack's ``list_hook`` and ``object_hook``: counts each container as it is built and
    stops decoding (by raising) once the record has used its budget."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_RECORD_ITEMS

    def list(self, items: list[Any]) -> list[Any]:
        self.left -= 1 + len(items)
        if self.left < 0:
            raise _TooManyItems
        return items

    def map(self, items: dict[Any, Any]) -> dict[Any, Any]:
        self.left -= 1 + 2 * len(items)
        if self.left < 0:
            raise _TooManyItems
        return items


def decode(record: bytes) -> Message:
    """The message ``record`` holds; ``CircuitError`` naming what is wrong otherwise."""
    # Every item takes at least one byte, so only a record longer than the budget is counted.
    budget = _ItemBudget() if len(record) > MAX_RECORD_ITEMS else None
    try:
        raw: Any = msgpack.unpackb(
            record,
            raw=False,
            strict_map_key=True,
            list_hook=budget.list if budget is not None else None,
            object_hook=budget.map if budget is not None else None,
            max_str_len=MAX_RECORD_BYTES_FIELD,
            max_bin_len=MAX_RECORD_BYTES_FIELD,
            max_array_len=MAX_RECORD_CONTAINER,
            max_map_len=MAX_RECORD_CONTAINER,
            max_ext_len=0,
        )
    except _TooManyItems:
        raise CircuitError(f"a record of more than {MAX_RECORD_ITEMS} items") from None
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.StackError) as exc:
        raise CircuitError(f"not a msgpack record: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise CircuitError("a circuit record is a map with a string 'op'")
    cls = _TYPES.get(raw["op"])
    if cls is None:
        raise CircuitError(f"unknown op {raw['op'][:40]!r}")
    try:
        return cls.model_validate(raw)
    except (ValidationError, RecursionError) as exc:
        raise CircuitError(f"bad {raw['op']!r} record: {str(exc)[:200]}") from None
