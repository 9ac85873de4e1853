"""The data workload of `kmctl chaos run`: a dataset registered once per run, grants on it, and
a share of computations, new grants and revocations mixed into the clients' operations.

Why a fresh dataset per run: its tokens and grants are this run's only, so the checker can
account for every use. Why a marker: every row of the dataset carries a random value that
must never reach a host in clear (the plaintext scan looks for it, and for the data key and
the results' values). The run's identity is both the owner and the user (the development
identity holds every role), so it grants itself, computes, and is the only one whose key may
open a result; every other identity key the run holds must not.

What the clients do (``next_op``): mostly computations, of operations a grant of the run
covers (which may still be refused: uses run out, a revocation, a short grant's expiry), of an
operation the dataset allows but no grant covers, and of one the dataset does not allow (raw
rows of a high-privacy dataset); then new grants with a few uses, and revocations of the
run's grants. A computation is sent to its platform node (the node contacted computes it), so
a node whose host tampered with the blob is asked too. The client opens each result it gets
with its own key, after checking its hash against the committed one, and records the value.

After the run, ``collect`` waits (bounded) until every node holds the same tokens, each ended,
and until the consumed ones' records reached the MQTT capture; then reads what the data checks
need (``DataEvidence``).
"""

from __future__ import annotations

import random
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import JsonValue

from kmnode.chaos.data_calls import (
    ComputeAnswer,
    ComputeArgs,
    DatasetArgs,
    ExpectedResult,
    GrantAnswer,
    GrantArgs,
    HeldKey,
    Intent,
    RegisterAnswer,
    RevokeArgs,
)
from kmnode.chaos.data_evidence import (
    DataEvidence,
    NodeData,
    ResultRecord,
    parse_results,
)
from kmnode.chaos.history import HistoryRecorder
from kmnode.client import NodeClient, upload_blob
from kmnode.config import ClusterConfig
from kmnode.dataauth.blob import new_dek, seal_dataset
from kmnode.dataauth.client_side import (
    ResultError,
    compute_body,
    open_result,
    registration_body,
)
from kmnode.dataauth.ops import Limits, canonical_json, run_op
from kmnode.dataauth.table import parse_table
from kmnode.errors import EXIT_FAILURE, KmsimError
from kmnode.identity import IdentityError, IdentityKeys
from kmnode.service.data_jobs import MAX_RESULT_BYTES

#: Operations the run's grants cover.
GRANTED_OPS = ("mean", "sum", "count")
#: An operation the dataset allows but no grant of the run covers: refused at the token.
UNGRANTED_OP = "threshold_count"
#: One a high-privacy dataset never allows (raw rows): refused at the token.
DISALLOWED_OP = "export"
DATASET_OPS = (*GRANTED_OPS, UNGRANTED_OP)
PARAMS: Mapping[str, dict[str, JsonValue]] = {
    "mean": {"column": "salary"},
    "sum": {"column": "salary"},
    "count": {},
    "threshold_count": {"column": "salary", "threshold": 5e8},
    "export": {},
}
ROWS = 40
MIN_GROUP = 5
#: The grants made at setup: (operations, uses).
INITIAL_GRANTS: tuple[tuple[tuple[str, ...], int], ...] = ((("mean", "sum"), 6), (("count",), 2))
#: Seconds a computation waits for its platform's result (then it is answered ``issued``).
COMPUTE_WAIT = 5.0
REQUEST_SLACK = 5.0
#: A grant's lifetime in the state's clock: long, or short enough to expire within the run.
LONG_TTL, SHORT_TTL = 600, 2
#: Seconds to wait for consumed tokens' records to reach the capture.
RECORDS_WAIT = 10.0
_POLL = 0.2

DataKind = Literal["data.grant", "data.revoke", "data.compute"]
DataArgs = GrantArgs | RevokeArgs | ComputeArgs


def dataset_text(marker: str, rng: random.Random, rows: int = ROWS) -> bytes:
    """A small CSV whose every row carries ``marker``; salaries are 9-digit numbers, so the
    mean and the sum are distinctive texts too."""
    lines = [f"{i},{rng.randrange(10**8, 10**9)},{marker}\n" for i in range(rows)]
    return ("id,salary,tag\n" + "".join(lines)).encode()


class DataWorkload:
    """One run's dataset, its grants and the data operations made of it."""

    def __init__(self, cfg: ClusterConfig, signer: IdentityKeys, seed: int) -> None:
        self.cfg, self.signer = cfg, signer
        self.names = [n.name for n in cfg.nodes]
        self.dataset = f"chaos{seed % 10**6}-{time.time_ns() % 10**9:09d}"
        self.marker = f"mk{secrets.token_hex(8)}"
        self._plaintext = dataset_text(self.marker, random.Random(secrets.randbits(64)))
        self._dek = new_dek()
        self.sealed = seal_dataset(self.dataset, self._plaintext, self._dek)
        table = parse_table(self._plaintext)
        limits = Limits(min_group_size=MIN_GROUP, max_result_bytes=MAX_RESULT_BYTES)
        self.expected = {
            op: ExpectedResult(
                params=PARAMS[op],
                result=run_op(op, table, PARAMS[op], "high", limits).decode(),
            )
            for op in DATASET_OPS
        }
        self._input_key = b""
        self._lock = threading.Lock()
        #: The run's grants not yet revoked (as far as this client knows).
        self._grants: list[str] = []

    def __repr__(self) -> str:
        return f"DataWorkload({self.dataset}, {len(self._grants)} grants)"

    @property
    def blob(self) -> tuple[str, bytes]:
        """The dataset's blob (digest, ciphertext): what a host may tamper with."""
        return self.sealed.digest_ct, self.sealed.ciphertext

    def secrets(self) -> list[bytes]:
        """Secrets the plaintext scan looks for that the history never holds: the data key and
        the whole plaintext."""
        return [self._dek, self._plaintext]

    def keyring(self) -> list[HeldKey]:
        """Every identity key the run holds: its own, every key file in the cluster's state
        directory, and a decoy made now under its own name."""
        keys = [HeldKey(self.signer.name, self.signer.box_secret)]
        for path in sorted((self.cfg.state_dir / "identities").glob("*.key")):
            try:
                loaded = IdentityKeys.load(path)
            except IdentityError:
                continue
            if loaded.box_secret != self.signer.box_secret:
                keys.append(HeldKey(loaded.name, loaded.box_secret))
        decoy = IdentityKeys.generate(self.signer.name)
        return [*keys, HeldKey(decoy.name, decoy.box_secret, decoy=True)]

    def _client(self, node: str, timeout: float = COMPUTE_WAIT + REQUEST_SLACK) -> NodeClient:
        return NodeClient.for_node(self.cfg.node(node), timeout, self.signer)

    # --- before the clients start -------------------------------------------------------------

    def setup(self, recorder: HistoryRecorder) -> None:
        """Put the blob on every node's host, register the dataset and make the initial
        grants, each recorded in the history; the client's error if any is refused."""
        node = self.names[0]
        client = self._client(node)
        keys = client.get("/v1/data/keys")
        self._input_key = bytes.fromhex(keys["input_key"])
        digest, ciphertext = self.blob
        for spec in self.cfg.nodes:
            upload_blob(spec, digest, ciphertext)
        args = DatasetArgs(
            dataset=self.dataset,
            privacy="high",
            ops=list(DATASET_OPS),
            min_group_size=MIN_GROUP,
            digest_ct=digest,
            digest_pt=self.sealed.digest_pt,
            marker=self.marker,
            expected=self.expected,
        )
        with recorder.invoke("setup", "data.register", args.to_json(), node) as handle:
            body = registration_body(
                self.dataset,
                self.sealed,
                self._dek,
                keys["wrap_key"],
                privacy=args.privacy,
                ops=args.ops,
                min_group_size=MIN_GROUP,
            )
            answer = client.post("/v1/datasets", body)
            handle.ok(RegisterAnswer(dataset=answer["dataset"], owner=answer["owner"]).to_json())
        for ops, uses in INITIAL_GRANTS:
            grant = GrantArgs(
                dataset=self.dataset, user=self.signer.name, ops=list(ops), uses=uses, ttl=LONG_TTL
            )
            with recorder.invoke("setup", "data.grant", grant.to_json(), node) as handle:
                told = self.perform(client, grant)
                handle.ok(told.to_json())

    # --- the clients' operations --------------------------------------------------------------

    def next_op(self, rng: random.Random, node: str) -> tuple[DataKind, DataArgs]:
        """A seeded choice: mostly a computation on ``node``, else a new grant or a
        revocation of one of the run's grants (a computation while there is none)."""
        kind = rng.choices(["compute", "grant", "revoke"], weights=[13, 4, 2])[0]
        if kind == "revoke":
            with self._lock:  # taken off the list: revoked once (a retry would be refused)
                grant_id = (
                    self._grants.pop(rng.randrange(len(self._grants))) if self._grants else ""
                )
            if grant_id:
                return "data.revoke", RevokeArgs(grant=grant_id)
        if kind == "grant":
            ops = sorted(rng.sample(GRANTED_OPS, rng.randint(1, len(GRANTED_OPS))))
            ttl = SHORT_TTL if rng.random() < 0.15 else LONG_TTL
            grant = GrantArgs(
                dataset=self.dataset,
                user=self.signer.name,
                ops=ops,
                uses=rng.randint(1, 4),
                ttl=ttl,
            )
            return "data.grant", grant
        intents: list[Intent] = ["granted", "ungranted-op", "disallowed-op"]
        intent = rng.choices(intents, weights=[16, 2, 1])[0]
        by_intent = {"granted": rng.choice(GRANTED_OPS), "ungranted-op": UNGRANTED_OP}
        op = by_intent.get(intent, DISALLOWED_OP)
        compute = ComputeArgs(
            dataset=self.dataset, user=self.signer.name, op=op, node=node, intent=intent
        )
        return "data.compute", compute

    def perform(self, client: NodeClient, args: DataArgs) -> GrantAnswer | ComputeAnswer:
        """Send ``args`` through ``client``. The client's errors escape (the runner classifies
        them); an answer that is not one raises ``KmsimError``."""
        try:
            if isinstance(args, ComputeArgs):
                return self._compute(client, args)
            if isinstance(args, GrantArgs):
                body = {"user": args.user, "ops": args.ops, "uses": args.uses, "ttl": args.ttl}
                path = f"/v1/datasets/{_q(args.dataset)}/grants"
                told = _grant_answer(client.post(path, body))
                with self._lock:
                    self._grants.append(told.grant)
                return told
            return _grant_answer(client.post(f"/v1/data/grants/{_q(args.grant)}/revoke", {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise KmsimError(f"a malformed answer: {type(exc).__name__}", EXIT_FAILURE) from None

    def _compute(self, client: NodeClient, args: ComputeArgs) -> ComputeAnswer:
        body = compute_body(self._input_key, args.user, args.op, PARAMS[args.op])
        body.update(node=args.node, timeout=COMPUTE_WAIT)
        path = f"/v1/datasets/{_q(args.dataset)}/computations"
        answer = client.request("POST", path, body, timeout=COMPUTE_WAIT + REQUEST_SLACK)
        told = ComputeAnswer.parse(
            {
                "token": answer["id"],
                "grant": answer["grant"],
                "state": answer["state"],
                "reason": answer.get("reason") or "",
                "result_hash": answer.get("result_hash") or "",
            }
        )
        if told.state != "consumed":
            return told
        sealed = answer.get("sealed") or self._fetch_result(args.node, told.token)
        if not sealed:
            return told  # its platform keeps it no more (a restart): MQTT carried it
        try:
            result = open_result(str(sealed), told.result_hash, self.signer.box_secret)
        except ResultError as exc:
            return told.model_copy(update={"unopened": str(exc)})
        return told.model_copy(update={"result": canonical_json(result).decode()})

    def _fetch_result(self, node: str, token: str) -> str:
        """A consumed token's sealed result from its platform node ("" if it has none): the
        answer came from another node (the leader) than the one that computed."""
        try:
            answer = self._client(node).get(f"/v1/data/tokens/{_q(token)}/result")
        except KmsimError:
            return ""
        sealed = answer.get("sealed") if isinstance(answer, dict) else None
        return sealed if isinstance(sealed, str) else ""

    # --- after the run ------------------------------------------------------------------------

    def collect(
        self, messages: Callable[[], Sequence[tuple[str, bytes]]], timeout: float
    ) -> DataEvidence:
        """Wait (at most ``timeout`` seconds) until every node holds the same tokens, each
        ended, then (at most ``RECORDS_WAIT``) until each consumed token's record was
        captured; then the evidence, with each token's signed body from every node."""
        deadline = time.monotonic() + timeout
        views = self._views(signed=False)
        for _ in range(int(timeout / _POLL) + 1):
            if _settled(views) or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
            views = self._views(signed=False)
        prefix, cluster = self.cfg.mqtt.topic_prefix, self.cfg.cluster
        records, malformed = parse_results(list(messages()), prefix, cluster)
        deadline = time.monotonic() + RECORDS_WAIT
        for _ in range(int(RECORDS_WAIT / _POLL) + 1):
            if _published(views, records) or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
            records, malformed = parse_results(list(messages()), prefix, cluster)
        return DataEvidence(
            datasets=[self.dataset],
            nodes=self._views(signed=True),
            records=records,
            malformed_records=malformed,
        )

    def _views(self, signed: bool) -> dict[str, NodeData]:
        return {name: self._view(name, signed) for name in self.names}

    def _view(self, name: str, signed: bool) -> NodeData:
        client = self._client(name)
        only = {"dataset": self.dataset}
        try:
            keys = client.get("/v1/data/keys")
            tokens = client.get("/v1/data/tokens", only)
            grants = client.get("/v1/data/grants", only)
            bodies = (
                {t: client.get(f"/v1/data/tokens/{_q(t)}") for t in _ids(tokens)} if signed else {}
            )
        except KmsimError as exc:
            return NodeData.unreadable(exc.message)
        try:
            status = client.get("/v1/node/data")  # auditors only: the lag is a bonus
        except KmsimError:
            status = {}
        return NodeData.from_api(keys, tokens, grants, bodies, status)


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _grant_answer(answer: Any) -> GrantAnswer:
    return GrantAnswer.parse(
        {"grant": answer["grant"], "state": answer["state"], "uses_left": answer["uses_left"]}
    )


def _ids(tokens: Any) -> list[str]:
    items = tokens.get("tokens") if isinstance(tokens, dict) else None
    if not isinstance(items, list):
        return []
    return [t["id"] for t in items if isinstance(t, dict) and isinstance(t.get("id"), str)]


def _settled(views: Mapping[str, NodeData]) -> bool:
    """Every node read, every token ended, every node holding the same ends."""
    if not all(v.settled for v in views.values()):
        return False
    ends = [{t: r.end for t, r in v.tokens.items()} for v in views.values()]
    return all(e == ends[0] for e in ends)


def _published(views: Mapping[str, NodeData], records: Sequence[ResultRecord]) -> bool:
    """Every consumed token's record reached the capture from its platform."""
    seen = {(r.source, r.token) for r in records if r.topic == "service"}
    return all(
        (t.node, t.id) in seen
        for v in views.values()
        if not v.error
        for t in v.tokens.values()
        if t.state == "consumed"
    )


__all__ = [
    "COMPUTE_WAIT",
    "DATASET_OPS",
    "DISALLOWED_OP",
    "GRANTED_OPS",
    "UNGRANTED_OP",
    "DataWorkload",
    "dataset_text",
]
