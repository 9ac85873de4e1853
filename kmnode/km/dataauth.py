"""The replicated part of data authorization (issue 15, S5): datasets, requests, grants, tokens.

Part of the KM state machine (``KMState.data``): applied on every node in log order, so every
decision is a pure function of the state and the command. Time is the state's own clock: the
creation time of the newest signed request committed (``KMState.newest_request``), which only
moves forward, is the same on every node, and is at most a signature's lifetime behind the
signer's clock. A grant expires ``ttl`` seconds after the owner signed it; a token expires with
its grant or ``TOKEN_TTL_S`` after it was issued, whichever is first.

The token is the committed authentication transaction: every field of it comes from this
state, so every node holds the same token, and every KM enclave signs the same bytes with the
same key derived from the master secret (``KMEnclave.token_signature``); nothing here is
secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from attest.identity import EnclaveRole
from attest.policy import Policy
from kmnode.dataauth.ops import BUILTIN_OPS
from kmnode.identity import PublicIdentity
from kmnode.km.command_base import Applied, AuthStamp, CommandRefused
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
    DatasetRegistered,
    GrantChanged,
    OpRegistered,
    PlatformMeasured,
    RequestChanged,
    ServiceMeasured,
    TokenIssued,
    TokensFinished,
)

#: What every WebAssembly binary begins with.
WASM_MAGIC = b"\0asm"
#: The longest a token lives after it is issued (seconds of the state's clock).
TOKEN_TTL_S = 600
#: Version of the token's canonical form.
TOKEN_VERSION = 1


class Context(Protocol):
    """What data authorization reads of the rest of the KM state."""

    identities: dict[str, PublicIdentity]
    policy: Policy
    newest_request: int

    @property
    def member_names(self) -> frozenset[str]: ...


@dataclass
class DataOp:
    """A data operation in WebAssembly (``kmnode.dataauth.wasm_op``): its code is public."""

    name: str
    version: int
    checksum: str
    code: str
    index: int
    by: str


@dataclass(frozen=True)
class OpView:
    """What a computation needs to know of an operation, built-in or registered."""

    kind: str
    version: int
    checksum: str


@dataclass
class Dataset:
    name: str
    owner: str
    digest_ct: str
    digest_pt: str
    size: int
    privacy: str
    ops: list[str]
    wrapped_key: str
    min_group_size: int
    allowed_service: list[str]
    index: int


@dataclass
class Grant:
    id: str
    dataset: str
    user: str
    ops: list[str]
    uses: int
    uses_left: int
    #: State clock (Unix seconds) from which the grant no longer issues tokens.
    expires_at: int
    index: int
    #: The request it approved ("" for a direct grant), and the index that revoked it.
    request: str = ""
    revoked_index: int = 0

    def refusal(self, op: str, now: int) -> str:
        """Why this grant issues no token for ``op`` now ("" if it does)."""
        if self.revoked_index:
            return f"grant {self.id} was revoked"
        if now >= self.expires_at:
            return f"grant {self.id} expired"
        if op not in self.ops:
            return f"grant {self.id} covers {', '.join(self.ops)}, not {op}"
        if self.uses_left <= 0:
            return f"grant {self.id} has no uses left (of {self.uses})"
        return ""


@dataclass
class AccessRequest:
    id: str
    dataset: str
    user: str
    owner: str
    ops: list[str]
    uses: int
    ttl: int
    index: int
    state: str = "open"
    grant: str = ""


@dataclass(frozen=True)
class Token:
    """An issued token and how it ended. ``sealed``/``nonce`` (the sealed parameters) are kept
    until the platform finishes with it, then dropped. Frozen: its end replaces it, so a
    snapshot may hold the records themselves and serialise them later (as releases)."""

    id: str
    grant: str
    dataset: str
    digest_ct: str
    digest_pt: str
    user: str
    user_box_key: str
    op: str
    op_checksum: str
    params: str
    node: str
    measurement: str
    issued_index: int
    issued_at: int
    expires_at: int
    uses_left_after: int
    sealed: str = ""
    nonce: str = ""
    state: str = "issued"
    result_hash: str = ""
    reason: str = ""
    finished_index: int = 0

    def body(self) -> bytes:
        """The token's canonical bytes: what every KM enclave signs, and what the service
        enclave and the user check."""
        return json.dumps(
            {
                "v": TOKEN_VERSION,
                "id": self.id,
                "grant": self.grant,
                "data": self.dataset,
                "digest": self.digest_ct,
                "digest_pt": self.digest_pt,
                "user": self.user,
                "user_pk": self.user_box_key,
                "op": self.op,
                "op_checksum": self.op_checksum,
                "params": self.params,
                "platform": {"node": self.node, "measurement": self.measurement},
                "issued": self.issued_index,
                "issued_at": self.issued_at,
                "expires_at": self.expires_at,
                "uses_left_after": self.uses_left_after,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def public(self) -> dict[str, Any]:
        view = asdict(self)
        del view["sealed"], view["nonce"]
        return view


@dataclass
class DataAuthState:
    datasets: dict[str, Dataset] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    requests: dict[str, AccessRequest] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    #: Each node's service measurement, as its KM enclave last attested it.
    platforms: dict[str, str] = field(default_factory=dict)
    #: Data operations in WebAssembly, by name (the built-ins are ``BUILTIN_OPS``).
    ops: dict[str, DataOp] = field(default_factory=dict)
    #: Grant ids by (dataset, user), oldest first: an index (not serialised) so a compute
    #: looks at the user's grants only.
    _pairs: dict[tuple[str, str], list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for grant in self.grants.values():
            self._pairs.setdefault((grant.dataset, grant.user), []).append(grant.id)

    # --- operations ---------------------------------------------------------------------------

    def op(self, name: str) -> OpView | None:
        """A built-in or registered operation (None: no such operation)."""
        spec = BUILTIN_OPS.get(name)
        if spec is not None:
            return OpView(spec.kind, spec.version, spec.checksum)
        registered = self.ops.get(name)
        if registered is not None:
            return OpView("aggregate", registered.version, registered.checksum)
        return None

    def register_op(self, index: int, cmd: DataOpRegister, ctx: Context) -> Applied:
        by = _signer(cmd.auth)
        if cmd.name in BUILTIN_OPS or cmd.name in self.ops:
            raise CommandRefused(f"an operation named {cmd.name!r} exists")
        code = base64.b64decode(cmd.code, validate=True)
        if not code.startswith(WASM_MAGIC):
            raise CommandRefused("an operation's code is a WebAssembly binary (\\0asm...)")
        record = DataOp(
            cmd.name, cmd.version, hashlib.sha256(code).hexdigest(), cmd.code, index, by
        )
        self.ops[cmd.name] = record
        return OpRegistered(record.name, record.version, record.checksum)

    # --- owners -------------------------------------------------------------------------------

    def register(self, index: int, cmd: DataRegister, ctx: Context) -> Applied:
        owner = _signer(cmd.auth)
        if cmd.name in self.datasets:
            raise CommandRefused(f"a dataset named {cmd.name!r} exists")
        unknown = [op for op in cmd.ops if self.op(op) is None]
        if unknown:
            raise CommandRefused(f"unknown operation {unknown[0]!r}")
        if cmd.privacy == "high":
            raw = [op for op in cmd.ops if BUILTIN_OPS.get(op) and BUILTIN_OPS[op].kind == "export"]
            if raw:
                raise CommandRefused(f"a high-privacy dataset cannot allow {raw[0]!r}")
        self.datasets[cmd.name] = Dataset(
            cmd.name,
            owner,
            cmd.digest_ct,
            cmd.digest_pt,
            cmd.size,
            cmd.privacy,
            sorted(set(cmd.ops)),
            cmd.wrapped_key,
            cmd.min_group_size,
            list(cmd.allowed_service),
            index,
        )
        return DatasetRegistered(cmd.name, owner)

    def grant(self, index: int, cmd: DataGrant, ctx: Context) -> Applied:
        dataset = self._owned(cmd.dataset, cmd.auth)
        self._check_terms(dataset, cmd.ops)
        if cmd.user not in ctx.identities:
            raise CommandRefused(f"no identity named {cmd.user!r}")
        created = cmd.auth.created if cmd.auth else ctx.newest_request
        grant = self._new_grant(index, dataset, cmd.user, cmd.ops, cmd.uses, created + cmd.ttl)
        return _grant_view(grant)

    def request(self, index: int, cmd: DataRequest, ctx: Context) -> Applied:
        user = _signer(cmd.auth)
        dataset = self._dataset(cmd.dataset)
        self._check_terms(dataset, cmd.ops)
        request = AccessRequest(
            f"q{index}", dataset.name, user, dataset.owner, sorted(set(cmd.ops)), cmd.uses,
            cmd.ttl, index,
        )  # fmt: skip
        self.requests[request.id] = request
        return _request_view(request)

    def approve(self, index: int, cmd: DataApprove, ctx: Context) -> Applied:
        request = self._open_request(cmd.request, cmd.auth)
        created = cmd.auth.created if cmd.auth else ctx.newest_request
        dataset = self._dataset(request.dataset)
        grant = self._new_grant(
            index, dataset, request.user, request.ops, request.uses, created + request.ttl
        )
        grant.request = request.id
        request.state, request.grant = "approved", grant.id
        return _grant_view(grant)

    def deny(self, index: int, cmd: DataDeny, ctx: Context) -> Applied:
        request = self._open_request(cmd.request, cmd.auth)
        request.state = "denied"
        return _request_view(request)

    def revoke(self, index: int, cmd: DataRevoke, ctx: Context) -> Applied:
        grant = self.grants.get(cmd.grant)
        if grant is None:
            raise CommandRefused(f"no grant {cmd.grant}")
        self._owned(grant.dataset, cmd.auth)
        if grant.revoked_index:
            raise CommandRefused(f"grant {grant.id} was revoked before")
        grant.revoked_index = index
        return _grant_view(grant)

    # --- the authentication transaction and its end ---------------------------------------

    def compute(self, index: int, cmd: DataCompute, ctx: Context) -> Applied:
        user = _signer(cmd.auth)
        dataset = self._dataset(cmd.dataset)
        spec = self.op(cmd.operation)
        if spec is None:
            raise CommandRefused(f"unknown operation {cmd.operation!r}")
        if cmd.operation not in dataset.ops:
            raise CommandRefused(
                f"dataset {dataset.name!r} allows {', '.join(dataset.ops)}, not {cmd.operation}"
            )
        if spec.kind == "export" and dataset.privacy == "high":
            raise CommandRefused(f"dataset {dataset.name!r} is high-privacy: no {cmd.operation}")
        now = ctx.newest_request
        grant = self._usable_grant(dataset, user, cmd.operation, now)
        if cmd.node not in ctx.member_names:
            raise CommandRefused(f"no member named {cmd.node!r}")
        measurement = self.platforms.get(cmd.node)
        if measurement is None:
            raise CommandRefused(f"node {cmd.node} has not attested its service enclave yet")
        if not _may_compute(dataset, measurement, ctx.policy):
            raise CommandRefused(
                f"node {cmd.node}'s service enclave ({measurement[:16]}...) is not allowed "
                f"to compute on {dataset.name!r}"
            )
        identity = ctx.identities[user]
        grant.uses_left -= 1
        token = Token(
            id=f"t{index}",
            grant=grant.id,
            dataset=dataset.name,
            digest_ct=dataset.digest_ct,
            digest_pt=dataset.digest_pt,
            user=user,
            user_box_key=identity.box_key,
            op=cmd.operation,
            op_checksum=spec.checksum,
            params=cmd.params,
            node=cmd.node,
            measurement=measurement,
            issued_index=index,
            issued_at=now,
            expires_at=min(grant.expires_at, now + TOKEN_TTL_S),
            uses_left_after=grant.uses_left,
            sealed=cmd.sealed,
            nonce=cmd.nonce,
        )
        self.tokens[token.id] = token
        return TokenIssued(token.id, grant.id, token.node, user, grant.uses_left)

    def consume(self, index: int, cmd: DataConsume, ctx: Context) -> Applied:
        """Apply each end on its own: one that cannot apply (its token already ended, is
        another node's, unknown) is skipped with the reason, and the rest apply; refused only
        if none does."""
        finished: list[str] = []
        skipped: list[str] = []
        replays = 0
        for end in cmd.ends:
            token = self.tokens.get(end.token)
            if token is None:
                skipped.append(f"{end.token}: no such token")
            elif token.node != cmd.node:
                skipped.append(f"{end.token}: is for {token.node}, not {cmd.node}")
            elif token.state != "issued":
                replays += 1
                skipped.append(f"{end.token}: was {token.state} before")
            elif end.status == "consumed" and not end.result_hash:
                skipped.append(f"{end.token}: a consumed token needs its result's hash")
            else:
                # Replaced, never changed in place: a snapshot captures tokens by reference.
                self.tokens[token.id] = replace(
                    token,
                    state=end.status,
                    result_hash=end.result_hash,
                    reason=end.reason,
                    finished_index=index,
                    sealed="",
                    nonce="",
                )
                finished.append(token.id)
        if not finished:
            raise CommandRefused(
                "no token ended: " + "; ".join(skipped[:3]),
                "replay" if replays == len(cmd.ends) else "refused",
            )
        return TokensFinished(cmd.node, finished, skipped)

    def measured(self, index: int, cmd: ServiceMeasured, ctx: Context) -> Applied:
        if cmd.node not in ctx.member_names:
            raise CommandRefused(f"no member named {cmd.node!r}")
        self.platforms[cmd.node] = cmd.measurement
        return PlatformMeasured(cmd.node, cmd.measurement)

    # --- helpers ------------------------------------------------------------------------------

    def _dataset(self, name: str) -> Dataset:
        dataset = self.datasets.get(name)
        if dataset is None:
            raise CommandRefused(f"no dataset named {name!r}")
        return dataset

    def _owned(self, name: str, auth: AuthStamp | None) -> Dataset:
        dataset = self._dataset(name)
        by = _signer(auth)
        if by != dataset.owner:
            raise CommandRefused(
                f"{by!r} does not own dataset {name!r} ({dataset.owner} does)", "forbidden"
            )
        return dataset

    def _open_request(self, request_id: str, auth: AuthStamp | None) -> AccessRequest:
        request = self.requests.get(request_id)
        if request is None:
            raise CommandRefused(f"no request {request_id}")
        self._owned(request.dataset, auth)
        if request.state != "open":
            raise CommandRefused(f"request {request_id} was {request.state} before")
        return request

    @staticmethod
    def _check_terms(dataset: Dataset, ops: list[str]) -> None:
        outside = [op for op in ops if op not in dataset.ops]
        if outside:
            raise CommandRefused(
                f"dataset {dataset.name!r} allows {', '.join(dataset.ops)}, not {outside[0]}"
            )

    def _new_grant(
        self, index: int, dataset: Dataset, user: str, ops: list[str], uses: int, expires: int
    ) -> Grant:
        grant = Grant(f"g{index}", dataset.name, user, sorted(set(ops)), uses, uses, expires, index)
        self.grants[grant.id] = grant
        self._pairs.setdefault((grant.dataset, grant.user), []).append(grant.id)
        return grant

    def _usable_grant(self, dataset: Dataset, user: str, op: str, now: int) -> Grant:
        """The oldest grant of ``user`` on ``dataset`` that issues a token for ``op`` now;
        refused with the newest grant's reason if none does."""
        mine = [self.grants[g] for g in self._pairs.get((dataset.name, user), [])]
        if not mine:
            raise CommandRefused(f"{user!r} holds no grant on dataset {dataset.name!r}")
        for grant in mine:
            if not grant.refusal(op, now):
                return grant
        raise CommandRefused(mine[-1].refusal(op, now))

    # --- snapshots ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return self.capture()()

    def capture(self) -> Callable[[], dict[str, Any]]:
        """A consistent image now, serialised later (``KMState.snapshot_capture``): the small
        records are copied at once, the tokens (frozen, and the many) by reference."""
        head = {
            "datasets": [asdict(d) for d in self.datasets.values()],
            "grants": [asdict(g) for g in self.grants.values()],
            "requests": [asdict(r) for r in self.requests.values()],
            "platforms": dict(self.platforms),
            "ops": [asdict(o) for o in self.ops.values()],
        }
        tokens = list(self.tokens.values())
        return lambda: {**head, "tokens": [dict(vars(t)) for t in tokens]}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DataAuthState:
        data = data or {}
        return cls(
            datasets={d["name"]: Dataset(**d) for d in data.get("datasets", [])},
            grants={g["id"]: Grant(**g) for g in data.get("grants", [])},
            requests={r["id"]: AccessRequest(**r) for r in data.get("requests", [])},
            tokens={t["id"]: Token(**t) for t in data.get("tokens", [])},
            platforms=dict(data.get("platforms", {})),
            ops={o["name"]: DataOp(**o) for o in data.get("ops", [])},
        )


def _signer(auth: AuthStamp | None) -> str:
    if auth is None:
        raise CommandRefused("this command needs a signed request", "forbidden")
    return auth.by


def _may_compute(dataset: Dataset, measurement: str, policy: Policy) -> bool:
    if dataset.allowed_service:
        return measurement in dataset.allowed_service
    return bytes.fromhex(measurement) in policy.measurements_for(EnclaveRole.SERVICE)


def _grant_view(grant: Grant) -> GrantChanged:
    state = "revoked" if grant.revoked_index else "active"
    return GrantChanged(grant.id, grant.dataset, grant.user, state, grant.uses_left, grant.request)


def _request_view(request: AccessRequest) -> RequestChanged:
    return RequestChanged(request.id, request.dataset, request.user, request.owner, request.state)


def result_hash(sealed: bytes) -> str:
    """The hash a consumed token commits: of the sealed result exactly as the user gets it."""
    return hashlib.sha256(sealed).hexdigest()
