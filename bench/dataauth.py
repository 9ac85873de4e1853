"""Data authorization end to end on 3 real nodes (issue 15): how fast the replicated contract
issues tokens, and how long a compute on a 1 MiB dataset takes to reach its user through MQTT.

Why this benchmark: a token is an authentication transaction (a signed request checked by the
leader's KM enclave, a Raft commit with a durable append on the leader and a follower, the
grant's check and the token signed on apply), and a computation adds the release to the
platform's service enclave, the blob's read and checks, the operation, the sealing to the user
and the ring and MQTT hops. Only real processes show what those cost together.

What it does: starts a 3-node cluster as ``kmctl up`` does (``bench.contracts_cluster.running``:
free ports on 127.0.0.1, a temporary state directory, ``raft.fsync`` on, the cluster's
defaults) whose genesis identities are an owner (also the admin) and a few data users. The
owner registers a tiny dataset (for tokens: its computations cost the platform little) and a
1 MiB one (~25,000 CSV rows), as ``kmctl data register`` does: sealed here, blob to every
host, digests and the wrapped data key to the ledger; then grants each user enough uses.

1. Token issue: computations (``count``) sent with ``"timeout": 0``, so the API answers once
   the token is committed, not once it is computed (the bench counts the answers whose token
   was still ``issued``: that shows whether the API did answer at once). One at a time: p50
   and p99 of the latency at the API. With ``--clients`` keep-alive connections in flight:
   tokens issued per second, and the client's CPU meanwhile. Each request is sealed and
   signed as ``kmctl data compute`` makes it, but before its phase (the client shares two
   cores with 3 nodes x 3 processes), so the phase sends prepared bytes.
2. Compute to the user: a ``mean`` over the 1 MiB dataset; the user subscribes (aiomqtt) to
   ``{prefix}/{cluster}/users/<user>/results``; the time from sending the compute to its
   sealed result arriving on MQTT and opening with the user's key (its hash checked against
   the one the record carries), one at a time.

    python -m bench.dataauth                    # 500 one at a time, 5,000 at 64 in flight, 30
    python -m bench.dataauth --quick            # a smoke run (tiny counts)
    python -m bench.dataauth --single 1000 --many 10000 --clients 64 --computes 50
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from bench.contracts_cluster import (
    DRAIN_POLL_S,
    DRAIN_TIMEOUT,
    REQUEST_TIMEOUT,
    Cast,
    Connection,
    client_cpu_s,
    http_request,
    running,
)
from bench.release import find_leader, machine, pct, verdict
from kmnode.client import NodeClient, upload_blob
from kmnode.config import ClusterConfig, NodeSpec
from kmnode.contracts.envelope import seal_call
from kmnode.dataauth.blob import new_dek, seal_dataset
from kmnode.dataauth.ops import canonical_json, params_digest
from kmnode.host.broker import broker_address
from kmnode.identity import IdentityKeys, PublicIdentity

GOAL_P50_MS = 5.0
GOAL_P99_MS = 25.0
GOAL_TOKENS_PER_S = 1_000.0
GOAL_COMPUTE_P50_MS = 50.0

SMALL = "tokens"
LARGE = "salaries"
#: The large dataset: ~1 MiB of CSV in this many rows.
LARGE_ROWS = 25_000
LARGE_BYTES = 1 << 20
#: How long a run may wait for one result on MQTT before it counts as lost.
RESULT_TIMEOUT = 30.0
MEAN_PARAMS: dict[str, object] = {"column": "salary"}
COUNT_PARAMS: dict[str, object] = {}


@dataclass(frozen=True)
class DataCast(Cast):
    """The cast of ``bench.contracts_cluster`` with an owner: its operator (who starts the
    cluster as admin) also holds the owner role, and registers and grants."""

    def identities(self) -> list[PublicIdentity]:
        owner = self.operator.public(["admin", "operator", "auditor", "owner"])
        return [owner, *(u.public(["user"]) for u in self.users)]


# --- the data ----------------------------------------------------------------------------------


def table_csv(rows: int, size: int | None = None) -> bytes:
    """A CSV table of ``rows`` rows (id, salary, dept, note); with ``size``, the note pads it
    to about that many bytes (a realistic row width, not one huge cell)."""
    header = b"id,salary,dept,note\n"
    pad = 0
    if size is not None:
        plain = sum(len(f"{i},{30_000 + i % 9_000},d{i % 7},\n") for i in range(rows))
        pad = max(0, -(-(size - len(header) - plain) // max(1, rows)))  # rounded up
    note = "n" * pad
    body = "".join(f"{i},{30_000 + i % 9_000},d{i % 7},{note}\n" for i in range(rows))
    return header + body.encode()


def register(
    cfg: ClusterConfig, owner: NodeClient, name: str, plaintext: bytes, ops: list[str]
) -> None:
    """What ``kmctl data register`` does: seal here, the blob to every host, then register."""
    keys = owner.get("/v1/data/keys")
    dek = new_dek()
    sealed = seal_dataset(name, plaintext, dek)
    for node in cfg.nodes:
        upload_blob(node, sealed.digest_ct, sealed.ciphertext)
    wrapped = SealedBox(PublicKey(bytes.fromhex(keys["wrap_key"]))).encrypt(dek)
    owner.post(
        "/v1/datasets",
        {
            "name": name,
            "digest_ct": sealed.digest_ct,
            "digest_pt": sealed.digest_pt,
            "size": sealed.size,
            "privacy": "high",
            "ops": ops,
            "wrapped_key": base64.b64encode(bytes(wrapped)).decode(),
        },
    )


def grant(owner: NodeClient, dataset: str, user: str, ops: list[str], uses: int) -> None:
    owner.post(
        f"/v1/datasets/{dataset}/grants", {"user": user, "ops": ops, "uses": uses, "ttl": 3600}
    )


def compute_path(dataset: str) -> str:
    return f"/v1/datasets/{dataset}/computations"


def compute_request(
    leader: NodeSpec, input_key: bytes, user: IdentityKeys, dataset: str, op: str,
    params: Mapping[str, object],
) -> bytes:  # fmt: skip
    """One computation's HTTP request as ``kmctl data compute`` makes it (parameters sealed
    to the input key, their digest in the clear), signed as ``user``, ``"timeout": 0``."""
    nonce = secrets.token_hex(16)
    body = {
        "operation": op,
        "params": params_digest(params),
        "sealed": seal_call(input_key, user.name, nonce, canonical_json(params)),
        "nonce": nonce,
        "timeout": 0,
    }
    path = compute_path(dataset)
    return http_request(leader, "POST", path, json.dumps(body).encode(), user)


def token_requests(
    leader: NodeSpec, input_key: bytes, users: Sequence[IdentityKeys], count: int
) -> list[bytes]:
    """``count`` prepared ``count`` computations on the small dataset, users in turn."""
    return [
        compute_request(leader, input_key, users[i % len(users)], SMALL, "count", COUNT_PARAMS)
        for i in range(count)
    ]


# --- 1. token issue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """One phase of token issue: latencies of the answers, how many tokens were issued (the
    answer carried one), how many of those were answered while still ``issued`` (the API did
    not wait for the computation), the refusals and errors by kind, the wall time and the
    client's CPU over the phase."""

    latencies_ms: list[float]
    tokens: int
    answered_before_compute: int
    not_ok: dict[str, int]
    elapsed_s: float
    client_cpu_s: float

    @property
    def per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def issue(leader: NodeSpec, raws: Sequence[bytes], clients: int) -> Issued:
    """Send ``raws`` over ``clients`` keep-alive connections (each sends its next request when
    its last is answered) and tally the answers."""
    latencies: list[float] = []
    not_ok: dict[str, int] = {}
    tokens = before = 0
    pending = iter(raws)

    async def client() -> None:
        nonlocal tokens, before
        conn = await Connection.open(leader)
        try:
            for raw in pending:
                sent = time.perf_counter()
                code, body = await asyncio.wait_for(conn.exchange(raw), REQUEST_TIMEOUT)
                latencies.append((time.perf_counter() - sent) * 1000)
                if code == 200 and isinstance(body, dict) and "id" in body:
                    tokens += 1
                    before += body.get("state") == "issued"
                else:
                    kind = f"{code} {body.get('code', '') if isinstance(body, dict) else ''}"
                    not_ok[kind] = not_ok.get(kind, 0) + 1
        finally:
            conn.close()

    cpu, began = client_cpu_s(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(max(1, min(clients, len(raws))))))
    elapsed, cpu = time.perf_counter() - began, client_cpu_s() - cpu
    return Issued(latencies, tokens, before, not_ok, elapsed, cpu)


def settle(leader: NodeSpec, auditor: IdentityKeys) -> float:
    """Wait until the leader (the platform of every token here) has ended every token it was
    given, so the next phase does not pay for this one's computations; the seconds it took."""
    client = NodeClient.for_node(leader, REQUEST_TIMEOUT, auditor)
    began = time.perf_counter()
    deadline = began + DRAIN_TIMEOUT
    while time.perf_counter() < deadline:
        view = client.get("/v1/node/data")
        if view["tokens_pending"] == 0 and view["queued"] == 0:
            break
        time.sleep(DRAIN_POLL_S)
    return time.perf_counter() - began


# --- 2. compute to the user through MQTT -------------------------------------------------------


@dataclass(frozen=True)
class Computed:
    latencies_ms: list[float]
    lost: int
    refused: dict[str, int]
    values: list[float]


def results_topic(cfg: ClusterConfig, user: str) -> str:
    return f"{cfg.mqtt.topic_prefix}/{cfg.cluster}/users/{user}/results"


def open_result(record: Mapping[str, Any], user: IdentityKeys) -> Any:
    """The result a record carries, opened with ``user``'s key once its hash checks out."""
    sealed = base64.b64decode(record["sealed"])
    if hashlib.sha256(sealed).hexdigest() != record["result_hash"]:
        raise ValueError(f"token {record['token']}: the result does not match its hash")
    return json.loads(SealedBox(PrivateKey(user.box_secret)).decrypt(sealed))


async def compute_via_mqtt(
    cfg: ClusterConfig, leader: NodeSpec, input_key: bytes, user: IdentityKeys, runs: int
) -> Computed:
    """``runs`` means over the large dataset one at a time, each timed from sending its
    request to its result arriving on the user's topic and opened."""
    address = broker_address(cfg.mqtt)
    arrived: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
    latencies: list[float] = []
    values: list[float] = []
    refused: dict[str, int] = {}
    lost = 0
    mqtt = aiomqtt.Client(
        address.host, address.port, identifier=f"bench-{secrets.token_hex(4)}", timeout=10
    )
    async with mqtt:
        await mqtt.subscribe(results_topic(cfg, user.name), qos=0)

        async def listen() -> None:
            async for message in mqtt.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    arrived.put_nowait((time.perf_counter(), json.loads(payload)))

        listener = asyncio.create_task(listen())
        conn = await Connection.open(leader)
        try:
            for _ in range(runs):
                raw = compute_request(leader, input_key, user, LARGE, "mean", MEAN_PARAMS)
                sent = time.perf_counter()
                code, answer = await asyncio.wait_for(conn.exchange(raw), REQUEST_TIMEOUT)
                if code != 200:
                    key = f"{code} {answer.get('code', '')}"
                    refused[key] = refused.get(key, 0) + 1
                    continue
                record = await next_record(arrived, answer["id"])
                if record is None:
                    lost += 1
                    continue
                if record["status"] != "consumed":
                    key = f"refused {record['reason'].split(':')[0]}"
                    refused[key] = refused.get(key, 0) + 1
                    continue
                try:
                    values.append(float(open_result(record, user)["value"]))
                except (ValueError, KeyError, CryptoError):
                    refused["result did not open"] = refused.get("result did not open", 0) + 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1000)
        finally:
            conn.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    return Computed(latencies, lost, refused, values)


async def next_record(
    arrived: asyncio.Queue[tuple[float, dict[str, Any]]], token: str
) -> dict[str, Any] | None:
    """The record of ``token`` from the user's topic (earlier ones skipped), None if it does
    not come within ``RESULT_TIMEOUT``."""
    deadline = time.perf_counter() + RESULT_TIMEOUT
    while (left := deadline - time.perf_counter()) > 0:
        try:
            _, record = await asyncio.wait_for(arrived.get(), left)
        except TimeoutError:
            return None
        if record.get("token") == token:
            return record
    return None


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    single: int = 500
    many: int = 5_000
    clients: int = 64
    computes: int = 30
    users: int = 4


def run(settings: Settings, root: Path) -> dict[str, Any]:
    """The whole benchmark on a cluster of its own in ``root``; prints as it goes, returns
    the figures."""
    info = machine()
    print(
        f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}; load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    cast = DataCast.generate(settings.users)
    with running(root / "state", cast, None) as cfg:
        leader = find_leader(cfg)
        owner = NodeClient.for_node(leader, REQUEST_TIMEOUT, cast.operator)
        input_key = bytes.fromhex(owner.get("/v1/data/keys")["input_key"])
        large = table_csv(LARGE_ROWS, LARGE_BYTES)
        register(cfg, owner, SMALL, table_csv(50), ["count"])
        register(cfg, owner, LARGE, large, ["mean"])
        per_user = (settings.single + settings.many) // settings.users + 1
        for user in cast.users:
            grant(owner, SMALL, user.name, ["count"], per_user)
        grant(owner, LARGE, cast.users[0].name, ["mean"], settings.computes)
        print(
            f"cluster: 3 nodes, raft.fsync on, leader {leader.name}; datasets {SMALL} (50 rows) "
            f"and {LARGE} ({len(large):,} bytes, {LARGE_ROWS:,} rows); {settings.users} users",
            flush=True,
        )
        # The floor: a plain commit (a key's creation) one at a time, through the same client.
        keys = [
            http_request(
                leader, "POST", "/v1/keys", json.dumps({"name": f"k{i}"}).encode(), cast.operator
            )
            for i in range(settings.single)
        ]
        plain = asyncio.run(issue(leader, keys, 1))
        began = time.perf_counter()
        raws = token_requests(leader, input_key, cast.users, settings.single)
        prepare_us = (time.perf_counter() - began) / max(1, settings.single) * 1e6
        single = asyncio.run(issue(leader, raws, 1))
        settle(leader, cast.operator)
        raws = token_requests(leader, input_key, cast.users, settings.many)
        many = asyncio.run(issue(leader, raws, settings.clients))
        settle_s = settle(leader, cast.operator)
        computed = asyncio.run(
            compute_via_mqtt(cfg, leader, input_key, cast.users[0], settings.computes)
        )
    figures = {
        "machine": info,
        "settings": dataclasses.asdict(settings),
        "prepare_us_per_request": prepare_us,
        "plain_commit_p50_ms": pct(plain.latencies_ms, 0.5),
        "single_p50_ms": pct(single.latencies_ms, 0.5),
        "single_p99_ms": pct(single.latencies_ms, 0.99),
        "single_tokens": single.tokens,
        "single_answered_before_compute": single.answered_before_compute,
        "single_not_ok": single.not_ok,
        "many_tokens_per_s": many.per_s,
        "many_tokens": many.tokens,
        "many_answered_before_compute": many.answered_before_compute,
        "many_not_ok": many.not_ok,
        "many_p50_ms": pct(many.latencies_ms, 0.5),
        "many_p99_ms": pct(many.latencies_ms, 0.99),
        "many_client_cores": many.client_cores,
        "many_computations_settled_s": settle_s,
        "compute_p50_ms": pct(computed.latencies_ms, 0.5),
        "compute_p99_ms": pct(computed.latencies_ms, 0.99),
        "compute_ok": len(computed.latencies_ms),
        "compute_lost": computed.lost,
        "compute_refused": computed.refused,
        "compute_values_agree": len(set(computed.values)) <= 1,
    }
    for line in report_lines(figures, settings):
        print(line, flush=True)
    return figures


def report_lines(f: Mapping[str, Any], s: Settings) -> list[str]:
    """Each figure against the issue's goal, and what qualifies it."""
    p50, p99, rate, compute = (
        f["single_p50_ms"], f["single_p99_ms"], f["many_tokens_per_s"], f["compute_p50_ms"],
    )  # fmt: skip
    return [
        f"token requests sealed and signed by the client before each phase: "
        f"{f['prepare_us_per_request']:.0f} µs each",
        f"one at a time: {f['single_tokens']}/{s.single} tokens; answered while the token was "
        f"still 'issued' (the API did not wait for the computation): "
        f"{f['single_answered_before_compute']}; not ok: {f['single_not_ok'] or 'none'}",
        f"{s.clients} in flight: {f['many_tokens']}/{s.many} tokens; answered before the "
        f"computation: {f['many_answered_before_compute']}; not ok: {f['many_not_ok'] or 'none'}; "
        f"latency p50 {f['many_p50_ms']:.1f} ms, p99 {f['many_p99_ms']:.1f} ms; the leader ended "
        f"their computations {f['many_computations_settled_s']:.2f} s after the last answer",
        f"the floor: a plain commit (key create) one at a time p50 {f['plain_commit_p50_ms']:.2f} "
        f"ms; a token's p50 is {p50 / max(f['plain_commit_p50_ms'], 1e-9):.2f}x that",
        f"compute to the user: {f['compute_ok']}/{s.computes} results opened (lost "
        f"{f['compute_lost']}, refused {f['compute_refused'] or 'none'}; every mean the same: "
        f"{f['compute_values_agree']}); p99 {f['compute_p99_ms']:.1f} ms",
        "goals (issue 15, 3 nodes, fsync on):",
        f"  token issue p50      {p50:8.2f} ms    goal <= {GOAL_P50_MS:g} ms      "
        f"{verdict(p50 <= GOAL_P50_MS)}",
        f"  token issue p99      {p99:8.2f} ms    goal <= {GOAL_P99_MS:g} ms     "
        f"{verdict(p99 <= GOAL_P99_MS)}",
        f"  tokens/s in flight   {rate:8.1f} /s    goal >= {GOAL_TOKENS_PER_S:,.0f}/s    "
        f"{verdict(rate >= GOAL_TOKENS_PER_S)} ({s.clients} clients, client CPU "
        f"{f['many_client_cores']:.2f} cores)",
        f"  compute 1 MiB p50    {compute:8.2f} ms    goal <= {GOAL_COMPUTE_P50_MS:g} ms     "
        f"{verdict(compute <= GOAL_COMPUTE_P50_MS)} (send to result opened from MQTT)",
    ]


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kmsim-bench-dataauth-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny counts")
    parser.add_argument("--single", type=int, default=500, help="tokens one at a time")
    parser.add_argument("--many", type=int, default=5_000, help="tokens with many in flight")
    parser.add_argument("--clients", type=int, default=64, help="requests in flight")
    parser.add_argument("--computes", type=int, default=30, help="computes on the 1 MiB data")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        settings = Settings(single=10, many=40, clients=8, computes=2, users=2)
    else:
        settings = Settings(
            max(1, args.single), max(1, args.many), max(1, args.clients), max(1, args.computes)
        )
    with scratch() as root:
        figures = run(settings, root)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
