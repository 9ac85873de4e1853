"""What the data checks judge besides the history: each node's committed data records after
healing, and the ``data.result`` records published on MQTT during the run.

From every node: the cluster's data keys (``GET /v1/data/keys``), the run's tokens and grants
(``GET /v1/data/tokens``, ``/v1/data/grants``), each token's canonical body and this node's
signature of it (``GET /v1/data/tokens/{t}``) and its revocation observation lag
(``GET /v1/node/data``). From MQTT: each computation's end as its platform's service enclave
wrote it, on the node's ``service/out`` topic and on the user's ``users/<user>/results``.

All of it comes from the untrusted side (a node's API answers what its host forwards; any
host can publish anything), so parsing is strict and never raises on garbage: a view that does
not parse is kept as its error, a malformed record is counted, not trusted. Nothing here is
secret: public records, signatures, and results sealed to their users. Saved as ``data.json``
next to the history so a run can be re-checked offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kmnode.host.mqtt import TopicKind, parse_topic, unpack_records

#: The ``kind`` of a service enclave's record of one computation's end.
RESULT_KIND = "data.result"
TERMINAL = ("consumed", "refused")


class _Api(BaseModel):
    """A record as a node's API gives it: strict types, fields it adds later ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class DataKeys(_Api):
    wrap_key: str
    token_key: str
    input_key: str


class TokenRecord(_Api):
    """A committed token as one node holds it (``Token.public()``)."""

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
    state: str
    result_hash: str = ""
    reason: str = ""
    finished_index: int = 0

    @property
    def end(self) -> tuple[str, str, str, int]:
        """How it ended, as every node must record it alike."""
        return (self.state, self.result_hash, self.reason, self.finished_index)


class GrantRecord(_Api):
    id: str
    dataset: str
    user: str
    ops: list[str]
    uses: int
    uses_left: int
    expires_at: int
    index: int
    request: str = ""
    revoked_index: int = 0


class SignedToken(_Api):
    """A token's canonical bytes (text) and one node's Ed25519 signature of them (hex)."""

    body: str
    signature: str


class NodeData(_Api):
    """One node's data records after the run (only the run's datasets)."""

    keys: DataKeys | None = None
    tokens: dict[str, TokenRecord] = Field(default_factory=dict)
    grants: dict[str, GrantRecord] = Field(default_factory=dict)
    signed: dict[str, SignedToken] = Field(default_factory=dict)
    #: The slowest revocation observation its service enclave had (ms), as the node says.
    revocation_lag_ms: float = 0.0
    #: Why the view could not be read (then nothing else is known), or "".
    error: str = ""

    @classmethod
    def from_api(
        cls,
        keys: Any,
        tokens: Any,
        grants: Any,
        signed: Mapping[str, Any],
        status: Any,
    ) -> NodeData:
        """From the answers of the routes in the module docstring; a malformed answer makes
        an ``error`` view (naming the field, never a value)."""
        try:
            token_list = [TokenRecord.model_validate(t) for t in _items(tokens, "tokens")]
            grant_list = [GrantRecord.model_validate(g) for g in _items(grants, "grants")]
            lag = status.get("revocation_lag", {}).get("max_ms", 0.0)
            return cls(
                keys=DataKeys.model_validate(keys),
                tokens={t.id: t for t in token_list},
                grants={g.id: g for g in grant_list},
                signed={k: SignedToken.model_validate(v) for k, v in signed.items()},
                revocation_lag_ms=float(lag) if isinstance(lag, int | float) else 0.0,
            )
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            return cls(error=f"a malformed answer: {where}: {first['msg']}")
        except (AttributeError, TypeError, ValueError) as exc:
            return cls(error=f"a malformed answer: {type(exc).__name__}")

    @classmethod
    def unreadable(cls, error: str) -> NodeData:
        return cls(error=error)

    @property
    def settled(self) -> bool:
        """Read, and every token it holds has ended."""
        return not self.error and all(t.state in TERMINAL for t in self.tokens.values())


def _items(answer: Any, name: str) -> list[Any]:
    items = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise TypeError(f"{name}: not a list")
    return items


class ResultRecord(_Api):
    """One ``data.result`` record captured on MQTT: where it was published (a node's service
    topic, or a user's results topic) and what it says."""

    topic: Literal["service", "user"]
    #: The node whose service topic carried it, or the user whose results topic did.
    source: str
    token: str
    user: str
    dataset: str
    op: str
    status: str
    reason: str = ""
    sealed: str = ""
    result_hash: str = ""

    def shown(self) -> str:
        return f"{self.topic}:{self.source} {self.token}/{self.status}/{self.result_hash[:12]}"


def user_results_filter(prefix: str, cluster: str) -> str:
    """The subscription filter of every data user's results topic."""
    return f"{prefix}/{cluster}/users/+/results"


def parse_results(
    messages: Iterable[tuple[str, bytes]], prefix: str, cluster: str
) -> tuple[list[ResultRecord], int]:
    """The ``data.result`` records among captured (topic, payload) messages of the cluster's
    service topics and users' results topics, and how many such records were malformed."""
    records: list[ResultRecord] = []
    malformed = 0
    users_head = f"{prefix}/{cluster}/users/"
    for topic, payload in messages:
        where = _where(topic, prefix, cluster, users_head)
        if where is None:
            continue
        for raw in unpack_records(payload):
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # not JSON: not a data record (the service publishes others)
            if not isinstance(data, dict) or data.get("kind") != RESULT_KIND:
                continue
            fields = {k: v for k, v in data.items() if k != "kind"}
            try:
                records.append(ResultRecord.model_validate({**fields, **where}))
            except ValidationError:
                malformed += 1
    return records, malformed


def _where(topic: str, prefix: str, cluster: str, users_head: str) -> dict[str, str] | None:
    if topic.startswith(users_head):
        user, _, suffix = topic[len(users_head) :].partition("/")
        return {"topic": "user", "source": user} if user and suffix == "results" else None
    parsed = parse_topic(topic, prefix, cluster)
    if parsed is None or parsed[1] is not TopicKind.SERVICE:
        return None
    return {"topic": "service", "source": parsed[0]}


class DataEvidence(BaseModel):
    """Everything the data checks read besides the history."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    datasets: list[str]
    nodes: dict[str, NodeData]
    records: list[ResultRecord]
    malformed_records: int = 0

    def readable(self) -> dict[str, NodeData]:
        """The nodes whose view was read."""
        return {n: v for n, v in sorted(self.nodes.items()) if not v.error}

    def tokens(self) -> dict[str, TokenRecord]:
        """Every token any readable node holds (the first node's copy, by name)."""
        found: dict[str, TokenRecord] = {}
        for view in self.readable().values():
            for token_id, token in view.tokens.items():
                found.setdefault(token_id, token)
        return found

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any) -> DataEvidence:
        return cls.model_validate(data)


__all__ = [
    "RESULT_KIND",
    "TERMINAL",
    "DataEvidence",
    "DataKeys",
    "GrantRecord",
    "NodeData",
    "ResultRecord",
    "SignedToken",
    "TokenRecord",
    "parse_results",
    "user_results_filter",
]
