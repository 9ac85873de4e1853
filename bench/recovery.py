"""Disaster recovery and backup on 3 real nodes (issue 16): how long a cluster takes to serve
again after the k-th recovery share, and how fast a snapshot of 100,000 keys is saved and
restored.

Why this benchmark: a recovery is an outage, and the operators' question is how long it lasts
once the holders have done their part. It crosses every layer: the nodes replay the ledger
without the master secret, each share is checked by the leader's enclave against its
commitment and committed, the k-th lets every enclave rebuild the secret, check it against the
ledger's commitment, seal it again and open, and the first key release must then reach a
service enclave. A snapshot crosses the KM enclave (capture, serialise, sign), the host and the
operator API in chunks of 256 KiB, kmctl's checks, and, on restore, each node's enclave, which
checks it again and starts its Raft log from it. Only real processes show how those add up.

What it does: starts a 3-node cluster as ``kmctl up`` does (``bench.contracts_cluster.running``:
``supervisor.up`` on free ports on 127.0.0.1, a temporary state directory, ``raft.fsync`` on,
the cluster's defaults) whose genesis identities are an operator (admin) and three recovery
holders (2 of 3 rebuild the secret). A probe key is created and released to ``km2``, whose
service enclave MACs a challenge: that MAC must come back identical after every outage.

1. Recovery against a plain restart, per round on a fresh cluster of ``--keys`` keys (created
   with many requests in flight, ``POST /v1/keys``): fresh, because a node whose log still
   holds an earlier recovery's shares (boxed to its own recovery key, which derives from its
   sealing key) rebuilds the secret from them alone when it replays them, and would need no
   holder. In each round:
   - restart (the floor): stop every node (``supervisor.down``), start them again
     (``supervisor.up``, as ``kmctl up``), each resumes from its sealed state and replays its
     log; timed until every node is ready with the master secret under one leader, and until
     the probe's release and proof succeed ("serving");
   - recovery: stop every node, delete every node's sealed state, ``supervisor.up(recover=
     True)`` (as ``kmctl up --recover``) until every node is in recovery mode under one leader;
     the first holder submits its share and then the second (``recovery_client.submit_share``,
     what ``kmctl recovery submit`` runs); timed from the k-th share's POST returning until
     every node is open and until the probe serves again, with the POST's own latency.
   While a start is timed, a thread polls every node's status and notes when each node's
   processes first answered, had replayed the ledger, knew a leader, was recovering or open.
2. Backup, on one cluster of ``--snapshot-keys`` keys, per round (each saves what the last
   restored):
   - ``kmctl snapshot save FILE --node <a follower>`` as a process (what an operator runs;
     its interpreter start-up is measured beside it), then the same command in this process
     with each of its requests timed: the first (the node captures, serialises and signs the
     state), the other chunks, and kmctl's own work (decode, digest, checks, write);
   - every node stopped, every node's directory deleted, ``kmctl snapshot restore FILE``
     (a process), ``up --recover`` until every node reports recovering (each enclave checks
     the snapshot and restores the state), then the two shares, until serving;
   - the floor, in this process on the same bytes: kmctl's check (``judge_snapshot``:
     envelope, signature, quote, ``KMState.restore``), ``KMState.snapshot()`` of the state and
     ``KMState.restore`` of its image, and a plain ``json`` round trip of it.

Every figure is the median of the rounds; each round's figures are printed.

    python -m bench.recovery                      # 5,000 keys x 3 rounds; 100,000 keys x 3
    python -m bench.recovery --quick              # a smoke run (tiny ledgers, 1 round each)
    python -m bench.recovery --keys 2000 --snapshot-keys 10000 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest.quote import QuoteVerifier
from bench.contracts_cluster import REQUEST_TIMEOUT, Cast, Connection, http_request, running
from bench.machine import cpu_probe_ms
from bench.release import find_leader, get_status, machine
from kmnode import supervisor
from kmnode.cli import cli
from kmnode.client import ApiError, ClusterClient, NodeClient
from kmnode.config import ClusterConfig, NodeSpec
from kmnode.datadir import NODES_DIR, SEALED_STATE
from kmnode.enclave_code import current_measurements
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys, PublicIdentity
from kmnode.km.state import KMState
from kmnode.ledger.replay import judge_snapshot
from kmnode.recovery_client import submit_share
from kmnode.simhw import HardwareStore

HOLDERS = ("rec-a", "rec-b", "rec-c")
#: The key whose release and proof say "serving", the node it is released to, the challenge.
PROBE_KEY = "probe"
PROBE_TARGET = "km2"
CHALLENGE = "5eed" * 8
#: How often the bench looks at every node's status while it times a transition.
POLL_S = 0.02
#: Bounds on every wait: a cluster that stops answering fails the run instead of hanging it.
UP_TIMEOUT = 120.0
PHASE_TIMEOUT = 180.0
#: Key-creation requests signed at once: each is valid for ``kmnode.identity.MAX_AGE_S`` (60 s),
#: so a batch must be signed and sent well within that.
SIGN_BATCH = 5_000
#: The most attempts at creating a key whose request was not answered 201 (a leader change).
CREATE_ATTEMPTS = 3
MIB = 1 << 20
KMCTL = (sys.executable, "-m", "kmnode.cli")


# --- who acts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecoveryCast(Cast):
    """The operator (admin: it creates the keys, saves snapshots and releases the probe) and
    the recovery holders; ``users`` stays empty."""

    holders: tuple[IdentityKeys, ...] = ()

    @classmethod
    def make(cls) -> RecoveryCast:
        return cls(
            IdentityKeys.generate("bench-operator"),
            (),
            tuple(IdentityKeys.generate(name) for name in HOLDERS),
        )

    def identities(self) -> list[PublicIdentity]:
        operator = self.operator.public(["admin", "operator", "auditor"])
        return [operator, *(h.public(["recovery"]) for h in self.holders)]


# --- creating many keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyJob:
    """What a signing process needs: the node the requests go to, whose key signs, the names."""

    leader: NodeSpec
    operator: IdentityKeys
    names: tuple[str, ...]


def sign_key_requests(job: KeyJob) -> list[tuple[str, bytes]]:
    """Each name's ``POST /v1/keys`` request, signed as kmctl signs it."""
    return [
        (name, http_request(job.leader, "POST", "/v1/keys", b'{"name": "%s"}' % name.encode(),
                            job.operator))
        for name in job.names
    ]  # fmt: skip


@dataclass
class Created:
    """How key creation went: keys created, answers that were not 201 by kind, the time spent
    signing (client, in worker processes) and sending."""

    created: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    sign_s: float = 0.0
    send_s: float = 0.0

    @property
    def per_s(self) -> float:
        return self.created / self.send_s if self.send_s > 0 else 0.0


async def send_requests(
    leader: NodeSpec, requests: Sequence[tuple[str, bytes]], clients: int, created: Created
) -> list[str]:
    """Send ``requests`` over ``clients`` keep-alive connections; the names not created."""
    failed: list[str] = []
    pending = iter(requests)

    async def client() -> None:
        conn = await Connection.open(leader)
        try:
            for name, raw in pending:
                code, body = await asyncio.wait_for(conn.exchange(raw), REQUEST_TIMEOUT)
                if code == 201 or (code == 409 and "exists" in str(body)):
                    created.created += 1  # 409: an earlier attempt's answer was lost
                    continue
                kind = f"{code} {body.get('code', '') if isinstance(body, dict) else ''}"
                created.refused[kind] = created.refused.get(kind, 0) + 1
                failed.append(name)
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(max(1, min(clients, len(requests))))))
    return failed


def create_keys(
    cfg: ClusterConfig, operator: IdentityKeys, names: Sequence[str], clients: int
) -> Created:
    """Create every key of ``names`` (``POST /v1/keys`` with ``clients`` in flight), signed in
    batches by worker processes; a key refused (leadership moved) is tried again."""
    created = Created()
    remaining = list(names)
    workers = max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        for _ in range(CREATE_ATTEMPTS):
            failed: list[str] = []
            for start in range(0, len(remaining), SIGN_BATCH):
                leader = find_leader(cfg)
                batch = remaining[start : start + SIGN_BATCH]
                per = -(-len(batch) // workers)
                jobs = [
                    KeyJob(leader, operator, tuple(batch[i : i + per]))
                    for i in range(0, len(batch), per)
                ]
                began = time.perf_counter()
                signed = [r for done in pool.map(sign_key_requests, jobs) for r in done]
                sent = time.perf_counter()
                failed += asyncio.run(send_requests(leader, signed, clients, created))
                created.sign_s += sent - began
                created.send_s += time.perf_counter() - sent
            remaining = failed
            if not remaining:
                break
    if remaining:
        raise RuntimeError(f"{len(remaining)} keys not created: {created.refused}")
    return created


# --- watching the cluster ----------------------------------------------------------------------

Status = Mapping[str, Any]


def is_open(status: Status) -> bool:
    """Serving keys: ready, with the master secret."""
    return status.get("ready") is True and status.get("has_master_secret") is True


def is_recovering(status: Status) -> bool:
    """In recovery mode (replayed, no secret, not ready), waiting for shares."""
    return status.get("recovering") is True and status.get("ready") is not True


def statuses(cfg: ClusterConfig) -> dict[str, Status]:
    """Every answering node's ``/v1/status``."""
    found: dict[str, Status] = {}
    for node in cfg.nodes:
        status = get_status(node, timeout=1.0)
        if status is not None:
            found[node.name] = status
    return found


class Watch:
    """Polls every node's ``/v1/status`` from a thread while a start is timed, and notes when
    each node first answered (its processes are up: host, KM enclave and service enclave), had
    replayed its ledger to ``replay_to``, knew a leader, and was recovering or open; and when
    the whole cluster first agreed on one leader while every node was recovering, or open.

    One poller for all: the two cores are shared with the nodes being timed. A time is seen
    to within one polling cycle (``POLL_S`` plus three status requests)."""

    MILESTONES = ("api", "replayed", "leader", "recovering", "open")

    def __init__(self, cfg: ClusterConfig, replay_to: int) -> None:
        self.cfg = cfg
        self.replay_to = replay_to
        self.began = time.perf_counter()
        self.nodes: dict[str, dict[str, float]] = {n.name: {} for n in cfg.nodes}
        self.cluster: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def __enter__(self) -> Watch:
        self.began = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        deadline = self.began + 3 * PHASE_TIMEOUT
        while not self._stop.is_set() and time.perf_counter() < deadline:
            seen = statuses(self.cfg)
            now = time.perf_counter() - self.began
            for name, status in seen.items():
                marks = self.nodes[name]
                marks.setdefault("api", now)
                reached = {
                    "replayed": int(status.get("applied") or 0) >= self.replay_to,
                    "leader": bool(status.get("leader")),
                    "recovering": is_recovering(status),
                    "open": is_open(status),
                }
                for milestone, held in reached.items():
                    if held:
                        marks.setdefault(milestone, now)
            leaders = {s.get("leader") for s in seen.values()}
            if len(seen) == len(self.cfg.nodes) and len(leaders) == 1 and None not in leaders:
                for milestone, wanted in (("recovering", is_recovering), ("open", is_open)):
                    if all(wanted(s) for s in seen.values()):
                        self.cluster.setdefault(milestone, now)
            self._stop.wait(POLL_S)

    def wait(self, milestone: str) -> float:
        """The ``perf_counter`` time the whole cluster first reached ``milestone``."""
        deadline = time.perf_counter() + PHASE_TIMEOUT
        while milestone not in self.cluster:
            if milestone == "recovering" and "open" in self.cluster:
                raise RuntimeError("the cluster opened without waiting for shares")
            if time.perf_counter() >= deadline or not self._thread.is_alive():
                shown = {n: sorted(m) for n, m in self.nodes.items()}
                raise RuntimeError(f"the cluster was not {milestone} in time: {shown}")
            time.sleep(POLL_S / 4)
        return self.began + self.cluster[milestone]

    def timeline(self) -> dict[str, dict[str, float]]:
        return {name: dict(marks) for name, marks in self.nodes.items()}


def release_and_prove(cfg: ClusterConfig, operator: IdentityKeys) -> str:
    """Release the probe key to ``PROBE_TARGET`` (through the leader) and have its service
    enclave MAC the challenge; the MAC. A KmsimError if either step is refused."""
    leader = find_leader(cfg)
    client = NodeClient.for_node(leader, REQUEST_TIMEOUT, operator)
    reply = client.post(f"/v1/keys/{PROBE_KEY}/release", {"node": PROBE_TARGET})
    status = reply["releases"][0]["status"]
    if status != "provisioned":
        raise KmsimError(f"the probe's release ended {status}", 1)
    target = NodeClient.for_node(cfg.node(PROBE_TARGET), REQUEST_TIMEOUT, operator)
    body = {"key": PROBE_KEY, "generation": 1, "challenge": CHALLENGE}
    return str(target.post("/v1/service/prove", body)["mac"])


def wait_serving(cfg: ClusterConfig, operator: IdentityKeys, mac: str) -> float:
    """Try the probe's release and proof until they succeed; the ``perf_counter`` time they
    did. A different MAC is a lost key, not a slow cluster: it fails the run."""
    deadline = time.perf_counter() + PHASE_TIMEOUT
    last = "not tried"
    while time.perf_counter() < deadline:
        try:
            got = release_and_prove(cfg, operator)
        except (KmsimError, RuntimeError) as exc:
            last = str(exc)
            time.sleep(POLL_S)
            continue
        if got != mac:
            raise RuntimeError("the probe key proves another MAC than before: a key was lost")
        return time.perf_counter()
    raise RuntimeError(f"the probe key was not served within {PHASE_TIMEOUT:g}s: {last}")


def wait_current_split(cfg: ClusterConfig, operator: IdentityKeys) -> int:
    """Wait until the ledger's recovery split is current (the fresh one made after a recovery
    is committed): the holders' shares of an older split no longer open the cluster."""
    client = ClusterClient(cfg, timeout=REQUEST_TIMEOUT, signer=operator)
    deadline = time.perf_counter() + PHASE_TIMEOUT
    while time.perf_counter() < deadline:
        view = client.get("/v1/recovery")
        generation = view.get("generation")
        if generation is not None and not view.get("split_due") and not view.get("complete_index"):
            return int(generation)
        time.sleep(POLL_S * 5)
    raise RuntimeError("the recovery split did not become current")


# --- shares ------------------------------------------------------------------------------------


@dataclass
class TimedClient(ClusterClient):
    """The client ``submit_share`` uses, noting its POST (the share itself): how long it took
    and when it returned. Everything before it (the split read, the shares opened, each
    node's quoted recovery key fetched and verified, the boxes made) is the submission's
    preparation."""

    post_s: float = 0.0
    posted_at: float = 0.0

    def post(
        self, path: str, body: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        began = time.perf_counter()
        answer = super().post(path, body, timeout)
        self.posted_at = time.perf_counter()
        self.post_s = self.posted_at - began
        return answer


@dataclass(frozen=True)
class Submission:
    prepare_s: float
    post_s: float
    posted_at: float
    complete: bool


def submit(cfg: ClusterConfig, holder: IdentityKeys) -> Submission:
    """``holder``'s share, submitted as ``kmctl recovery submit`` does; retried while the
    recovering cluster cannot take it yet (no leader, a key not offered yet)."""
    deadline = time.perf_counter() + PHASE_TIMEOUT
    while True:
        client = TimedClient(cfg, timeout=REQUEST_TIMEOUT, signer=holder)
        began = time.perf_counter()
        try:
            done = submit_share(client)
        except ApiError as exc:
            if exc.status in (400, 401, 403, 409) or time.perf_counter() >= deadline:
                raise
            time.sleep(POLL_S)
            continue
        except KmsimError:
            if time.perf_counter() >= deadline:
                raise
            time.sleep(POLL_S)
            continue
        prepare = client.posted_at - client.post_s - began
        complete = bool(done.answer.get("complete"))
        return Submission(prepare, client.post_s, client.posted_at, complete)


@dataclass(frozen=True)
class Reopened:
    """A recovery's second half: both shares, then every node open, then serving."""

    first_s: float  # the first holder's whole submission
    kth_prepare_s: float  # the k-th's preparation (split, keys verified, boxes)
    kth_post_s: float  # the k-th's POST: the leader's enclave checks it, it commits
    open_s: float  # the k-th POST returned -> every node open under one leader
    release_s: float  # open -> the probe released and proved
    serving_at: float

    @property
    def share_to_serving_s(self) -> float:
        return self.open_s + self.release_s


def reopen(cfg: ClusterConfig, cast: RecoveryCast, mac: str, watch: Watch) -> Reopened:
    """Every node waits for shares: the first holder submits, then the k-th (the second);
    timed until every node is open and until the probe serves."""
    first = submit(cfg, cast.holders[0])
    if first.complete:
        raise RuntimeError("one share completed a 2-of-3 recovery")
    kth = submit(cfg, cast.holders[1])
    if not kth.complete:
        raise RuntimeError("the k-th share did not complete the recovery")
    opened = watch.wait("open")
    served = wait_serving(cfg, cast.operator, mac)
    return Reopened(
        first.prepare_s + first.post_s,
        kth.prepare_s,
        kth.post_s,
        max(0.0, opened - kth.posted_at),  # seen open at the poll after the POST returned
        served - max(opened, kth.posted_at),
        served,
    )


def applied_index(cfg: ClusterConfig) -> int:
    """The highest applied index any node reports now."""
    return max(int(s.get("applied") or 0) for s in statuses(cfg).values())


# --- 1. recovery against a restart -------------------------------------------------------------


@dataclass(frozen=True)
class Restart:
    up_s: float  # supervisor.up returned (kmctl up: every node ready)
    open_s: float  # start -> every node open under one leader
    serving_s: float  # start -> the probe released and proved
    replayed: int  # the ledger's applied index at the stop: what each node replays
    timeline: dict[str, dict[str, float]]


def restart_round(cfg: ClusterConfig, cast: RecoveryCast, mac: str) -> Restart:
    replay_to = applied_index(cfg)
    supervisor.down(cfg)
    with Watch(cfg, replay_to) as watch:
        supervisor.up(cfg, timeout=UP_TIMEOUT)
        up = time.perf_counter()
        opened = watch.wait("open")
        served = wait_serving(cfg, cast.operator, mac)
    began = watch.began
    return Restart(up - began, opened - began, served - began, replay_to, watch.timeline())


@dataclass(frozen=True)
class Recovery:
    recovering_s: float  # start (up --recover) -> every node recovering under one leader
    reopened: Reopened
    total_s: float  # start -> serving (the shares submitted at once)
    replayed: int
    timeline: dict[str, dict[str, float]]


def lose_sealed_state(cfg: ClusterConfig) -> None:
    """Stop every node and delete every node's sealed state (the Raft logs stay)."""
    supervisor.down(cfg)
    for node in cfg.nodes:
        (supervisor.node_data_dir(cfg, node.name) / SEALED_STATE).unlink()


def recovery_round(cfg: ClusterConfig, cast: RecoveryCast, mac: str) -> Recovery:
    wait_current_split(cfg, cast.operator)
    replay_to = applied_index(cfg)
    lose_sealed_state(cfg)
    with Watch(cfg, replay_to) as watch:
        supervisor.up(cfg, timeout=UP_TIMEOUT, recover=True)
        recovering = watch.wait("recovering")
        reopened = reopen(cfg, cast, mac, watch)
    began = watch.began
    return Recovery(
        recovering - began, reopened, reopened.serving_at - began, replay_to, watch.timeline()
    )


# --- 2. snapshot save and restore --------------------------------------------------------------


def kmctl(cfg: ClusterConfig, key_file: Path, *args: str) -> tuple[float, str]:
    """``kmctl`` as an operator runs it, on the running cluster's config; its wall time and
    output. RuntimeError with its stderr if it fails."""
    argv = [*KMCTL, "-c", str(supervisor.effective_config_path(cfg)), "--as", str(key_file), *args]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PHASE_TIMEOUT)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"kmctl {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return took, done.stdout


@contextlib.contextmanager
def timed_requests() -> Iterator[list[tuple[str, float]]]:
    """While inside: every ``NodeClient`` request in this process noted (its path and query
    offset, its seconds), so an in-process kmctl run shows where its time went."""
    calls: list[tuple[str, float]] = []
    original = NodeClient.request

    def timed(
        self: NodeClient,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        began = time.perf_counter()
        try:
            return original(self, method, path, body, query, timeout)
        finally:
            calls.append((f"{path}?{dict(query or {})}", time.perf_counter() - began))

    NodeClient.request = timed  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        NodeClient.request = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class Saved:
    wall_s: float  # `kmctl snapshot save` as a process
    startup_s: float  # `kmctl snapshot --help` as a process: interpreter start-up and imports
    size: int
    chunks: int
    keys: int
    index: int
    inproc_s: float  # the same command run in this process
    take_s: float  # its first request: the node captures, serialises, signs; first chunk
    chunks_s: float  # its other chunk requests
    client_s: float  # the rest: decode, digest, kmctl's checks, write and fsync

    @property
    def mb_per_s(self) -> float:
        return self.size / MIB / self.wall_s

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.wall_s


def save_round(cfg: ClusterConfig, key_file: Path, node: str, file: Path) -> Saved:
    startup, _ = kmctl(cfg, key_file, "snapshot", "--help")
    wall, out = kmctl(cfg, key_file, "snapshot", "save", str(file), "--node", node, "--json")
    summary = json.loads(out)
    again = file.with_name(file.name + ".inproc")
    argv = ["-c", str(supervisor.effective_config_path(cfg)), "--as", str(key_file),
            "snapshot", "save", str(again), "--node", node, "--json"]  # fmt: skip
    with timed_requests() as calls, contextlib.redirect_stdout(io.StringIO()):
        began = time.perf_counter()
        cli.main(argv, standalone_mode=False)
        inproc = time.perf_counter() - began
    again.unlink()
    requests = [s for path, s in calls if path.startswith("/v1/snapshot")]
    return Saved(
        wall, startup, int(summary["bytes"]), int(summary["chunks"]), int(summary["keys"]),
        int(summary["index"]), inproc, requests[0], sum(requests[1:]), inproc - sum(requests),
    )  # fmt: skip


@dataclass(frozen=True)
class Restored:
    restore_s: float  # `kmctl snapshot restore` as a process: its checks, three directories
    recovering_s: float  # up --recover -> every node recovering (the enclaves' check, restore)
    reopened: Reopened
    total_s: float  # restore started -> serving
    present: int  # of the keys looked up once serving (the first, the last, the probe)
    timeline: dict[str, dict[str, float]]

    @property
    def to_recovering_s(self) -> float:
        return self.restore_s + self.recovering_s


def keys_present(cfg: ClusterConfig, operator: IdentityKeys, names: Sequence[str]) -> int:
    """How many of ``names`` the cluster holds, each read alone: ``GET /v1/keys`` lists every
    key in one answer, which a ledger of 100,000 keys does not get within 30 s."""
    client = ClusterClient(cfg, timeout=REQUEST_TIMEOUT, signer=operator)
    found = 0
    for name in names:
        with contextlib.suppress(ApiError):
            found += client.get(f"/v1/keys/{name}")["name"] == name
    return found


def restore_round(
    cfg: ClusterConfig, cast: RecoveryCast, key_file: Path, saved: Saved, file: Path, mac: str,
    aside: Path, sample: Sequence[str],
) -> Restored:  # fmt: skip
    """Every node stopped and its directory lost; the snapshot restored, recovered, serving;
    then the keys of ``sample`` looked up."""
    wait_current_split(cfg, cast.operator)
    supervisor.down(cfg)
    (cfg.state_dir / NODES_DIR).rename(aside)
    shutil.rmtree(aside)  # every node's directory is gone (not timed)
    began = time.perf_counter()
    restore, _ = kmctl(cfg, key_file, "snapshot", "restore", str(file))
    with Watch(cfg, saved.index) as watch:
        supervisor.up(cfg, timeout=UP_TIMEOUT, recover=True)
        recovering = watch.wait("recovering")
        reopened = reopen(cfg, cast, mac, watch)
    return Restored(
        restore, recovering - watch.began, reopened, reopened.serving_at - began,
        keys_present(cfg, cast.operator, sample), watch.timeline(),
    )  # fmt: skip


@dataclass(frozen=True)
class Floor:
    """What the same state costs in this process alone."""

    judge_s: float  # kmctl's check: envelope, signature, quote, KMState.restore
    serialise_s: float  # KMState.snapshot() of the restored state
    restore_s: float  # KMState.restore of that image
    json_s: float  # json.loads + json.dumps of that image
    state_bytes: int


def floor_round(cfg: ClusterConfig, data: bytes) -> Floor:
    verifier = QuoteVerifier(HardwareStore(cfg.state_dir / "hardware").vendor_public_key())
    trusted = frozenset(cfg.policy.resolve(current_measurements()).km_measurements)
    began = time.perf_counter()
    judged = judge_snapshot(data, verifier, trusted)
    judge = time.perf_counter() - began
    if isinstance(judged, str):
        raise RuntimeError(f"the saved snapshot is {judged}")
    _, state = judged
    began = time.perf_counter()
    image = state.snapshot()
    serialise = time.perf_counter() - began
    began = time.perf_counter()
    KMState.restore(image)
    restore = time.perf_counter() - began
    began = time.perf_counter()
    json.dumps(json.loads(image))
    plain = time.perf_counter() - began
    return Floor(judge, serialise, restore, plain, len(image))


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    keys: int = 5_000
    snapshot_keys: int = 100_000
    rounds: int = 3
    snapshot_rounds: int = 3
    clients: int = 64


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}x" if b > 0 else "n/a"


def paired(numerators: Sequence[float], denominators: Sequence[float]) -> str:
    """The median of each round's own ratio: this VM's speed drifts by up to 3x within
    minutes, and a round's two figures were taken a few seconds apart."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True) if b > 0]
    return f"{med(ratios):.3g}x" if ratios else "n/a"


def node_dir_bytes(cfg: ClusterConfig) -> int:
    """The bytes in one node's directory (the first node's): its Raft log and snapshots."""
    directory = supervisor.node_data_dir(cfg, cfg.nodes[0].name)
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def timeline_line(timeline: Mapping[str, Mapping[str, float]]) -> str:
    """Each node's milestones in seconds from the start, in the order reached."""
    return "; ".join(
        f"{node} " + " ".join(f"{m} {t:.2f}" for m, t in sorted(marks.items(), key=lambda x: x[1]))
        for node, marks in timeline.items()
    )


def say(line: str) -> None:
    print(line, flush=True)


def bulk_names(keys: int) -> list[str]:
    """The names of a ledger's keys besides the probe."""
    return [f"k{i:06d}" for i in range(max(0, keys - 1))]


@contextlib.contextmanager
def cluster_with_keys(
    state_dir: Path, cast: RecoveryCast, keys: int, clients: int
) -> Iterator[tuple[ClusterConfig, str]]:
    """A fresh cluster (``bench.contracts_cluster.running``: stopped on leaving, whatever
    happens) holding the probe key and ``keys - 1`` others; the probe's MAC."""
    with running(state_dir, cast, None) as cfg:
        leader = find_leader(cfg)
        client = NodeClient.for_node(leader, REQUEST_TIMEOUT, cast.operator)
        client.post("/v1/keys", {"name": PROBE_KEY})
        mac = release_and_prove(cfg, cast.operator)
        names = bulk_names(keys)
        made = create_keys(cfg, cast.operator, names, clients)
        say(
            f"cluster {state_dir.name}: 3 nodes, raft.fsync on; {made.created + 1:,} keys "
            f"({made.per_s:,.0f} created/s at {clients} in flight, signed beforehand in "
            f"{made.sign_s:.1f} s; not created at first: {made.refused or 'none'})"
        )
        try:
            yield cfg, mac
        finally:
            shutil.rmtree(state_dir / NODES_DIR, ignore_errors=True)


def part_recovery(
    cast: RecoveryCast, root: Path, settings: Settings
) -> tuple[list[Restart], list[Recovery]]:
    """Per round a fresh cluster of ``settings.keys`` keys: a restart, then a recovery, each
    printed as it ends. A fresh one because a node whose log still holds an earlier
    recovery's shares (boxed to its own recovery key) rebuilds the secret from them alone."""
    restarts: list[Restart] = []
    recoveries: list[Recovery] = []
    for number in range(1, settings.rounds + 1):
        state_dir = root / f"state-recovery-{number}"
        with cluster_with_keys(state_dir, cast, settings.keys, settings.clients) as (cfg, mac):
            r = restart_round(cfg, cast, mac)
            restarts.append(r)
            say(
                f"restart {number}: up returned {ms(r.up_s)}, open {ms(r.open_s)}, serving "
                f"{ms(r.serving_s)} (replayed {r.replayed:,} entries; a node's directory "
                f"{node_dir_bytes(cfg) / MIB:.1f} MiB)\n  seconds: {timeline_line(r.timeline)}"
            )
            v = recovery_round(cfg, cast, mac)
            recoveries.append(v)
            o = v.reopened
            say(
                f"recovery {number}: every node recovering {ms(v.recovering_s)} (replayed "
                f"{v.replayed:,} entries); first share {ms(o.first_s)}; k-th share prepared "
                f"{ms(o.kth_prepare_s)}, POST {ms(o.kth_post_s)}; POST returned -> open "
                f"{ms(o.open_s)} -> serving +{ms(o.release_s)} = {ms(o.share_to_serving_s)}; "
                f"start -> serving {ms(v.total_s)}\n  seconds: {timeline_line(v.timeline)}"
            )
    return restarts, recoveries


def part_snapshot(
    cfg: ClusterConfig, cast: RecoveryCast, mac: str, key_file: Path, root: Path,
    settings: Settings,
) -> tuple[list[Saved], list[Floor], list[Restored]]:  # fmt: skip
    """Save, floor and restore rounds, each printed as it ends. Each round saves what the
    previous one restored (and counts its keys)."""
    names = bulk_names(settings.snapshot_keys)
    sample = [PROBE_KEY, *names[:1], *names[-1:]]
    saves: list[Saved] = []
    floors: list[Floor] = []
    restores: list[Restored] = []
    for number in range(1, settings.snapshot_rounds + 1):
        wait_current_split(cfg, cast.operator)
        follower = next(n.name for n in cfg.nodes if n.name != find_leader(cfg).name)
        file = root / f"backup-{number}.snap"
        s = save_round(cfg, key_file, follower, file)
        saves.append(s)
        say(
            f"save {number} (from {follower}): {ms(s.wall_s)} ({s.size / MIB:.1f} MiB in "
            f"{s.chunks} chunks, {s.keys:,} keys, index {s.index:,}: {s.mb_per_s:.1f} MiB/s, "
            f"{s.keys_per_s:,.0f} keys/s); kmctl start-up {ms(s.startup_s)}; in process "
            f"{ms(s.inproc_s)} = take {ms(s.take_s)} + other chunks {ms(s.chunks_s)} + "
            f"kmctl's checks and write {ms(s.client_s)}"
        )
        f = floor_round(cfg, file.read_bytes())
        floors.append(f)
        say(
            f"floor {number}: judge_snapshot {ms(f.judge_s)}, KMState.snapshot() "
            f"{ms(f.serialise_s)}, KMState.restore {ms(f.restore_s)}, json round trip "
            f"{ms(f.json_s)} ({f.state_bytes / MIB:.1f} MiB image)"
        )
        t = restore_round(cfg, cast, key_file, s, file, mac, root / f"lost-{number}", sample)
        restores.append(t)
        o = t.reopened
        say(
            f"restore {number}: kmctl snapshot restore {ms(t.restore_s)}; up --recover -> "
            f"every node recovering {ms(t.recovering_s)}; shares "
            f"{ms(o.first_s + o.kth_prepare_s + o.kth_post_s)}; k-th POST returned -> open "
            f"{ms(o.open_s)} -> serving +{ms(o.release_s)}; restore -> serving "
            f"{ms(t.total_s)}; {t.present} of {len(sample)} keys looked up present\n"
            f"  seconds: {timeline_line(t.timeline)}"
        )
        file.unlink()
    return saves, floors, restores


def run(settings: Settings, root: Path) -> dict[str, Any]:
    """The whole benchmark on a cluster of its own in ``root``; prints as it goes, returns
    the figures."""
    info = machine()
    load = os.getloadavg()
    say(
        f"machine: nproc {info['nproc']}, {info['cpu']}, Python {info['python']}; load average "
        f"{', '.join(f'{x:.2f}' for x in load)}; CPU probe {cpu_probe_ms():.1f} ms"
    )
    cast = RecoveryCast.make()
    key_file = root / "keys" / "operator.key"
    cast.operator.save(key_file)
    figures: dict[str, Any] = {
        "machine": info, "load_before": load, "settings": dataclasses.asdict(settings),
    }  # fmt: skip
    restarts, recoveries = part_recovery(cast, root, settings)
    figures["restarts"] = [dataclasses.asdict(r) for r in restarts]
    figures["recoveries"] = [dataclasses.asdict(v) for v in recoveries]
    for line in recovery_lines(restarts, recoveries):
        say(line)
    state_dir = root / "state-snapshot"
    with cluster_with_keys(state_dir, cast, settings.snapshot_keys, settings.clients) as (
        cfg,
        mac,
    ):
        saves, floors, restores = part_snapshot(cfg, cast, mac, key_file, root, settings)
    figures["saves"] = [dataclasses.asdict(s) for s in saves]
    figures["floors"] = [dataclasses.asdict(f) for f in floors]
    figures["restores"] = [dataclasses.asdict(t) for t in restores]
    for line in snapshot_lines(saves, restores, floors):
        say(line)
    return figures


def last(timed: Restart | Recovery | Restored, milestone: str) -> float:
    """Seconds from a round's start until its last node reached ``milestone``."""
    times = [marks.get(milestone) for marks in timed.timeline.values()]
    return max(t for t in times if t is not None) if None not in times else float("nan")


def recovery_lines(restarts: Sequence[Restart], recoveries: Sequence[Recovery]) -> list[str]:
    """The medians of part 1, each against the restart measured in the same run."""
    serving = [r.serving_s for r in restarts]
    restart = med(serving)
    share = med([v.reopened.share_to_serving_s for v in recoveries])
    total = med([v.total_s for v in recoveries])
    return [
        f"recovery (medians of {len(recoveries)} rounds; restart of {len(restarts)}):",
        f"  k-th share POST                 {ms(med([v.reopened.kth_post_s for v in recoveries]))}",
        f"  k-th POST returned -> all open  {ms(med([v.reopened.open_s for v in recoveries]))}",
        f"  all open -> release+prove ok    {ms(med([v.reopened.release_s for v in recoveries]))}",
        f"  k-th share -> serving           {ms(share)}   "
        f"{ratio(share, restart)} of a plain restart's start -> serving (per round: "
        f"{paired([v.reopened.share_to_serving_s for v in recoveries], serving)})",
        f"  up --recover -> all recovering  {ms(med([v.recovering_s for v in recoveries]))}",
        f"  recovery start -> serving       {ms(total)}   "
        f"{ratio(total, restart)} of a plain restart's start -> serving (per round: "
        f"{paired([v.total_s for v in recoveries], serving)})",
        f"  plain restart: start -> serving {ms(restart)} "
        f"(up returned {ms(med([r.up_s for r in restarts]))}, "
        f"open {ms(med([r.open_s for r in restarts]))})",
        f"  every node's processes answering: restart {ms(med([last(r, 'api') for r in restarts]))}"
        f", recovery {ms(med([last(v, 'api') for v in recoveries]))}; every node replayed: "
        f"restart {ms(med([last(r, 'replayed') for r in restarts]))}, recovery "
        f"{ms(med([last(v, 'replayed') for v in recoveries]))} (from the start)",
    ]


def snapshot_lines(
    saves: Sequence[Saved], restores: Sequence[Restored], floors: Sequence[Floor]
) -> list[str]:
    """The medians of part 2, each against the in-process floor measured in the same run."""
    save = med([s.wall_s for s in saves])
    size = med([float(s.size) for s in saves])
    keys = med([float(s.keys) for s in saves])
    serialised = [f.serialise_s for f in floors]
    serialise = med(serialised)
    restore = med([t.to_recovering_s for t in restores])
    in_process = med([f.restore_s for f in floors])
    shares = med([t.reopened.share_to_serving_s for t in restores])
    return [
        f"snapshot (medians of {len(saves)} rounds, {keys:,.0f} keys, {size / MIB:.1f} MiB):",
        f"  save (kmctl, a process)         {ms(save)}   {size / MIB / save:.1f} MiB/s, "
        f"{keys / save:,.0f} keys/s; {ratio(save, serialise)} of KMState.snapshot() in process "
        f"({ms(serialise)}; per round: {paired([s.wall_s for s in saves], serialised)})",
        f"    of which: take {ms(med([s.take_s for s in saves]))}, other chunks "
        f"{ms(med([s.chunks_s for s in saves]))}, kmctl's checks and write "
        f"{ms(med([s.client_s for s in saves]))}, start-up {ms(med([s.startup_s for s in saves]))}",
        f"  restore -> every node recovering {ms(restore)}   {size / MIB / restore:.1f} MiB/s, "
        f"{keys / restore:,.0f} keys/s; {ratio(restore, in_process)} of KMState.restore in "
        f"process ({ms(in_process)}; per round: "
        f"{paired([t.to_recovering_s for t in restores], [f.restore_s for f in floors])})",
        f"    of which: kmctl snapshot restore {ms(med([t.restore_s for t in restores]))}, "
        f"up --recover -> recovering {ms(med([t.recovering_s for t in restores]))}",
        f"    (every node's processes answering {ms(med([last(t, 'api') for t in restores]))} "
        f"after up --recover began)",
        f"  k-th share -> serving            {ms(shares)}; restore -> serving "
        f"{ms(med([t.total_s for t in restores]))}",
        f"  floor: judge_snapshot {ms(med([f.judge_s for f in floors]))}, json round trip "
        f"{ms(med([f.json_s for f in floors]))}",
    ]


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kmsim-bench-recovery-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny ledgers")
    parser.add_argument("--keys", type=int, default=5_000, help="keys in the ledger of part 1")
    parser.add_argument(
        "--snapshot-keys", type=int, default=100_000, help="keys in the snapshot of part 2"
    )
    parser.add_argument("--rounds", type=int, default=3, help="restarts and recoveries each")
    parser.add_argument("--snapshot-rounds", type=int, default=3, help="saves and restores")
    parser.add_argument("--clients", type=int, default=64, help="key creations in flight")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        settings = Settings(keys=100, snapshot_keys=300, rounds=1, snapshot_rounds=1, clients=16)
    else:
        settings = Settings(
            max(1, args.keys),
            max(args.keys, args.snapshot_keys),
            max(1, args.rounds),
            max(1, args.snapshot_rounds),
            max(1, args.clients),
        )
    with scratch() as root:
        figures = run(settings, root)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
