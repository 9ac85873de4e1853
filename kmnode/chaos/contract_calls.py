"""The contract workload's calls and answers as the history records them, and the client's
half of the crypto (sealing arguments, opening results).

A call of the token contract (``examples/contracts/token.wat``) takes an amount (u64, little
endian) and/or an account name; ``ContractCall`` keeps them apart (readable in the history)
and ``args_bytes`` joins them exactly as the contract reads them, so the checker's reference
replay sends the very bytes the client sealed. ``CallAnswer`` is what the client learned:
the operation's sequence number and, once executed, the keyed digest and the result report it
opened (``None`` while ``pending``, or if the result did not open: then ``unopened`` says
why, which the reference check counts as a wrong answer).

The sealing mirrors what ``kmctl contracts call`` does (the CLI layer sits above this one,
and the service enclave's side is ``kmnode.service.contracts``): the arguments, the caller,
the nonce and a fresh reply key are sealed to the cluster's contract-input key, so only a
service enclave opens them and only under this very call; the result comes back encrypted
under the reply key (first byte 1), or boxed to the caller's X25519 key (first byte 2) when
the arguments did not open. The reply key stays in the client's memory: never recorded.

Both records hold the client's plaintext (its arguments, its results): they belong in the
client's history, never on a host. ``repr`` of a call shows neither amount nor account.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import wasmtime

from kmnode.contracts.envelope import EnvelopeError, open_result, seal_call

#: The token contract the workload deploys (the repository's example; see its header).
TOKEN_WAT = Path(__file__).resolve().parents[2] / "examples" / "contracts" / "token.wat"
TOKEN_FUNCTIONS = ("init", "mint", "transfer", "balance")
#: A call's fuel: far above what a token call needs (a few thousand), so none runs out.
CALL_FUEL = 1_000_000

AnswerStatus = Literal["ok", "reverted", "trapped", "refused", "pending"]
_ANSWER_STATUSES: frozenset[str] = frozenset(get_args(AnswerStatus))


class CallFormatError(ValueError):
    """A history entry that is not a well-formed contract call or answer."""


def token_wasm(path: Path = TOKEN_WAT) -> bytes:
    """The token contract's WebAssembly, compiled from its .wat."""
    return bytes(wasmtime.wat2wasm(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class ContractCall:
    """One call the client made: to what, as whom, with which nonce and arguments."""

    contract: str
    function: str
    caller: str
    nonce: str
    fuel: int = CALL_FUEL
    amount: int | None = None  #: u64, the first 8 argument bytes (mint, transfer)
    account: str | None = None  #: the account name after it (mint, transfer, balance)

    def __repr__(self) -> str:  # amounts and accounts are the caller's, not for logs
        return f"ContractCall({self.contract}.{self.function}, nonce={self.nonce})"

    def args_bytes(self) -> bytes:
        """The argument bytes the contract reads: the amount, then the account name."""
        out = b"" if self.amount is None else self.amount.to_bytes(8, "little")
        return out + (b"" if self.account is None else self.account.encode())

    def to_args(self) -> dict[str, Any]:
        """The history's ``args`` (JSON)."""
        return {
            "contract": self.contract,
            "function": self.function,
            "caller": self.caller,
            "nonce": self.nonce,
            "fuel": self.fuel,
            "amount": self.amount,
            "account": self.account,
        }

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ContractCall:
        """Strictly from a history entry's ``args``; ``CallFormatError`` naming the field."""
        strings = {f: args.get(f) for f in ("contract", "function", "caller", "nonce")}
        for name, value in strings.items():
            if not isinstance(value, str) or not value:
                raise CallFormatError(f"{name}: a non-empty string, not {value!r}")
        fuel, amount, account = args.get("fuel"), args.get("amount"), args.get("account")
        if type(fuel) is not int or fuel < 1:
            raise CallFormatError(f"fuel: a positive integer, not {fuel!r}")
        if amount is not None and (type(amount) is not int or not 0 <= amount < 2**64):
            raise CallFormatError("amount: a u64 or null")
        if account is not None and not isinstance(account, str):
            raise CallFormatError("account: a string or null")
        return cls(
            str(strings["contract"]),
            str(strings["function"]),
            str(strings["caller"]),
            str(strings["nonce"]),
            fuel,
            amount,
            account,
        )


@dataclass(frozen=True)
class CallAnswer:
    """What the client learned from a call the cluster committed (an ``ok`` in the history)."""

    seq: int
    status: AnswerStatus
    digest: str = ""
    #: The result report the client opened (status, code, fuel_used, result, events, error,
    #: seq, contract, function, as the service enclave sealed it).
    report: Mapping[str, Any] | None = None
    #: Why a result that came back did not open (a wrong answer), or "".
    unopened: str = ""

    def __repr__(self) -> str:
        return f"CallAnswer(seq={self.seq}, {self.status})"

    def to_value(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "status": self.status,
            "digest": self.digest,
            "report": None if self.report is None else dict(self.report),
            "unopened": self.unopened,
        }

    @classmethod
    def from_value(cls, value: Any) -> CallAnswer:
        if not isinstance(value, Mapping):
            raise CallFormatError(f"an answer is an object, not {type(value).__name__}")
        seq, status, digest = value.get("seq"), value.get("status"), value.get("digest", "")
        report, unopened = value.get("report"), value.get("unopened", "")
        if type(seq) is not int or seq < 1:
            raise CallFormatError(f"seq: a positive integer, not {seq!r}")
        if status not in _ANSWER_STATUSES:
            raise CallFormatError(f"status: one of {sorted(_ANSWER_STATUSES)}, not {status!r}")
        if not isinstance(digest, str) or not isinstance(unopened, str):
            raise CallFormatError("digest and unopened: strings")
        if report is not None and not isinstance(report, Mapping):
            raise CallFormatError("report: an object or null")
        return cls(seq, status, digest, report, unopened)


def seal_args(input_key: bytes, call: ContractCall, reply_key: bytes) -> str:
    """The call's arguments as the cluster takes them (``envelope.seal_call``)."""
    return seal_call(input_key, call.caller, call.nonce, call.args_bytes(), reply_key)


def open_report(box_secret: bytes, sealed_b64: str, reply_key: bytes) -> dict[str, Any]:
    """A sealed result opened (``envelope.open_result``); ``CallFormatError`` if it does not
    open or is not a JSON object (the message names no plaintext)."""
    try:
        return open_result(box_secret, sealed_b64, reply_key)
    except EnvelopeError as exc:
        raise CallFormatError(str(exc)) from None


__all__ = [
    "CALL_FUEL",
    "TOKEN_FUNCTIONS",
    "TOKEN_WAT",
    "AnswerStatus",
    "CallAnswer",
    "CallFormatError",
    "ContractCall",
    "open_report",
    "seal_args",
    "token_wasm",
]
