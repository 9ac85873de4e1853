"""The operator API's OpenAPI 3.1 document (``GET /v1/openapi.json``), built from the API itself.

Why it is generated and not written: the routes are ``kmnode.api_routes``'s tables (the ones
the host mounts and the KM enclave parses), the request bodies are the fields of the typed
requests and commands the enclave validates them into (``kmnode.km_messages``,
``kmnode.km.commands``), and the answers are the records the enclave shows (``kmnode.km.state``,
the command results); pydantic renders their JSON Schemas. A hand-written document would drift
from any of those; this one changes with them, and ``build`` refuses to produce a document in
which a route has no entry here (a new route must be documented before the node starts).

What is written here is what no type says: a summary per route, which query parameters a read
takes, and which statuses a route can answer with (the host's mapping in ``kmnode.host.api``).
Every error has one shape (``ErrorBody``). Nothing here is secret: the document describes the
API, it holds no key and no state. The KM enclave never imports this module (its measurement
does not depend on the documentation); the host serves the document, unsigned, like
``/v1/status``.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    RootModel,
    TypeAdapter,
    create_model,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

from kmnode.api_routes import CHAOS_ROUTES, MAX_CHALLENGE, OPENAPI_PATH, ROUTES, Route
from kmnode.identity import COVERED, LABEL, MAX_AGE_S, TAG, PublicIdentity
from kmnode.km.command_base import Hex32, Name, PolicyJson
from kmnode.km.commands import (
    ContractCall,
    ContractDeploy,
    KeyCreate,
    KeyGeneration,
    MemberChanged,
    MemberRemove,
    PolicyAllow,
    PolicyRevokePlatform,
    ProposalChanged,
    ProposalCreate,
    ProposalId,
    ProposalVote,
    ReleaseRequest,
)
from kmnode.km.data_commands import (
    DataCompute,
    DataGrant,
    DataOpRegister,
    DataRegister,
    DataRequest,
    GrantId,
    RequestId,
    TokenId,
)
from kmnode.km.recovery_commands import RecoveryShare, ShareAccepted
from kmnode.km.state import KeyRecord, Member, Proposal, Release
from kmnode.km_messages import FailureCode, Prove, ReleaseKey
from kmnode.linkfaults import LinkRule

#: The document as shipped in the package: what the host serves (it does not import this
#: module, which reads the enclave's types). ``python -m kmnode.openapi`` rewrites it;
#: tests/test_openapi.py fails while it differs from ``document()``.
SHIPPED = Path(__file__).with_name("openapi.json")
#: The routes the host answers itself, without a signature (probes, and this document).
OPEN_ROUTES = (
    ("GET", "/v1/status"),
    ("GET", OPENAPI_PATH),
    # The host's contract store (``kmnode.host.contract_host``): sealed records only.
    ("GET", "/v1/node/contracts/store"),
    ("GET", "/v1/node/contracts/store/checkpoint"),
    ("PUT", "/v1/node/contracts/store/checkpoint"),
    # The host's dataset blobs (``kmnode.host.blob_host``): ciphertext, checked by digest.
    ("GET", "/v1/node/data/blobs"),
    ("PUT", "/v1/node/data/blobs/{digest}"),
    # Monitoring (``kmnode.host.observe``): figures and probes, nothing secret.
    ("GET", "/metrics"),
    ("GET", "/v1/health"),
    ("GET", "/v1/health/live"),
)
_SCHEMA_REF = "#/components/schemas/{model}"
_SECURITY = "httpMessageSignature"

#: The codes only the host gives (the rest are the KM enclave's ``FailureCode``).
HostCode = Literal["unsupported_media_type", "bad_host", "bad_origin"]


class ErrorBody(BaseModel):
    """Every error the API answers with: one line, a machine code, and what the code needs."""

    model_config = ConfigDict(title="Error")

    error: str = Field(description="What is wrong, in one line.")
    code: FailureCode | HostCode = Field(description="What kind of failure (a machine code).")
    field: str | None = Field(
        default=None, description="The request field at fault (dotted path), when there is one."
    )
    leader: str | None = Field(
        default=None, description="With `not_leader`: the leader's name (null if none known)."
    )
    leader_api: str | None = Field(
        default=None, description="With `not_leader`: the leader's API URL (retry there)."
    )


# --- models for what no other type describes as such -----------------------------------------


def _field(source: type[BaseModel], name: str) -> tuple[Any, FieldInfo]:
    info = source.model_fields[name]
    return info.annotation, info


def _body(model: str, source: type[BaseModel], *names: str, **more: Any) -> type[BaseModel]:
    """A request body: the fields ``names`` of the typed request or command it becomes (same
    types, same constraints, same defaults), and ``more``. Unknown fields are ignored by the
    API, so the schema does not forbid them."""
    picked = {name: _field(source, name) for name in names}
    return _model(model, {**picked, **more})


def _record(
    model: str,
    cls: type,
    *,
    ok: bool = False,
    rename: Mapping[str, str] | None = None,
    only: Iterable[str] | None = None,
    **more: Any,
) -> type[BaseModel]:
    """An answer with the fields of the dataclass ``cls`` (a state record, a command result),
    as ``dataclasses.asdict`` or ``Applied.public`` render it: ``ok`` adds the latter's flag."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    defs: dict[str, Any] = {"ok": (bool, ...)} if ok else {}
    for f in fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        default: Any = ...
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        defs[(rename or {}).get(f.name, f.name)] = (hints[f.name], default)
    return _model(model, {**defs, **more})


def _list(model: str, **items: Any) -> type[BaseModel]:
    """An answer holding lists (``{"keys": [...]}``)."""
    return _model(model, {name: (cast(Any, list)[kind], ...) for name, kind in items.items()})


def _model(name: str, defs: Mapping[str, Any]) -> type[BaseModel]:
    """A model of the fields ``defs`` (``name: (type, default or FieldInfo)``)."""
    made: type[BaseModel] = create_model(name, **dict(defs))
    return made


def _root(name: str, kind: Any) -> type[BaseModel]:
    """A model whose value is one ``kind`` (not an object of fields)."""
    made: type[BaseModel] = create_model(name, __base__=cast(Any, RootModel)[kind])
    return made


class EmptyBody(BaseModel):
    """No fields (a POST still sends a JSON body: ``{}``)."""


_ProposalAnswer = _record("ProposalAnswer", ProposalChanged, ok=True)
_KeyAnswer = _record("KeyAnswer", KeyGeneration)
_ProposalView = _record("ProposalView", Proposal, needed=(int, ...))
_ReleaseResult = _record(
    "ReleaseResult",
    Release,
    rename={"id": "release"},
    only=("id", "node", "key", "generation", "status", "reason"),
)
_PolicyChangeBody = _body("PolicyChangeBody", PolicyAllow, "role", "measurement")


def _unset(schema: dict[str, JsonValue]) -> None:
    """A field that may be left out, with no default (left out, it keeps its value)."""
    schema.pop("default", None)


_LinkRuleChange = _model(
    "LinkRuleChange",
    {
        "peer": (str, Field(description="Another node of the cluster.")),
        **{
            name: (kind, Field(default=None, json_schema_extra=_unset))
            for name, kind in typing.get_type_hints(LinkRule).items()
        },
    },
)


# --- what each route documents --------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    name: str
    schema: Any
    description: str


LINEARIZABLE = Query(
    "linearizable",
    bool,
    "Confirm with the leader first that this node is up to date (`1`/`true`); otherwise the "
    "node answers from its applied state, which may lag the leader.",
)


#: The path parameters' types: a key's name, a proposal's id.
PATH_PARAMS: dict[str, Any] = {
    "name": Name,
    "id": ProposalId,
    "grant": GrantId,
    "request": RequestId,
    "token": TokenId,
    "digest": Hex32,
}


@dataclass(frozen=True)
class Doc:
    """What a route's types do not say: its summary, its query parameters; ``body`` and
    ``answer`` are the types of its request body (POST) and of its success's body."""

    summary: str
    answer: type[BaseModel]
    body: type[BaseModel] | None = None
    query: tuple[Query, ...] = ()
    #: Statuses this route answers with besides those of its kind (``statuses``).
    also: tuple[int, ...] = ()
    #: The success's media type (``/metrics`` is Prometheus text, not JSON).
    media: str = "application/json"


_READ = (LINEARIZABLE,)
_TEXT = {"type": "string"}
DOCS: dict[tuple[str, str], Doc] = {
    ("GET", "/v1/keys"): Doc(
        "List the keys (names and generations; never key material), by name, in pages: ask "
        "again with `after` = `next` until `next` is null",
        _model(
            "KeyList",
            {"keys": (list[KeyRecord], ...), "next": (str | None, None)},
        ),
        query=(
            *_READ,
            Query("after", str, "Only keys whose names sort after this one."),
            Query("limit", int, "At most this many keys (1..10000, the default)."),
        ),
    ),
    ("POST", "/v1/keys"): Doc(
        "Create a key (generation 1)",
        _KeyAnswer,
        _body("CreateKeyBody", KeyCreate, "name", "allowed_service"),
    ),
    ("GET", "/v1/keys/{name}"): Doc(
        "One key, with a fingerprint (a MAC, never the key) per generation",
        _record("KeyView", KeyRecord, fingerprints=(dict[str, str], ...)),
        query=_READ,
    ),
    ("POST", "/v1/keys/{name}/rotate"): Doc(
        "Rotate a key (a new generation)", _KeyAnswer, EmptyBody
    ),
    ("POST", "/v1/keys/{name}/release"): Doc(
        "Release a key to a member's service enclave (or all), and wait for the outcomes",
        _list("ReleaseResults", releases=_ReleaseResult),
        _body(
            "ReleaseBody",
            ReleaseRequest,
            "generation",
            node=(Name | Literal["all"], "all"),
            timeout=_field(ReleaseKey, "timeout"),
        ),
    ),
    ("GET", "/v1/releases"): Doc(
        "List releases (of one key, with ?key=)",
        _list("ReleaseList", releases=Release),
        query=(Query("key", Name, "Only the releases of this key."), LINEARIZABLE),
    ),
    ("POST", "/v1/service/prove"): Doc(
        "The service enclave proves it holds a released key: a MAC of the challenge",
        create_model(
            "Proof",
            node=(str, ...),
            key=(str, ...),
            generation=(int, ...),
            mac=(str, Field(pattern=r"^[0-9a-f]+$")),
        ),
        _body(
            "ProveBody",
            Prove,
            "key",
            "generation",
            challenge=(
                str,
                Field(
                    pattern=r"^([0-9a-f]{2})+$",
                    max_length=2 * MAX_CHALLENGE,
                    description=f"1 to {MAX_CHALLENGE} bytes, lowercase hex.",
                ),
            ),
        ),
        also=(404,),  # no such key generation provisioned on this node
    ),
    ("GET", "/v1/policy"): Doc("The attestation policy", _root("Policy", PolicyJson), query=_READ),
    ("POST", "/v1/policy/allow"): Doc(
        "Propose allowing an enclave measurement",
        _ProposalAnswer,
        _PolicyChangeBody,
    ),
    ("POST", "/v1/policy/disallow"): Doc(
        "Propose disallowing an enclave measurement",
        _ProposalAnswer,
        _PolicyChangeBody,
    ),
    ("POST", "/v1/policy/revoke-platform"): Doc(
        "Propose revoking a platform",
        _ProposalAnswer,
        _body("RevokePlatformBody", PolicyRevokePlatform, "platform_id"),
    ),
    ("GET", "/v1/members"): Doc(
        "The members and Raft's voters",
        _list("MemberList", members=Member, voters=str),
        query=_READ,
    ),
    ("POST", "/v1/members/remove"): Doc(
        "Propose removing a member (a retry after it passed removes the Raft voter)",
        _root("RemoveAnswer", _ProposalAnswer | _record("MemberAnswer", MemberChanged, ok=True)),
        _body("RemoveMemberBody", MemberRemove, "name"),
    ),
    ("GET", "/v1/attest"): Doc(
        "A fresh quote of this node's KM enclave, verified against the replicated policy",
        _root("Attestation", dict[str, JsonValue]),
    ),
    ("GET", "/v1/proposals"): Doc(
        "List governance proposals", _list("ProposalList", proposals=_ProposalView), query=_READ
    ),
    ("POST", "/v1/proposals"): Doc(
        "Propose governance actions (the proposer votes for them)",
        _ProposalAnswer,
        _body("ProposeBody", ProposalCreate, "actions"),
    ),
    ("GET", "/v1/proposals/{id}"): Doc("One proposal", _ProposalView, query=_READ),
    ("POST", "/v1/proposals/{id}/vote"): Doc(
        "Vote for or against an open proposal",
        _ProposalAnswer,
        _body("VoteBody", ProposalVote, "ballot"),
    ),
    ("POST", "/v1/proposals/{id}/withdraw"): Doc(
        "Withdraw an open proposal (its proposer only)", _ProposalAnswer, EmptyBody
    ),
    ("GET", "/v1/identities"): Doc(
        "The operator identities, their roles, and what a proposal needs",
        create_model(
            "Identities",
            identities=(list[PublicIdentity], ...),
            admins=(list[str], ...),
            votes_needed=(int, ...),
            threshold=(int, ...),
            chaos_enabled=(bool, ...),
        ),
        query=_READ,
    ),
    ("GET", "/v1/chaos/rules"): Doc(
        "Chaos: the link fault rules, their counters, and the ring stall",
        _root("ChaosRules", dict[str, JsonValue]),
    ),
    ("POST", "/v1/chaos/rules"): Doc(
        "Chaos: set the link fault rule toward a peer (fields not given keep their value)",
        create_model("ChaosRule", peer=(str, ...), rule=(LinkRule, ...)),
        _LinkRuleChange,
    ),
    ("POST", "/v1/chaos/heal"): Doc(
        "Chaos: drop the link fault rules (toward one peer, or all)",
        _list("Healed", healed=str),
        create_model("HealBody", peer=(str | None, None)),
    ),
    ("POST", "/v1/chaos/ring-stall"): Doc(
        "Chaos: stall or resume the host side of the service enclave's ring",
        create_model("RingStall", stalled=(bool, ...)),
        create_model("RingStallBody", stalled=(bool, ...)),
    ),
    ("POST", "/v1/chaos/service-crash"): Doc(
        "Chaos: kill the service enclave (409 if none runs)",
        create_model("ServiceCrash", killed=(int, ...)),
        EmptyBody,
    ),
    ("POST", "/v1/chaos/poison"): Doc(
        "Chaos: this node's host feeds garbage into every input it holds (or stops, and says "
        "what it sent and what came back)",
        create_model(
            "Poison", enabled=(bool, ...), seed=(int, ...), stats=(dict[str, JsonValue], ...)
        ),
        create_model(
            "PoisonBody",
            enabled=(bool, ...),
            seed=(int, Field(default=0, ge=0, lt=2**63)),
            rate=(float, Field(default=40, gt=0, le=1000, description="Actions per second.")),
        ),
    ),
    ("GET", "/v1/contracts"): Doc(
        "List the deployed contracts", _root("ContractList", dict[str, JsonValue])
    ),
    ("POST", "/v1/contracts"): Doc(
        "Deploy a contract (WebAssembly binary, base64); waits for this node to take it",
        _root("ContractDeployed", dict[str, JsonValue]),
        _body("DeployBody", ContractDeploy, "name", "code"),
    ),
    ("GET", "/v1/contracts/{name}"): Doc(
        "One contract and its committed state roots", _root("Contract", dict[str, JsonValue])
    ),
    ("POST", "/v1/contracts/{name}/calls"): Doc(
        "Call a contract (arguments sealed to the contract-input key, with the caller and the "
        "nonce inside); the result comes back sealed to the caller",
        _root("ContractCalled", dict[str, JsonValue]),
        _body(
            "CallBody",
            ContractCall,
            "function",
            "args",
            "nonce",
            "fuel",
            timeout=(float, Field(default=10.0, ge=0, le=300)),
        ),
    ),
    ("GET", "/v1/contract-input-key"): Doc(
        "The cluster's contract-input key (X25519, hex): seal call arguments to it",
        create_model("ContractInputKey", input_key=(str, ...)),
    ),
    ("GET", "/v1/node/contracts"): Doc(
        "This node's contract execution: position, why it stopped, cache, roots",
        _root("ContractExecution", dict[str, JsonValue]),
    ),
    ("POST", "/v1/node/contracts/resync"): Doc(
        "Restore this node's contract execution from its store's kept copies",
        _root("ContractResync", dict[str, JsonValue]),
        EmptyBody,
    ),
    ("POST", "/v1/chaos/tamper-state"): Doc(
        "Chaos: this node's host changes its stored contract state (409 if nothing to change)",
        create_model("Tampered", tampered=(str, ...)),
        create_model(
            "TamperBody",
            mode=(Literal["flip", "swap", "rollback", "drop"], ...),
            contract=(str | None, None),
            seed=(int, Field(default=0, ge=0, lt=2**63)),
        ),
    ),
    ("GET", "/v1/node/contracts/store"): Doc(
        "The host's contract store: kept checkpoints, records, external cache (open: sealed)",
        _root("ContractStore", dict[str, JsonValue]),
    ),
    ("GET", "/v1/node/contracts/store/checkpoint"): Doc(
        "The newest kept copy of the store (sealed records; open), for a resync",
        _root("StoreCheckpoint", dict[str, JsonValue]),
        also=(404,),
    ),
    ("PUT", "/v1/node/contracts/store/checkpoint"): Doc(
        "Keep a peer's copy as a checkpoint of this store (open: the enclave verifies it "
        "against a committed checkpoint before using it)",
        _root("StoreImported", dict[str, JsonValue]),
        _root("StoreCheckpointBody", dict[str, JsonValue]),
        also=(400,),
    ),
    ("GET", "/v1/data/keys"): Doc(
        "The cluster's data-wrap key (owners wrap data keys to it), token verification key "
        "and input key (users seal parameters to it); X25519/Ed25519, hex",
        create_model("DataKeys", wrap_key=(str, ...), token_key=(str, ...), input_key=(str, ...)),
    ),
    ("GET", "/v1/data/ops"): Doc(
        "The operations a dataset may allow: the built-ins and those registered in "
        "WebAssembly (name, version, checksum)",
        _root("DataOps", dict[str, JsonValue]),
    ),
    ("POST", "/v1/data/ops"): Doc(
        "Register a data operation written in WebAssembly (an operator's act; a name once)",
        _root("OpRegistered", dict[str, JsonValue]),
        _body("OpRegisterBody", DataOpRegister, "name", "version", "code"),
    ),
    ("GET", "/v1/datasets"): Doc(
        "List the registered datasets (digests and wrapped keys; never data)",
        _root("DatasetList", dict[str, JsonValue]),
    ),
    ("POST", "/v1/datasets"): Doc(
        "Register a dataset (an owner's act): digests, privacy, allowed operations, its data "
        "key wrapped to the data-wrap key; the blob goes to the hosts by PUT",
        _root("DatasetRegistered", dict[str, JsonValue]),
        _body(
            "RegisterBody",
            DataRegister,
            "name",
            "digest_ct",
            "digest_pt",
            "size",
            "privacy",
            "ops",
            "wrapped_key",
            "min_group_size",
            "allowed_service",
        ),
    ),
    ("GET", "/v1/datasets/{name}"): Doc(
        "One dataset and its grants", _root("Dataset", dict[str, JsonValue])
    ),
    ("POST", "/v1/datasets/{name}/grants"): Doc(
        "Grant a user operations on the dataset (its owner's act)",
        _root("GrantMade", dict[str, JsonValue]),
        _body("GrantBody", DataGrant, "user", "ops", "uses", "ttl"),
    ),
    ("POST", "/v1/datasets/{name}/requests"): Doc(
        "Ask the dataset's owner for a grant (published on the owner's MQTT topic)",
        _root("RequestMade", dict[str, JsonValue]),
        _body("RequestBody", DataRequest, "ops", "uses", "ttl"),
    ),
    ("POST", "/v1/datasets/{name}/computations"): Doc(
        "The authentication transaction: issue a token if a grant covers it, then wait for "
        "the platform node's service enclave; the result comes back sealed to the user",
        _root("Computation", dict[str, JsonValue]),
        _body(
            "ComputeBody",
            DataCompute,
            "operation",
            "params",
            "sealed",
            "nonce",
            node=(str | None, None),
            timeout=(float, Field(default=10.0, ge=0, le=300)),
        ),
    ),
    ("GET", "/v1/data/grants"): Doc(
        "List grants (query: dataset, user)", _root("GrantList", dict[str, JsonValue])
    ),
    ("POST", "/v1/data/grants/{grant}/revoke"): Doc(
        "Revoke a grant (its dataset owner's act)",
        _root("GrantRevoked", dict[str, JsonValue]),
        EmptyBody,
    ),
    ("GET", "/v1/data/requests"): Doc(
        "List users' requests for grants (query: state, dataset, user)",
        _root("RequestList", dict[str, JsonValue]),
    ),
    ("POST", "/v1/data/requests/{request}/approve"): Doc(
        "Approve a request: a grant on its terms (the dataset owner's act)",
        _root("RequestApproved", dict[str, JsonValue]),
        EmptyBody,
    ),
    ("POST", "/v1/data/requests/{request}/deny"): Doc(
        "Deny a request (the dataset owner's act)",
        _root("RequestDenied", dict[str, JsonValue]),
        EmptyBody,
    ),
    ("GET", "/v1/data/tokens"): Doc(
        "List tokens and how each ended (query: dataset, user, grant, state, node)",
        _root("TokenList", dict[str, JsonValue]),
    ),
    ("GET", "/v1/data/tokens/{token}"): Doc(
        "One token: its record, canonical bytes and this node's signature (identical on "
        "every node)",
        _root("Token", dict[str, JsonValue]),
    ),
    ("GET", "/v1/data/tokens/{token}/result"): Doc(
        "A token's sealed result, from its platform node (its user only)",
        _root("TokenResult", dict[str, JsonValue]),
    ),
    ("GET", "/v1/node/data"): Doc(
        "This node's data work: jobs run, tokens pending, revocation observation lag",
        _root("DataNode", dict[str, JsonValue]),
    ),
    ("POST", "/v1/chaos/tamper-blob"): Doc(
        "Chaos: this node's host flips a bit of a stored dataset blob (409 if it has none)",
        create_model("BlobTampered", tampered=(str, ...)),
        create_model("TamperBlobBody", digest=(str, ...)),
    ),
    ("GET", "/v1/node/data/blobs"): Doc(
        "The dataset blobs this node's host keeps (open: ciphertext digests)",
        create_model("BlobList", blobs=(list[str], ...)),
    ),
    ("PUT", "/v1/node/data/blobs/{digest}"): Doc(
        "Store a dataset blob under its sha256 (open: the bytes must hash to the name; the "
        "enclave checks the digest again before use)",
        create_model("BlobStored", digest=(str, ...), bytes=(int, ...), stored=(bool, ...)),
        also=(400, 413),
    ),
    ("GET", "/v1/recovery"): Doc(
        "The ledger's split of the master secret (holders, threshold, boxed shares and "
        "commitments: all public) and a recovery's progress as this node sees it",
        _root("RecoveryStatus", dict[str, JsonValue]),
    ),
    ("GET", "/v1/recovery/key"): Doc(
        "This node's enclave recovery key, with a quote binding it: holders box their share "
        "to it (kmctl recovery submit verifies the quote first)",
        create_model(
            "RecoveryKey",
            node=(str, ...),
            platform_id=(str, ...),
            box_key=(str, ...),
            quote=(str, ...),
        ),
        also=(404,),  # the node is not recovering: it has no recovery key
    ),
    ("POST", "/v1/recovery/shares"): Doc(
        "Submit the signer's recovery share, boxed to each recovering node's recovery key; "
        "the leader's enclave checks it against its commitment at once (409 naming the holder "
        "if bogus; nothing is recorded then)",
        _record("ShareAccepted", ShareAccepted, ok=True),
        _body("ShareBody", RecoveryShare, "generation", "boxes"),
    ),
    ("GET", "/v1/snapshot"): Doc(
        "A chunk (at most 256 KiB) of a snapshot of this node's state, signed by its enclave "
        "(query: offset; id, the snapshot's sha256, after the first chunk). Offset 0 without "
        "an id takes a new snapshot. It holds no secret",
        create_model(
            "SnapshotChunk",
            id=(str, ...),
            node=(str, ...),
            index=(int, ...),
            term=(int, ...),
            size=(int, ...),
            offset=(int, ...),
            chunk=(str, ...),
        ),
        also=(404,),  # the snapshot asked for is no longer held: start again
        query=(
            Query("offset", int, "Byte offset of the chunk (0: the first)."),
            Query("id", str, "The snapshot's sha256 (hex), for every chunk after the first."),
        ),
    ),
    ("POST", "/v1/members/transfer-leader"): Doc(
        "Hand the leadership to a voting member and wait until it leads (an admin's act; "
        "504 if it has not moved within the timeout)",
        create_model("LeaderMoved", leader=(str, ...), previous=(str, ...), moved=(bool, ...)),
        create_model(
            "TransferLeaderBody",
            to=(str, Field(min_length=1, max_length=64)),
            timeout=(float, Field(default=5.0, ge=0.1, le=60.0)),
        ),
    ),
    ("GET", "/v1/audit"): Doc(
        "The audit trail in ledger order: every release (requested, then its outcome) and "
        "every proposal (created, then closed), after index `since`; page with `next`",
        _root("AuditRecords", dict[str, JsonValue]),
        query=(
            Query("since", int, "Only records at ledger indexes above this one."),
            Query("limit", int, "At most this many records (1..10000, default 1000)."),
        ),
    ),
    ("GET", "/metrics"): Doc(
        "Prometheus metrics (open): Raft, releases by outcome, release latency, attestation "
        "failures, peer links, the service ring, MQTT, fsyncs; read at scrape time",
        _root("Metrics", str),
        media="text/plain",
    ),
    ("GET", "/v1/health"): Doc(
        "Readiness (open): 200 when joined, a leader known and the secret held; 503 with the "
        "reason otherwise (not joined, no leader, recovery mode, the KM enclave not answering)",
        create_model("Health", status=(str, ...), reason=(str, ...)),
    ),
    ("GET", "/v1/health/live"): Doc(
        "Liveness (open): 200 while the host and its KM enclave process run",
        create_model("Alive", status=(str, ...), reason=(str, ...)),
    ),
    ("GET", "/v1/status"): Doc(
        "This node's status (open: no signature, for probes)",
        _root("Status", dict[str, JsonValue]),
    ),
    ("GET", OPENAPI_PATH): Doc(
        "This document (open: no signature)", _root("OpenApiDocument", dict[str, JsonValue])
    ),
}


# --- statuses --------------------------------------------------------------------------------

_STATUS_TEXT: dict[int, str] = {
    400: "Malformed: the body or a field (named in `field`), or a request too large to relay "
    "(`bad_request`).",
    401: "Not signed (`unsigned`), a signature that does not verify (`bad_signature`), an "
    "identity the cluster does not know (`unknown_identity`), or too old (`expired`).",
    403: "The signer's roles do not allow this route (`forbidden`), or the Host/Origin is not "
    "this node's (`bad_host`, `bad_origin`).",
    404: "No such key, proposal or route, a key generation this node was never given, or "
    "chaos is not enabled (`not_found`).",
    409: "Refused by the state machine (`refused`, the error says why), or this signed request "
    "was made before (`replay`).",
    413: "The body is larger than the API takes (`bad_request`).",
    415: "A POST body that is not `application/json` (`unsupported_media_type`).",
    421: "Not the leader (`not_leader`): retry at `leader_api` (null while none is known).",
    500: "The KM enclave failed to answer (`internal`): a bug, to report.",
    503: "Not ready: no leader yet, not joined, or the KM enclave is unreachable "
    "(`not_ready`, `unavailable`).",
    504: "The KM enclave or the commit did not finish in time (`timeout`): it may still commit.",
}


def statuses(method: str, path: str, *, chaos: bool = False) -> tuple[int, ...]:
    """The error statuses a route can answer with, from how the host maps failures."""
    if (method, path) in OPEN_ROUTES:
        base = {403, 500, 503, 504} if path != OPENAPI_PATH else {403}
        return tuple(sorted(base | set(DOCS[(method, path)].also)))
    found = {400, 401, 403, 500, 503, 504, *DOCS[(method, path)].also}
    if method == "POST":
        # A write commits through the leader; a body is JSON, of a bounded size.
        found |= {409, 413, 415, 421}
    elif any(q is LINEARIZABLE for q in DOCS[(method, path)].query):
        found.add(421)
    if chaos or "{" in path:
        found.add(404)
    return tuple(sorted(found))


# --- the document ----------------------------------------------------------------------------


class UndocumentedRoute(Exception):
    """A route of the API has no entry in ``DOCS`` (or an entry names no route)."""


def _routes() -> list[tuple[str, str, Route | None, bool]]:
    """Every route the host serves: (method, path, its Route if signed, whether chaos)."""
    every: list[tuple[str, str, Route | None, bool]] = [
        (r.method, r.path, r, False) for r in ROUTES
    ]
    every += [(r.method, r.path, r, True) for r in CHAOS_ROUTES]
    every += [(method, path, None, False) for method, path in OPEN_ROUTES]
    return every


def check_documented() -> None:
    """Raise ``UndocumentedRoute`` unless every route has exactly one entry in ``DOCS``."""
    served = {(method, path) for method, path, _, _ in _routes()}
    missing = sorted(served - DOCS.keys())
    extra = sorted(DOCS.keys() - served)
    if missing or extra:
        raise UndocumentedRoute(
            f"routes without documentation: {missing}; documentation without a route: {extra}"
        )
    untyped = sorted({p for _, path in served for p in _path_names(path)} - PATH_PARAMS.keys())
    if untyped:
        raise UndocumentedRoute(f"path parameters without a type in PATH_PARAMS: {untyped}")


def _models() -> list[type[BaseModel]]:
    """Every model the document names, once each."""
    named = [m for doc in DOCS.values() for m in (doc.answer, doc.body) if m is not None]
    return list(dict.fromkeys([*named, ErrorBody]))


def _param_schema(kind: Any) -> dict[str, Any]:
    """The JSON Schema of a path or query parameter's type."""
    return TypeAdapter(kind).json_schema()


_SIGNATURE_TEXT = (
    "An HTTP Message Signature (RFC 9421), algorithm `ed25519`, label `{label}`, tag `{tag}`, "
    "covering {covered}, with `created`, a `nonce` of 16 to 64 characters and `keyid` (the "
    "identity's name). `Signature`, `Signature-Input` and `Content-Digest` (SHA-256 of the body, "
    "even an empty one) are all needed. A signature is accepted up to {age} s after `created`; "
    "the request id (`keyid:nonce`) of a write commits once (a second use is a 409 `replay`). "
    "See docs/operator-api.md and `kmnode.identity.sign_request`."
).format(label=LABEL, tag=TAG, covered=", ".join(f"`{c}`" for c in COVERED), age=MAX_AGE_S)


def _signature_parameters() -> dict[str, Any]:
    header = {"type": "string", "maxLength": 4096}
    return {
        "SignatureInput": {
            "name": "Signature-Input",
            "in": "header",
            "required": True,
            "description": "The signature's covered components and parameters (RFC 9421).",
            "schema": header,
        },
        "ContentDigest": {
            "name": "Content-Digest",
            "in": "header",
            "required": True,
            "description": "`sha-256=:<base64>:` of the body's bytes (RFC 9530), signed.",
            "schema": header,
        },
    }


def _operation(
    method: str,
    path: str,
    route: Route | None,
    chaos: bool,
    refs: Mapping[type[BaseModel], dict[str, Any]],
) -> dict[str, Any]:
    doc = DOCS[(method, path)]
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _param_schema(PATH_PARAMS[name])}
        for name in _path_names(path)
    ]
    parameters += [
        {
            "name": q.name,
            "in": "query",
            "required": False,
            "description": q.description,
            "schema": _param_schema(q.schema),
        }
        for q in doc.query
    ]
    success = route.status if route is not None else 200
    responses: dict[str, Any] = {
        str(success): {
            "description": doc.summary,
            "content": {
                doc.media: {
                    "schema": refs[doc.answer] if doc.media == "application/json" else _TEXT
                }
            },
        }
    }
    for status in statuses(method, path, chaos=chaos):
        responses[str(status)] = {"$ref": f"#/components/responses/{status}"}
    operation: dict[str, Any] = {
        "operationId": f"{method.lower()}{_camel(path)}",
        "summary": doc.summary,
        "tags": [path.split("/")[2] if path.startswith("/v1/") else path.strip("/")],
        "responses": responses,
    }
    if route is None:
        operation["security"] = []
    else:
        roles = " or ".join(f"`{role}`" for role in route.roles)
        operation["description"] = f"Needs an identity with the {roles} role."
        parameters += [
            {"$ref": "#/components/parameters/SignatureInput"},
            {"$ref": "#/components/parameters/ContentDigest"},
        ]
    if parameters:
        operation["parameters"] = parameters
    if doc.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[doc.body]}},
        }
    return operation


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _camel(path: str) -> str:
    words = path.replace("{", "").replace("}", "").replace(".", "/").replace("-", "/").split("/")
    return "".join(w[:1].upper() + w[1:] for w in words if w and w != "v1")


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every ``/v1`` route (built once per process)."""
    check_documented()
    models = _models()
    mapping, definitions = models_json_schema(
        [(m, "validation") for m in models], ref_template=_SCHEMA_REF
    )
    refs = {m: mapping[(m, "validation")] for m in models}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, route, chaos in _routes():
        operation = _operation(method, path, route, chaos, refs)
        paths.setdefault(path, {})[method.lower()] = operation
    error = {"application/json": {"schema": refs[ErrorBody]}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kmsim operator API",
            "version": "1",
            "description": (
                "The operator API of a kmsim KM node (docs/operator-api.md). Every route but "
                f"`/v1/status` and `{OPENAPI_PATH}` needs a signed request. " + _SIGNATURE_TEXT
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "responses": {
                str(status): {"description": text, "content": error}
                for status, text in _STATUS_TEXT.items()
            },
            "parameters": _signature_parameters(),
            "securitySchemes": {
                _SECURITY: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": _SIGNATURE_TEXT,
                }
            },
        },
        "security": [{_SECURITY: []}],
    }


def render() -> str:
    """The document as the shipped file holds it (sorted keys, two-space indent)."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Rewrite the shipped document (after a route or a type changed)."""
    SHIPPED.write_text(render())
    print(f"wrote {SHIPPED}")


if __name__ == "__main__":
    main()
