"""The data workload's operations as the history records them (``data.register``,
``data.grant``, ``data.revoke``, ``data.compute``), and the keys the run holds.

Each ``args`` and each ok ``value`` is one typed record here, parsed strictly back from the
history (``DataFormatError`` names the field, never its value), so the checks read what the
client sent and learned without guessing at dict shapes.

Some records hold the client's plaintext: the dataset's marker and the results the client
expects (``DatasetArgs``), and the results it opened (``ComputeAnswer.result``). They belong
in the client's history, never on a host, and their ``repr`` leaves them out. The data key
and the identities' secret keys are never recorded: ``HeldKey`` lives in memory only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from kmnode.chaos.history import Operation

TokenState = Literal["issued", "consumed", "refused"]
#: Why the client sent a computation: one a grant of the run covers (it may still be refused:
#: uses run out, a revocation, an expiry), an operation the dataset allows but no grant of the
#: run covers, or one the dataset does not allow at all.
Intent = Literal["granted", "ungranted-op", "disallowed-op"]

R = TypeVar("R", bound="_Record")


class DataFormatError(ValueError):
    """A history entry that is not a well-formed data operation or answer."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def parse(cls: type[R], data: Any) -> R:
        """Strictly from a history entry; ``DataFormatError`` naming the field (no value)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the record"
            raise DataFormatError(f"{cls.__name__}: {where}: {first['msg']}") from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ExpectedResult(_Record):
    """What an operation must give over the run's dataset, computed by the client from its own
    plaintext: the parameters it sends and the result's canonical JSON text."""

    params: dict[str, JsonValue]
    result: str = Field(repr=False)


class DatasetArgs(_Record):
    """``data.register``: the dataset the run registered (fresh name per run)."""

    dataset: str
    privacy: Literal["low", "high"]
    ops: list[str]
    min_group_size: int
    digest_ct: str
    digest_pt: str
    #: A random value in every row: it must never appear on the host side in clear.
    marker: str = Field(repr=False)
    #: By operation: what the client expects (only operations the dataset allows).
    expected: dict[str, ExpectedResult] = Field(repr=False)


class RegisterAnswer(_Record):
    dataset: str
    owner: str


class GrantArgs(_Record):
    """``data.grant``: the owner grants ``user`` operations on the dataset."""

    dataset: str
    user: str
    ops: list[str]
    uses: int
    ttl: int


class GrantAnswer(_Record):
    """The answer to ``data.grant`` and ``data.revoke``."""

    grant: str
    state: Literal["active", "revoked"]
    uses_left: int


class RevokeArgs(_Record):
    grant: str


class ComputeArgs(_Record):
    """``data.compute``: ``user`` asks for ``op`` on the dataset, computed by ``node``."""

    dataset: str
    user: str
    op: str
    node: str
    intent: Intent


class ComputeAnswer(_Record):
    """What the client learned of a computation the cluster took (a token was issued)."""

    token: str
    grant: str
    state: TokenState
    reason: str = ""
    result_hash: str = ""
    #: The result the client opened (canonical JSON text), or None (not consumed, not opened).
    result: str | None = Field(default=None, repr=False)
    #: Why a consumed result was not opened (a wrong hash, a wrong key), or "".
    unopened: str = ""


@dataclass(frozen=True)
class HeldKey:
    """An identity's X25519 secret the run holds (to try on every result). Never recorded;
    ``repr`` shows the name only."""

    name: str
    box_secret: bytes = field(repr=False)
    #: A key made for the run under an existing name (it must open nothing).
    decoy: bool = False


@dataclass(frozen=True)
class DataOps:
    """The history's data operations, parsed: each with its operation."""

    registered: list[tuple[Operation, DatasetArgs]]
    grants: list[tuple[Operation, GrantArgs, GrantAnswer | None]]
    revokes: list[tuple[Operation, RevokeArgs, GrantAnswer | None]]
    computes: list[tuple[Operation, ComputeArgs, ComputeAnswer | None]]

    @property
    def datasets(self) -> Mapping[str, DatasetArgs]:
        return {args.dataset: args for _, args in self.registered}


def parse_data_ops(ops: Iterable[Operation]) -> DataOps:
    """The data operations among ``ops`` with their ok answers (registrations: only the ok
    ones). ``DataFormatError`` on a malformed entry."""
    found = DataOps([], [], [], [])
    for op in ops:
        ok = op.outcome == "ok"
        if op.kind == "data.register" and ok:
            RegisterAnswer.parse(op.value)
            found.registered.append((op, DatasetArgs.parse(op.args)))
        elif op.kind == "data.grant":
            grant = GrantAnswer.parse(op.value) if ok else None
            found.grants.append((op, GrantArgs.parse(op.args), grant))
        elif op.kind == "data.revoke":
            revoked = GrantAnswer.parse(op.value) if ok else None
            found.revokes.append((op, RevokeArgs.parse(op.args), revoked))
        elif op.kind == "data.compute":
            computed = ComputeAnswer.parse(op.value) if ok else None
            found.computes.append((op, ComputeArgs.parse(op.args), computed))
    return found


__all__ = [
    "ComputeAnswer",
    "ComputeArgs",
    "DataFormatError",
    "DataOps",
    "DatasetArgs",
    "ExpectedResult",
    "GrantAnswer",
    "GrantArgs",
    "HeldKey",
    "Intent",
    "RegisterAnswer",
    "RevokeArgs",
    "TokenState",
    "parse_data_ops",
]
