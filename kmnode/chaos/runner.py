"""`kmctl chaos run`: a seeded nemesis and concurrent clients against a running local cluster,
recorded as a history and judged by the checker.

Clients are threads issuing random operations (create, rotate, release, linearizable read,
prove) on random nodes; each outcome is classified the way the history requires: ``ok`` for a
2xx, ``fail`` only when the cluster certainly did not act (refused by the state machine, bad
request, not the leader, not ready, unreachable), ``info`` otherwise (timeouts, dropped
connections, 503/504): an ``info`` operation may still take effect. The nemesis
(:mod:`kmnode.chaos.nemesis`) cycles through faults chosen by the seed: quiet, inject, hold,
heal. The seed fixes the schedule of faults and the clients' choices; it cannot fix the timing
of real processes, so two runs with one seed inject the same faults but interleave differently.

After the run every fault is healed, the cluster must converge within the recovery bound, and
each node's committed state is read (linearizably) as the checker's final state. Everything the
host side holds (data directories, logs, everything published on MQTT during the run) is
searched for the plaintext keys. History and final state are saved in ``out_dir`` so a run can
be re-checked offline.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmnode.chaos import oracle
from kmnode.chaos.capture import CaptureError, MqttCapture
from kmnode.chaos.checker import CheckOutcome, CheckResult, NodeState, check, check_plaintext
from kmnode.chaos.faults import FaultError, raft_dir
from kmnode.chaos.governance import check_ledger
from kmnode.chaos.history import HistoryRecorder, OpHandle
from kmnode.chaos.nemesis import FAULT_KINDS, Nemesis, resolve_kinds
from kmnode.client import ApiError, NodeClient, NodeUnreachable, default_signer
from kmnode.config import ClusterConfig
from kmnode.errors import KmsimError

_CLIENT_TIMEOUT = 10.0
_RELEASE_WAIT = 5.0
#: API errors after which the cluster certainly did not act on the request.
_CERTAIN_FAILURES = {"refused", "bad_request", "not_found", "not_leader", "not_ready"}


class RunError(Exception):
    """The run could not be carried out (the cluster is not up, or did not converge)."""


@dataclass(frozen=True)
class RunConfig:
    seed: int
    duration: float = 30.0
    clients: int = 3
    #: Seconds of quiet before each fault and seconds each fault is held.
    interval: float = 3.0
    #: Fault kinds to cycle through; None: every kind the cluster supports.
    faults: tuple[str, ...] | None = None
    keys: int = 4
    converge_timeout: float = 60.0
    #: After each heal an operation must succeed, and after the final heal every node must
    #: agree, within this many seconds.
    recovery_bound: float = 20.0
    #: Search the host side for plaintext keys at the end.
    scan_plaintext: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults or ()) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if self.duration <= 0 or self.clients < 1 or self.interval <= 0 or self.keys < 1:
            raise ValueError("duration, interval, clients and keys must be positive")
        if self.recovery_bound <= 0:
            raise ValueError("the recovery bound must be positive")


@dataclass
class RunOutcome:
    result: CheckResult
    history_path: Path
    final_path: Path
    faults: list[dict[str, Any]] = field(default_factory=list)
    #: Seconds from the final heal until every node agreed on leader, term and applied index.
    recovery: float = 0.0

    def to_json(self) -> dict[str, Any]:
        result = self.result
        return {
            "valid": result.valid,
            "checks": {n: {"valid": c.valid, "detail": c.detail} for n, c in result.checks.items()},
            "first_violation": self.first_violation(),
            "stats": result.stats,
            "faults": self.faults,
            "recovery_s": round(self.recovery, 3),
            "history": str(self.history_path),
            "final_state": str(self.final_path),
        }

    def first_violation(self) -> dict[str, Any] | None:
        """The earliest violation in the history (by its operation's invoke time)."""
        found = [c.first_violation for c in self.result.checks.values() if c.first_violation]
        if not found:
            return None
        first = min(found, key=lambda v: v.order)
        op = first.op
        return {
            "message": first.message,
            "node": first.node,
            "op": None if op is None else {
                "id": op.id, "process": op.process, "kind": op.kind, "args": dict(op.args),
                "node": op.node, "outcome": op.outcome, "value": op.value, "error": op.error,
            },
        }  # fmt: skip


def record_outcome(handle: OpHandle, call: Callable[[], Any], value: Callable[[Any], Any]) -> None:
    """Run ``call`` and complete ``handle`` according to what the client can know."""
    try:
        answer = call()
    except ApiError as exc:
        certain = exc.code in _CERTAIN_FAILURES and exc.status != 504
        (handle.fail if certain else handle.info)(f"{exc.status} {exc.code}: {exc.message}")
        return
    except NodeUnreachable as exc:
        handle.fail(exc.message)
        return
    except KmsimError as exc:
        handle.info(exc.message)
        return
    handle.ok(value(answer))


class _Client(threading.Thread):
    def __init__(self, index: int, run: _Run) -> None:
        super().__init__(name=f"chaos-client-{index}", daemon=True)
        self.process = f"c{index}"
        self.run_ = run
        self.rng = random.Random(f"{run.config.seed}/client/{index}")

    def run(self) -> None:
        run = self.run_
        while not run.stop.is_set():
            self.one_op()
            run.stop.wait(self.rng.uniform(0.01, 0.1))

    def one_op(self) -> None:
        run, rng = self.run_, self.rng
        node = rng.choice(run.names)
        client = NodeClient.for_node(run.cfg.node(node), _CLIENT_TIMEOUT, run.signer)
        key = f"{run.key_prefix}{rng.randrange(run.config.keys)}"
        path = f"/v1/keys/{urllib.parse.quote(key, safe='')}"
        kind = rng.choices(["key.create", "key.rotate", "release", "read", "prove"],
                           weights=[2, 1, 3, 4, 1])[0]  # fmt: skip
        rec = run.recorder
        if kind == "key.create":
            with rec.invoke(self.process, "key.create", {"key": key}, node) as h:
                record_outcome(h, lambda: client.post("/v1/keys", {"name": key}), _gen)
        elif kind == "key.rotate":
            with rec.invoke(self.process, "key.rotate", {"key": key}, node) as h:
                record_outcome(h, lambda: client.post(f"{path}/rotate"), _gen)
        elif kind == "release":
            target = rng.choice(run.names)
            with rec.invoke(self.process, "release", {"key": key, "node": target}, node) as h:
                body = {"node": target, "timeout": _RELEASE_WAIT}
                record_outcome(h, lambda: client.post(f"{path}/release", body), lambda a: a)
        elif kind == "read":
            with rec.invoke(self.process, "read", {"key": key}, node) as h:
                record_outcome(h, lambda: _read_key(client, path), lambda a: a)
        else:
            generation = rng.randint(1, 2)
            args = {"key": key, "generation": generation}
            with rec.invoke(self.process, "prove", args, node) as h:
                body = {**args, "challenge": rng.randbytes(8).hex()}
                record_outcome(h, lambda: client.post("/v1/service/prove", body), lambda a: a)


def _gen(answer: Any) -> dict[str, Any]:
    return {"generation": answer.get("generation") if isinstance(answer, dict) else None}


def _read_key(client: NodeClient, path: str) -> dict[str, Any]:
    try:
        answer = client.get(path, {"linearizable": "1"})
    except ApiError as exc:
        if exc.status == 404:
            return {"generation": 0}
        raise
    return {"generation": answer["generation"], "fingerprints": answer.get("fingerprints", {})}


class _Run:
    def __init__(self, cfg: ClusterConfig, config: RunConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.config, self.log = cfg, config, log
        #: The workload signs as the cluster's default identity (``KMSIM_IDENTITY``, or the
        #: development profile's admin).
        self.signer = default_signer(cfg)
        self.names = [n.name for n in cfg.nodes]
        self.recorder = HistoryRecorder()
        self.stop = threading.Event()
        self.nemesis = Nemesis(
            cfg,
            config.seed,
            resolve_kinds(cfg, config.faults),
            self.recorder,
            log,
            restart_timeout=config.converge_timeout,
        )
        # Fresh key names per run: the checker counts generations from each key's creation,
        # so keys left by an earlier run (at an unknown generation) must not be reused.
        self.key_prefix = f"s{config.seed}-{time.time_ns() % 10**9:09d}-k"

    def faults(self, deadline: float) -> None:
        """Quiet, inject, hold, heal, for as long as two intervals fit before ``deadline``."""
        interval = self.config.interval
        kinds = self.nemesis.schedule()
        while self.nemesis.kinds and time.monotonic() + 2 * interval <= deadline:
            time.sleep(interval)
            heal = self.nemesis.inject(next(kinds))
            try:
                time.sleep(interval)
            finally:
                heal()
        time.sleep(max(0.0, deadline - time.monotonic()))

    # --- after the run ----------------------------------------------------------------------

    def converge(self) -> None:
        """Wait until every node is ready and agrees on leader, term and applied index."""
        deadline = time.monotonic() + self.config.converge_timeout
        seen = "nothing yet"
        while time.monotonic() < deadline:
            try:
                statuses = [
                    NodeClient.for_node(self.cfg.node(n), 2.0).get("/v1/status") for n in self.names
                ]
            except KmsimError as exc:
                seen = exc.message
            else:
                views = {(s["leader"], s["term"], s["applied"]) for s in statuses}
                if all(s.get("ready") for s in statuses) and len(views) == 1:
                    return
                seen = "; ".join(
                    f"{n}: {'ready' if s.get('ready') else 'NOT ready'}, leader {s['leader']}, "
                    f"term {s['term']}, applied {s['applied']}"
                    for n, s in zip(self.names, statuses, strict=True)
                )
            time.sleep(0.2)
        raise RunError(f"the cluster did not converge in {self.config.converge_timeout:g}s: {seen}")

    def final_state(self) -> dict[str, NodeState]:
        states = {}
        lin = {"linearizable": "1"}
        for name in self.names:
            client = NodeClient.for_node(self.cfg.node(name), _CLIENT_TIMEOUT, self.signer)
            keys = client.get("/v1/keys", lin)["keys"]
            fingerprints = {
                k["name"]: client.get(f"/v1/keys/{urllib.parse.quote(k['name'], safe='')}", lin)[
                    "fingerprints"
                ]
                for k in keys
            }
            releases = client.get("/v1/releases", lin)["releases"]
            states[name] = NodeState.from_api(
                keys, releases, fingerprints, client.get("/v1/policy")
            )
        return states

    def plaintext(self, final: dict[str, NodeState], capture: MqttCapture) -> CheckOutcome:
        """Search every host-side file and MQTT message for the master secret and each key."""
        generations: dict[str, int] = {}
        for node_state in final.values():
            for key, generation in node_state.keys.items():
                generations[key] = max(generations.get(key, 0), generation)
        try:
            needles = oracle.secret_needles(self.cfg, generations)
        except oracle.OracleError as exc:
            return CheckOutcome(False, f"no secrets to search for: {exc}")
        haystacks = oracle.host_files([self.cfg.state_dir]) + capture.haystacks()
        outcome = check_plaintext(haystacks, needles)
        if capture.error is not None and outcome.valid:
            lost = f"MQTT capture incomplete ({capture.error}); {outcome.detail}"
            return CheckOutcome(False, lost)
        return outcome


def run(
    cfg: ClusterConfig,
    config: RunConfig,
    out_dir: Path,
    log: Callable[[str], None] = lambda _line: None,
) -> RunOutcome:
    """One chaos run against the running cluster ``cfg``; see the module docstring."""
    state = _Run(cfg, config, log)
    try:
        state.converge()
    except RunError as exc:
        raise RunError(f"the cluster is not up and converged before the run: {exc}") from None
    capture = MqttCapture.for_cluster(cfg)
    if config.scan_plaintext:
        try:
            capture.start()
        except CaptureError as exc:
            raise RunError(str(exc)) from None
    try:
        clients = [_Client(i, state) for i in range(config.clients)]
        for client in clients:
            client.start()
        try:
            state.faults(time.monotonic() + config.duration)
        finally:
            state.stop.set()
            for client in clients:
                client.join(_CLIENT_TIMEOUT + _RELEASE_WAIT + 5)
        clients_stopped = time.monotonic()
        state.nemesis.heal_everything()
        healed = time.monotonic()
        state.converge()
        recovery = time.monotonic() - healed
        log(f"converged {recovery:.2f}s after the final heal")
        final = state.final_state()
    except (RunError, KmsimError, FaultError) as exc:
        # The history is the evidence of what led here: keep it even without a verdict.
        saved = _save_history(state, out_dir)
        raise RunError(f"{exc} (history so far: {saved})") from None
    finally:
        capture.stop()
    history = state.recorder.history()
    history_path, final_path = _save_history(state, out_dir), out_dir / "final.json"
    final_path.write_text(
        json.dumps({n: s.to_json() for n, s in final.items()}, indent=1, sort_keys=True)
    )
    bound = config.recovery_bound
    observed = {
        "disk-damage-refused": state.nemesis.disk_check(),
        "poison": state.nemesis.poison_check(),
        "converged-after-heal": CheckOutcome(
            recovery <= bound,
            f"every node agreed {recovery:.2f}s after the final heal (bound {bound:g}s)",
        ),
    }
    if config.scan_plaintext:
        observed["no-plaintext-keys"] = state.plaintext(final, capture)
    judge = cfg.nodes[0].name
    observed["governance"] = check_ledger(raft_dir(cfg, judge), judge)
    result = check(
        history,
        final,
        recovery_bound=bound,
        recovery_until=clients_stopped,
        observed=observed,
    )
    return RunOutcome(result, history_path, final_path, state.nemesis.injected, recovery)


def _save_history(state: _Run, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "history.jsonl"
    state.recorder.history().save(path)
    return path
