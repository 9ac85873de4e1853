"""`kmctl chaos run`: a seeded nemesis and concurrent clients against a running local cluster,
recorded as a history and judged by the checker.

Clients are threads issuing random operations (create, rotate, release, linearizable read,
prove) on random nodes; each outcome is classified the way the history requires: ``ok`` for a
2xx, ``fail`` only when the cluster certainly did not act (refused by the state machine, bad
request, not the leader, not ready, unreachable), ``info`` otherwise (timeouts, dropped
connections, 503/504): an ``info`` operation may still take effect. The nemesis cycles through
faults chosen by the seed: quiet, inject, hold, heal. The seed fixes the schedule of faults and
the clients' choices; it cannot fix the timing of real processes, so two runs with one seed
inject the same faults but interleave differently.

After the run every fault is healed, the cluster must converge, and each node's committed
state is read (linearizably) as the checker's final state. History and final state are saved
in ``out_dir`` so a run can be re-checked offline.
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

from kmnode.chaos import faults
from kmnode.chaos.checker import CheckResult, NodeState, check
from kmnode.chaos.history import HistoryRecorder, OpHandle
from kmnode.cli.client import ApiError, NodeClient, NodeUnreachable
from kmnode.cli.output import CliError
from kmnode.config import ClusterConfig

FAULT_KINDS = ("partition", "loss", "kill", "pause", "service-crash", "torn-tail")
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
    faults: tuple[str, ...] = FAULT_KINDS
    keys: int = 4
    converge_timeout: float = 60.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if self.duration <= 0 or self.clients < 1 or self.interval <= 0 or self.keys < 1:
            raise ValueError("duration, interval, clients and keys must be positive")


@dataclass
class RunOutcome:
    result: CheckResult
    history_path: Path
    final_path: Path
    faults: list[dict[str, Any]] = field(default_factory=list)


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
    except CliError as exc:
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
        client = NodeClient.for_node(run.cfg.node(node), _CLIENT_TIMEOUT)
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
        self.names = [n.name for n in cfg.nodes]
        self.recorder = HistoryRecorder()
        self.stop = threading.Event()
        self.rng = random.Random(f"{config.seed}/nemesis")
        self.injected: list[dict[str, Any]] = []
        # Fresh key names per run: the checker counts generations from each key's creation,
        # so keys left by an earlier run (at an unknown generation) must not be reused.
        self.key_prefix = f"s{config.seed}-{time.time_ns() % 10**9:09d}-k"

    def api(self, node: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return NodeClient.for_node(self.cfg.node(node), 5.0).post(path, body or {})

    # --- the nemesis ------------------------------------------------------------------------

    def inject(self, kind: str) -> Callable[[], None]:
        """Start fault ``kind``; returns the function that heals it."""
        target = self.rng.choice(self.names)
        others = [n for n in self.names if n != target]
        detail: dict[str, Any] = {}
        if kind == "partition":
            for other in others:
                self.api(target, "/v1/chaos/rules", {"peer": other, "partition": True})
                self.api(other, "/v1/chaos/rules", {"peer": target, "partition": True})
            heal = self.heal_links
        elif kind == "loss":
            target = "all"
            rule = {"drop": 0.2, "delay_ms": 5, "jitter_ms": 5}
            for a in self.names:
                for b in self.names:
                    if a != b:
                        self.api(a, "/v1/chaos/rules", {"peer": b, **rule})
            detail = rule
            heal = self.heal_links
        elif kind in ("kill", "torn-tail"):
            detail = faults.kill(self.cfg, target).detail
            if kind == "torn-tail":
                detail = {**detail, **faults.torn_tail(self.cfg, target).detail}

            def heal() -> None:
                faults.restart(self.cfg, target, timeout=self.config.converge_timeout)

        elif kind == "pause":
            detail = faults.pause(self.cfg, target).detail

            def heal() -> None:
                faults.resume(self.cfg, target)

        else:
            try:
                detail = self.api(target, "/v1/chaos/service-crash")
            except ApiError as exc:  # 409: not running (crashed before, not yet restarted)
                detail = {"skipped": exc.message}

            def heal() -> None:
                """Nothing to do: the node restarts its service enclave on the next request."""

        self.recorder.fault_start(kind, target, **detail)
        self.injected.append({"fault": kind, "target": target, **detail})
        self.log(f"nemesis: {kind} {target}")

        def healed() -> None:
            heal()
            self.recorder.fault_stop(kind, target)
            self.log(f"nemesis: healed {kind} {target}")

        return healed

    def heal_links(self) -> None:
        for name in self.names:
            self.api(name, "/v1/chaos/heal")

    def nemesis(self, deadline: float) -> None:
        kinds = list(self.config.faults)
        while kinds and time.monotonic() + 2 * self.config.interval <= deadline:
            time.sleep(self.config.interval)
            heal = self.inject(self.rng.choice(kinds))
            try:
                time.sleep(self.config.interval)
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
            except CliError as exc:
                seen = exc.message
            else:
                views = {(s["leader"], s["term"], s["applied"]) for s in statuses}
                if all(s.get("ready") for s in statuses) and len(views) == 1:
                    return
                seen = f"leader/term/applied {sorted(views, key=str)}"
            time.sleep(0.2)
        raise RunError(f"the cluster did not converge in {self.config.converge_timeout:g}s: {seen}")

    def final_state(self) -> dict[str, NodeState]:
        states = {}
        lin = {"linearizable": "1"}
        for name in self.names:
            client = NodeClient.for_node(self.cfg.node(name), _CLIENT_TIMEOUT)
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
    clients = [_Client(i, state) for i in range(config.clients)]
    for client in clients:
        client.start()
    try:
        state.nemesis(time.monotonic() + config.duration)
    finally:
        state.stop.set()
        for client in clients:
            client.join(_CLIENT_TIMEOUT + _RELEASE_WAIT + 5)
    state.heal_links()
    state.converge()
    final = state.final_state()
    history = state.recorder.history()
    out_dir.mkdir(parents=True, exist_ok=True)
    history_path, final_path = out_dir / "history.jsonl", out_dir / "final.json"
    history.save(history_path)
    final_path.write_text(
        json.dumps({n: s.to_json() for n, s in final.items()}, indent=1, sort_keys=True)
    )
    result = check(history, final)
    return RunOutcome(result, history_path, final_path, state.injected)
