"""What the contract checks judge besides the history: the result records every node
published on MQTT during the run, and each node's execution view after healing.

Both come from the untrusted side (any host can publish anything on its topic, and a node's
API answers what its host forwards), so parsing is strict and never raises on garbage: a
malformed record is counted, not trusted; a view that cannot be read is kept as its error.
Nothing here is secret: records carry public fields and ciphertext, views carry roots.
Saved as ``contracts.json`` next to the history so a run can be re-checked offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kmnode.host.mqtt import TopicKind, parse_topic, unpack_records

#: The ``kind`` of a service enclave's record of one executed contract operation.
RESULT_KIND = "contract.result"

Roots = Mapping[str, str]  #: contract name -> state root (hex)


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """One node's published outcome of contract operation ``seq`` (a deploy names no
    function, caller or nonce)."""

    node: str
    seq: int
    contract: str
    function: str
    caller: str
    nonce: str
    status: str
    digest: str

    @property
    def outcome(self) -> tuple[str, str, str, str, str, str]:
        """What every node that executed operation ``seq`` must have published alike."""
        return (self.contract, self.function, self.caller, self.nonce, self.status, self.digest)

    def shown(self) -> str:
        return (
            f"{self.node}={self.contract}.{self.function or 'deploy'}/{self.status}/"
            + (self.digest[:12])
        )


_RECORD_STRINGS = ("contract", "function", "caller", "nonce", "status", "digest")


def parse_results(
    messages: Iterable[tuple[str, bytes]], prefix: str, cluster: str
) -> tuple[list[ResultRecord], int]:
    """The ``contract.result`` records among captured (topic, payload) messages of the
    cluster's service topics, and how many such records were malformed (and dropped)."""
    records: list[ResultRecord] = []
    malformed = 0
    for topic, payload in messages:
        where = parse_topic(topic, prefix, cluster)
        if where is None or where[1] is not TopicKind.SERVICE:
            continue
        for raw in unpack_records(payload):
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # not JSON: not a contract record (the service publishes others)
            if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
                continue
            record = _record(where[0], data)
            if record is None:
                malformed += 1
            else:
                records.append(record)
    return records, malformed


def _record(node: str, data: Mapping[str, Any]) -> ResultRecord | None:
    seq = data.get("seq")
    strings = [data.get(f) for f in _RECORD_STRINGS]
    if type(seq) is not int or seq < 1 or not all(isinstance(s, str) for s in strings):
        return None
    contract, function, caller, nonce, status, digest = (str(s) for s in strings)
    return ResultRecord(node, seq, contract, function, caller, nonce, status, digest)


@dataclass(frozen=True)
class NodeContracts:
    """One node's contract execution after the run (``GET /v1/node/contracts``)."""

    position: int = 0  #: the last operation its service enclave executed
    committed: int = 0  #: the last operation committed
    halted: str = ""  #: why it stopped executing, or ""
    #: The committed checkpoints this node's state holds: operation -> roots.
    committed_roots: Mapping[int, Roots] = field(default_factory=dict)
    #: The roots its service enclave computed at checkpoint operations.
    computed_roots: Mapping[int, Roots] = field(default_factory=dict)
    #: Why the view could not be read (then nothing else is known), or "".
    error: str = ""

    @classmethod
    def from_api(cls, view: Any) -> NodeContracts:
        """From the API's answer; a malformed answer becomes an ``error`` view."""
        try:
            service = view.get("service") or {}
            return cls(
                position=_int(view.get("position")),
                committed=_int(view.get("committed")),
                halted=str(view.get("halted") or ""),
                committed_roots=_checkpoints(view.get("checkpoints")),
                computed_roots=_checkpoints(service.get("checkpoints")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return cls(error=f"a malformed view: {type(exc).__name__}: {exc}")

    @classmethod
    def unreadable(cls, error: str) -> NodeContracts:
        return cls(error=error)

    @property
    def settled(self) -> bool:
        """Read, and either every committed operation executed or execution stopped."""
        return not self.error and (bool(self.halted) or self.position >= self.committed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("committed_roots", "computed_roots"):
            data[name] = [{"seq": s, "roots": dict(r)} for s, r in sorted(data[name].items())]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeContracts:
        return cls(
            position=int(data["position"]),
            committed=int(data["committed"]),
            halted=str(data["halted"]),
            committed_roots=_checkpoints(data["committed_roots"]),
            computed_roots=_checkpoints(data["computed_roots"]),
            error=str(data["error"]),
        )


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"not an integer: {type(value).__name__}")
    return value


def _checkpoints(items: Any) -> dict[int, Roots]:
    """``[{"seq", "roots": {contract: hex}}]`` (other fields ignored) as operation -> roots."""
    if not isinstance(items, list):
        raise ValueError("checkpoints: not a list")
    found: dict[int, Roots] = {}
    for item in items:
        roots = item["roots"]
        if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
            raise ValueError("roots: not a map of strings")
        found[_int(item["seq"])] = {str(k): v for k, v in roots.items()}
    return found


@dataclass(frozen=True)
class ContractEvidence:
    """Everything the contract checks read besides the history."""

    contract: str  #: the contract the workload deployed
    #: Calls of it the cluster committed (its contract record), None if no node said.
    committed_calls: int | None
    nodes: Mapping[str, NodeContracts]
    records: Sequence[ResultRecord]
    malformed_records: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "contract": self.contract,
            "committed_calls": self.committed_calls,
            "nodes": {n: v.to_json() for n, v in sorted(self.nodes.items())},
            "records": [asdict(r) for r in self.records],
            "malformed_records": self.malformed_records,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContractEvidence:
        calls = data["committed_calls"]
        return cls(
            contract=str(data["contract"]),
            committed_calls=None if calls is None else int(calls),
            nodes={str(n): NodeContracts.from_json(v) for n, v in data["nodes"].items()},
            records=[ResultRecord(**r) for r in data["records"]],
            malformed_records=int(data["malformed_records"]),
        )


__all__ = [
    "RESULT_KIND",
    "ContractEvidence",
    "NodeContracts",
    "ResultRecord",
    "parse_results",
]
