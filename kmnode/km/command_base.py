"""The building blocks every KM command module shares: field types, the command base model,
the signed-request stamp, refusals and results, and the canonical encoding.

Apart from ``kmnode.km.commands`` so that a family of commands can live in a module of its own
(``kmnode.km.data_commands``) and still be one of the commands ``commands.parse`` knows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
)

from kmnode.identity import IdentityName, Role

#: The largest command the state machine applies (larger ones are refused, not parsed).
MAX_COMMAND_BYTES = 64 * 1024
#: The deepest nesting of a command (deeper ones are refused before parsing: a proposal's
#: actions with a policy inside are about 5 levels deep).
MAX_COMMAND_DEPTH = 32

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Hex32 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


def _finite(value: JsonValue) -> JsonValue:
    """Refuse NaN and infinities anywhere in a JSON value (a NaN freshness bound would switch
    the check off: every comparison with it is false)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a number a command may hold")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


#: A policy as JSON: checked by ``attest.policy.Policy.from_dict`` (its rules, its messages).
PolicyJson = Annotated[dict[str, JsonValue], AfterValidator(_finite)]


class CommandRefused(Exception):
    """A command is malformed, or not acceptable in the current state. ``code`` is what the
    operator API reports (``replay`` for a request id that committed before)."""

    def __init__(self, message: str, code: RefusalCode = "refused") -> None:
        super().__init__(message)
        self.code: RefusalCode = code


RefusalCode = Literal["refused", "replay", "forbidden", "unknown_identity"]


class AuthStamp(BaseModel):
    """Who asked for a command: the identity whose signed request the leader's enclave
    verified, the request's id (``identity:nonce``, with ``/n`` when one request commits
    several commands) and when it was signed (Unix seconds). The state machine commits each id
    once, and checks the identity's roles again against the identities of that moment."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    by: IdentityName
    request: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    created: Annotated[int, Field(ge=0, lt=2**40)]


class CommandModel(BaseModel):
    """Every command: strict, frozen, no unknown fields, one canonical encoding."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: The role an operator needs to ask for this command; None: only nodes propose it.
    ROLE: ClassVar[Role | None] = None

    #: The signed request this command comes from; unset for what nodes propose themselves.
    auth: AuthStamp | None = None

    def encode(self) -> bytes:
        """The canonical bytes of this command (what is proposed and hashed)."""
        return canonical(self.model_dump(mode="json", exclude_none=True))


class EnclaveSigned(CommandModel):
    """A command a node's KM enclave made and signed with its ledger-signing key, whose quote
    binds that key: the state machine checks, when it applies it, that an enclave the policy
    allows on a member's platform made it (``KMState.check_enclave_proof``)."""

    public_key: Hex32
    quote: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    signature: Text


@dataclass(frozen=True, slots=True)
class Applied:
    """A command's result. ``public`` is what the operator API shows of it."""

    @property
    def ok(self) -> bool:
        return True

    def public(self) -> dict[str, JsonValue]:
        return {"ok": self.ok, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True, slots=True)
class Refused(Applied):
    """The command was refused (malformed, or not acceptable in the state it met): nothing
    changed but the chain."""

    error: str
    code: RefusalCode = "refused"

    @property
    def ok(self) -> bool:
        return False


def canonical(value: Any, *, allow_nan: bool = False) -> bytes:
    """Canonical JSON: the same value always encodes to the same bytes. ``allow_nan`` writes
    NaN and infinities (which a node never proposes, but a faulty member could commit)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=allow_nan).encode()
