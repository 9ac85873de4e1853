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

With ``contracts`` (the default) the run also deploys a fresh token contract and mixes token
calls into the clients' operations (``kmnode.chaos.contract_workload``); after healing, the
contract checks (``kmnode.chaos.contract_checks``) judge the nodes' published results, their
state roots, the clients' results against a reference replay, and search the host side for
the calls' arguments and results. The history, which holds those in clear, is the client's
record: that scan leaves the files at the top of ``out_dir`` out.

With ``data`` (the default) the run also registers a fresh dataset, grants its use and mixes
computations, new grants and revocations into the clients' operations
(``kmnode.chaos.data_workload``); the capture then takes the users' results topics too. After
healing, the data checks (``kmnode.chaos.data_checks``) judge every node's tokens against
their grants, the tokens' signed bytes across nodes, the results published on MQTT (opened
with every identity key the run holds), computations during a ``tamper-blob``, and that every
token ended; the host side is searched for the dataset's marker, its data key and plaintext,
and the results' values.
"""

from __future__ import annotations

import dataclasses
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
from kmnode.chaos.contract_calls import CallAnswer
from kmnode.chaos.contract_checks import (
    check_contract_reference,
    check_contract_results,
    check_contract_roots,
    contract_needles,
    tampered_nodes,
)
from kmnode.chaos.contract_evidence import ContractEvidence
from kmnode.chaos.contract_workload import TokenWorkload
from kmnode.chaos.data_checks import (
    check_data_determinism,
    check_data_liveness,
    check_data_results,
    check_data_tamper,
    check_data_tokens,
    data_needles,
)
from kmnode.chaos.data_evidence import DataEvidence, user_results_filter
from kmnode.chaos.data_workload import DataWorkload
from kmnode.chaos.faults import FaultError, raft_dir
from kmnode.chaos.governance import check_ledger
from kmnode.chaos.history import History, HistoryRecorder, OpHandle
from kmnode.chaos.nemesis import CONTRACT_KINDS, DATA_KINDS, FAULT_KINDS, Nemesis, resolve_kinds
from kmnode.client import ApiError, NodeClient, NodeUnreachable, default_signer
from kmnode.config import ClusterConfig
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys

_CLIENT_TIMEOUT = 10.0
_RELEASE_WAIT = 5.0
#: API errors after which the cluster certainly did not act on the request.
_CERTAIN_FAILURES = {"refused", "bad_request", "not_found", "not_leader", "not_ready"}
#: The share of the clients' operations that are contract calls (with ``contracts``).
CONTRACT_SHARE = 0.2
#: The share that are data operations (with ``data``).
DATA_SHARE = 0.2


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
    #: Deploy a token contract and mix its calls into the workload (and check them).
    contracts: bool = True
    #: Register a dataset and mix computations, grants and revocations into the workload.
    data: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults or ()) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if not self.contracts and set(self.faults or ()) & set(CONTRACT_KINDS):
            raise ValueError("tamper-state needs the contract workload (drop --no-contracts)")
        if not self.data and set(self.faults or ()) & set(DATA_KINDS):
            raise ValueError("tamper-blob needs the data workload (drop --no-data)")
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
        share = rng.random() if run.workload is not None or run.data is not None else 1.0
        if run.workload is not None and share < CONTRACT_SHARE:
            self.contract_op(run.workload, node, client)
            return
        if run.data is not None and share >= 1.0 - DATA_SHARE:
            self.data_op(run.data, node, client)
            return
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

    def contract_op(self, workload: TokenWorkload, node: str, client: NodeClient) -> None:
        call = workload.next_call(self.rng)
        with self.run_.recorder.invoke(self.process, "contract.call", call.to_args(), node) as h:
            record_outcome(h, lambda: workload.perform(client, call), CallAnswer.to_value)

    def data_op(self, workload: DataWorkload, node: str, client: NodeClient) -> None:
        kind, args = workload.next_op(self.rng, node)
        with self.run_.recorder.invoke(self.process, kind, args.to_json(), node) as h:
            record_outcome(h, lambda: workload.perform(client, args), lambda a: a.to_json())


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


def contracts_unavailable(cfg: ClusterConfig, signer: IdentityKeys | None) -> str:
    """Why the workload's identity cannot deploy and call contracts ("" if it can): it must
    hold the operator role (to deploy) and the user role (to call). An identity cluster.yaml
    does not list (the development profile's) has them."""
    if signer is None:
        return "no signing identity (KMSIM_IDENTITY)"
    listed = next((i for i in cfg.identities if i.name == signer.name), None)
    if listed is not None and not (listed.may("operator") and listed.may("user")):
        return f"{signer.name!r} ({', '.join(listed.roles)}) lacks the operator or user role"
    return ""


def data_unavailable(cfg: ClusterConfig, signer: IdentityKeys | None) -> str:
    """Why the workload's identity cannot own a dataset and compute on it ("" if it can): it
    must hold the owner role (to register and grant) and the user role (to compute). An
    identity cluster.yaml does not list (the development profile's) has them."""
    if signer is None:
        return "no signing identity (KMSIM_IDENTITY)"
    listed = next((i for i in cfg.identities if i.name == signer.name), None)
    if listed is not None and not (listed.may("owner") and listed.may("user")):
        return f"{signer.name!r} ({', '.join(listed.roles)}) lacks the owner or user role"
    return ""


class _Run:
    def __init__(self, cfg: ClusterConfig, config: RunConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.config, self.log = cfg, config, log
        #: The workload signs as the cluster's default identity (``KMSIM_IDENTITY``, or the
        #: development profile's admin).
        self.signer = default_signer(cfg)
        self.names = [n.name for n in cfg.nodes]
        self.recorder = HistoryRecorder()
        self.stop = threading.Event()
        self.workload: TokenWorkload | None = None
        if config.contracts:
            if self.signer is None:
                raise RunError("the contract workload needs a signing identity (KMSIM_IDENTITY)")
            self.workload = TokenWorkload(cfg, self.signer, config.seed)
        self.data: DataWorkload | None = None
        if config.data:
            if self.signer is None:
                raise RunError("the data workload needs a signing identity (KMSIM_IDENTITY)")
            self.data = DataWorkload(cfg, self.signer, config.seed)
        self.nemesis = Nemesis(
            cfg,
            config.seed,
            resolve_kinds(cfg, config.faults),
            self.recorder,
            log,
            restart_timeout=config.converge_timeout,
            contract=None if self.workload is None else self.workload.contract,
            blob=None if self.data is None else self.data.blob,
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
        return _complete(check_plaintext(haystacks, needles), capture)

    def contract_plaintext(
        self, history: History, capture: MqttCapture, out_dir: Path
    ) -> CheckOutcome:
        """Search the host side (every file but the client's own record, and MQTT) for the
        contract calls' markers, amounts and results. The client's record is the files at
        the top of ``out_dir`` (history, final state, report); only those: a sweep keeps the
        cluster's state directory below it."""
        needles = contract_needles(history.operations())
        return _complete(check_plaintext(self.host_side(capture, out_dir), needles), capture)

    def host_side(self, capture: MqttCapture, out_dir: Path) -> list[tuple[str, bytes]]:
        """Every host-side file but the client's own record (the files at the top of
        ``out_dir``), and everything captured on MQTT."""
        client_side = out_dir.resolve()
        files = [
            (path, data)
            for path, data in oracle.host_files([self.cfg.state_dir])
            if Path(path).resolve().parent != client_side
        ]
        return files + capture.haystacks()

    def contract_checks(
        self, history: History, evidence: ContractEvidence, code: bytes
    ) -> dict[str, CheckOutcome]:
        ops = history.operations()
        return {
            "contract-results": check_contract_results(ops, evidence.records),
            "contract-roots": check_contract_roots(
                evidence.nodes, tampered_nodes(history.faults())
            ),
            "contract-reference": check_contract_reference(ops, evidence, code),
        }

    def data_checks(
        self, history: History, evidence: DataEvidence, capture: MqttCapture, out_dir: Path
    ) -> dict[str, CheckOutcome]:
        """The data checks and, with ``scan_plaintext``, the search of the host side for the
        dataset's marker, data key and plaintext, and its results' values."""
        assert self.data is not None  # only with the data workload
        ops = history.operations()
        checks = {
            "data-tokens": check_data_tokens(ops, evidence),
            "data-determinism": check_data_determinism(evidence),
            "data-results": _complete(
                check_data_results(ops, evidence, self.data.keyring()), capture
            ),
            "data-tamper": check_data_tamper(ops, history.faults()),
            "data-liveness": check_data_liveness(evidence),
        }
        if self.config.scan_plaintext:
            needles = data_needles(ops) + self.data.secrets()
            scan = check_plaintext(self.host_side(capture, out_dir), needles)
            checks["no-plaintext-data"] = _complete(scan, capture)
        return checks


def _capture(cfg: ClusterConfig, config: RunConfig) -> MqttCapture:
    """The capture of every node topic, and with ``data`` every user's results topic."""
    capture = MqttCapture.for_cluster(cfg)
    if not config.data:
        return capture
    users = user_results_filter(cfg.mqtt.topic_prefix, cfg.cluster)
    return MqttCapture(capture.address, [*capture.filters, users])


def _complete(outcome: CheckOutcome, capture: MqttCapture) -> CheckOutcome:
    """A scan that passed over an incomplete MQTT capture proves nothing: invalid."""
    if capture.error is not None and outcome.valid:
        return CheckOutcome(False, f"MQTT capture incomplete ({capture.error}); {outcome.detail}")
    return outcome


def run(
    cfg: ClusterConfig,
    config: RunConfig,
    out_dir: Path,
    log: Callable[[str], None] = lambda _line: None,
) -> RunOutcome:
    """One chaos run against the running cluster ``cfg``; see the module docstring."""
    if config.contracts:
        why = contracts_unavailable(cfg, default_signer(cfg))
        if why:
            log(f"contracts: not run ({why}; --no-contracts says so)")
            config = dataclasses.replace(config, contracts=False)
    if config.data:
        why = data_unavailable(cfg, default_signer(cfg))
        if why and set(config.faults or ()) & set(DATA_KINDS):
            raise RunError(f"tamper-blob needs the data workload, which cannot run: {why}")
        if why:
            log(f"data: not run ({why}; --no-data says so)")
            config = dataclasses.replace(config, data=False)
    state = _Run(cfg, config, log)
    try:
        state.converge()
    except RunError as exc:
        raise RunError(f"the cluster is not up and converged before the run: {exc}") from None
    capture = _capture(cfg, config)
    if config.scan_plaintext or config.contracts or config.data:
        try:
            capture.start()
        except CaptureError as exc:
            raise RunError(str(exc)) from None
    evidence: ContractEvidence | None = None
    data_evidence: DataEvidence | None = None
    try:
        if state.workload is not None:
            state.workload.setup(state.recorder)
            log(f"contracts: deployed {state.workload.contract} and called init")
        if state.data is not None:
            state.data.setup(state.recorder)
            log(f"data: registered {state.data.dataset} and granted its use")
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
        if state.workload is not None:
            evidence = state.workload.collect(lambda: capture.messages, config.converge_timeout)
        if state.data is not None:
            data_evidence = state.data.collect(lambda: capture.messages, config.converge_timeout)
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
    if state.workload is not None and evidence is not None:
        (out_dir / "contracts.json").write_text(json.dumps(evidence.to_json(), indent=1))
        observed.update(state.contract_checks(history, evidence, state.workload.code))
        if config.scan_plaintext:
            observed["no-plaintext-contracts"] = state.contract_plaintext(history, capture, out_dir)
    if data_evidence is not None:
        (out_dir / "data.json").write_text(json.dumps(data_evidence.to_json(), indent=1))
        observed.update(state.data_checks(history, data_evidence, capture, out_dir))
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
