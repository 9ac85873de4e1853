"""The nemesis of `kmctl chaos run`: seeded faults injected into a live local cluster.

Every kind of fault the chaos tooling knows is here, each as "inject, then heal":

* links (through each sender's ``/v1/chaos/rules``): two-way and one-way partitions of one
  node, message loss with delay and jitter on every link, duplication on every link;
* real partitions with network namespaces (``netns-partition``; only when every node of the
  cluster runs in its own namespace, see docs/chaos-netns.md);
* processes: SIGKILL then restart, SIGSTOP then SIGCONT, the service enclave killed, the
  host's ring drain stalled;
* disks, on a killed node: a torn log tail (a crash mid-append; the node must repair it and
  rejoin), a flipped byte mid-log and tampered sealed state (damage no crash explains; the node
  must refuse to start, and is replaced by a fresh node, which must restore full membership);
* a hostile host (``poison``): the target's host feeds garbage into every input it holds (its
  KM enclave's circuit, its operator API, every member's peer port; ``kmnode.host.poison``);
  the node must not stop and no answer may be a 5xx or an internal failure (``poison_check``);
* a host tampering with contract state (``tamper-state``, only when named: it needs the
  contract workload): a record of the run's contract in the target's store is flipped,
  swapped with another, rolled back or dropped. The contract checks expect the node to halt
  saying it caught the tamper, or to go on answering correctly (the record not read again);
  the heal resyncs a halted node from a peer, as an operator would (``contract_repair``),
  which needs a committed checkpoint;
* a host tampering with a dataset's blob (``tamper-blob``, only when named: it needs the data
  workload): a bit of the target's copy of the run's blob is flipped. Computations on that
  node must end refused until the heal, which puts the owner's bytes back (the host stops
  tampering); a node with no copy (a replaced one) is recorded as skipped;
* every node losing its sealed state (``recover``, only when named: the run's signer must
  hold a share that reopens the cluster alone): all are killed and wiped, and the heal brings
  them back through disaster recovery, submitting the signer's share
  (``kmnode.chaos.recovery_fault``); when the signer cannot, it is skipped before anything
  is wiped, with the reason.

The order of kinds is a seeded shuffle, repeated, so a run with N fault slots covers
min(N, kinds) distinct kinds: a short CI run still exercises every kind across a few seeds.
A damaged node that starts anyway is recorded as a violation (``disk_check``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from kmnode import netns
from kmnode.chaos import faults, recovery_fault
from kmnode.chaos.checker import CheckOutcome, Violation
from kmnode.chaos.contract_repair import repair_if_halted
from kmnode.chaos.faults import FaultError
from kmnode.chaos.history import HistoryRecorder
from kmnode.client import ApiError, NodeClient, default_signer, upload_blob
from kmnode.config import ClusterConfig
from kmnode.datadir import BLOB_DIR
from kmnode.errors import KmsimError
from kmnode.host.contract_host import TAMPER_MODES

LINK_KINDS = ("partition", "partition-one-way", "loss", "duplicate")
PROCESS_KINDS = ("kill", "pause", "service-crash", "ring-stall")
DISK_KINDS = ("torn-tail", "flip-byte", "tamper-sealed")
INPUT_KINDS = ("poison",)
CONTRACT_KINDS = ("tamper-state",)
DATA_KINDS = ("tamper-blob",)
NETNS_KINDS = ("netns-partition",)
RECOVERY_KINDS = ("recover",)
FAULT_KINDS = (
    LINK_KINDS
    + PROCESS_KINDS
    + DISK_KINDS
    + INPUT_KINDS
    + CONTRACT_KINDS
    + DATA_KINDS
    + NETNS_KINDS
    + RECOVERY_KINDS
)
#: Kinds a run takes only when they are named (never under 'all'). ``recover`` wipes every
#: node's secrets and needs the run's signer to hold a share that reopens the cluster alone.
OPT_IN_KINDS = CONTRACT_KINDS + DATA_KINDS + RECOVERY_KINDS
#: Kinds that act on every node at once (recorded with the target "all").
CLUSTER_KINDS = ("loss", "duplicate", *RECOVERY_KINDS)
#: Damage no crash can leave behind: the node must refuse to start with it.
UNREPAIRABLE = ("flip-byte", "tamper-sealed")

LOSS_RULE: dict[str, Any] = {"drop": 0.2, "delay_ms": 5, "jitter_ms": 5}
DUPLICATE_RULE: dict[str, Any] = {"duplicate": 0.3, "delay_ms": 2, "jitter_ms": 2}

Heal = Callable[[], None]


def in_namespaces(cfg: ClusterConfig) -> bool:
    """Whether every node runs in a network namespace of its own (netns faults possible)."""
    spaces = [n.netns for n in cfg.nodes]
    return all(spaces) and len(set(spaces)) == len(spaces)


def available_kinds(cfg: ClusterConfig) -> tuple[str, ...]:
    """The kinds 'all' means for this cluster: netns partitions only for a cluster in
    namespaces, and no opt-in kind."""
    spaces = in_namespaces(cfg)
    return tuple(
        k for k in FAULT_KINDS if k not in OPT_IN_KINDS and (spaces or k not in NETNS_KINDS)
    )


def check_kinds(cfg: ClusterConfig, kinds: tuple[str, ...]) -> None:
    """ValueError naming what is wrong with a requested list of fault kinds."""
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
    if set(kinds) & set(NETNS_KINDS) and not in_namespaces(cfg):
        raise ValueError(
            "netns-partition needs every node in its own network namespace (nodes[].netns); "
            "see docs/chaos-netns.md"
        )


class Nemesis:
    def __init__(
        self,
        cfg: ClusterConfig,
        seed: int,
        kinds: tuple[str, ...],
        recorder: HistoryRecorder,
        log: Callable[[str], None],
        restart_timeout: float,
        contract: str | None = None,
        blob: tuple[str, bytes] | None = None,
    ) -> None:
        self.cfg, self.kinds, self.recorder, self.log = cfg, kinds, recorder, log
        #: The contract whose stored state ``tamper-state`` changes (None: any contract's).
        self.contract = contract
        #: The dataset blob (digest, the owner's ciphertext) ``tamper-blob`` flips a bit of.
        self.blob = blob
        self.restart_timeout = restart_timeout
        self.names = [n.name for n in cfg.nodes]
        self.rng = random.Random(f"{seed}/nemesis")
        self.injected: list[dict[str, Any]] = []
        #: Damaged nodes that started anyway (the log or the sealing failed to notice).
        self.undetected: list[Violation] = []
        self.refused: list[str] = []
        #: What poisoned hosts found (a 5xx, an internal failure, a node that stopped).
        self.poison_findings: list[Violation] = []
        self.poisoned = 0
        #: What a heal found worth recording with the fault's stop (by kind; one fault at a
        #: time): how a ``recover`` reopened the cluster.
        self.heal_notes: dict[str, dict[str, Any]] = {}
        #: Chaos requests are an admin's (``KMSIM_IDENTITY``, or the development profile's).
        self.signer = default_signer(cfg)

    def schedule(self) -> Iterator[str]:
        """The kinds in a seeded shuffle, reshuffled after each full round (never ends)."""
        while True:
            order = list(self.kinds)
            self.rng.shuffle(order)
            yield from order

    def inject(self, kind: str) -> Heal:
        """Start fault ``kind`` on a seeded target; returns the function that heals it."""
        target = self.rng.choice(self.names)
        detail, heal = self._start(kind, target)
        if kind in CLUSTER_KINDS:
            target = "all"
        self.recorder.fault_start(kind, target, **detail)
        entry = {"fault": kind, "target": target, **detail}
        self.injected.append(entry)
        self.log(
            f"nemesis: {kind} {target}"
            + (f" skipped: {detail['skipped']}" if "skipped" in detail else "")
        )

        def healed() -> None:
            heal()
            notes = self.heal_notes.pop(kind, {})
            entry.update(notes)
            self.recorder.fault_stop(kind, target, **notes)
            self.log(f"nemesis: healed {kind} {target}")

        return healed

    def _start(self, kind: str, target: str) -> tuple[dict[str, Any], Heal]:
        others = [n for n in self.names if n != target]
        if kind in ("partition", "partition-one-way"):
            for other in others:
                self._rule(target, other, {"partition": True})
                if kind == "partition":
                    self._rule(other, target, {"partition": True})
            return {}, self.heal_links
        if kind in ("loss", "duplicate"):
            rule = LOSS_RULE if kind == "loss" else DUPLICATE_RULE
            for a in self.names:
                for b in self.names:
                    if a != b:
                        self._rule(a, b, rule)
            return dict(rule), self.heal_links
        if kind == "netns-partition":
            for other in others:
                netns.partition(self.cfg, target, other)
            return {"isolated": target}, lambda: netns.heal(self.cfg)
        if kind == "kill":
            return faults.kill(self.cfg, target).detail, lambda: self._restart(target)
        if kind == "pause":
            return faults.pause(self.cfg, target).detail, lambda: self._resume(target)
        if kind == "service-crash":
            try:
                answer = self._api(target, "/v1/chaos/service-crash")
            except ApiError as exc:  # 409: not running (crashed before, not yet restarted)
                answer = {"skipped": exc.message}
            # Nothing to heal: the node restarts its service enclave on the next request.
            return answer, lambda: None
        if kind == "ring-stall":
            self._api(target, "/v1/chaos/ring-stall", {"stalled": True})
            return {}, lambda: self._unstall(target)
        if kind == "torn-tail":
            detail = faults.kill(self.cfg, target).detail
            detail.update(_damage(lambda: faults.torn_tail(self.cfg, target)))
            return detail, lambda: self._restart(target)
        if kind in UNREPAIRABLE:
            return self._unrepairable(kind, target)
        if kind == "poison":
            return self._poison(target)
        if kind == "tamper-state":
            return self._tamper_state(target), lambda: self._repair_contracts(target)
        if kind == "tamper-blob":
            return self._tamper_blob(target)
        if kind == "recover":
            return self._recover()
        raise ValueError(f"unknown fault kind {kind!r}")

    def _unrepairable(self, kind: str, target: str) -> tuple[dict[str, Any], Heal]:
        """Kill, damage, and check the node refuses to start; the heal replaces it."""
        detail = faults.kill(self.cfg, target).detail
        if kind == "flip-byte":
            damage = _damage(lambda: faults.flip_byte(self.cfg, target, "middle"))
        else:
            damage = _damage(lambda: faults.tamper_sealed(self.cfg, target))
        detail.update(damage)
        if "skipped" in damage:
            return detail, lambda: self._restart(target)
        try:
            faults.restart(self.cfg, target, timeout=self.restart_timeout)
        except FaultError as exc:
            detail["refused"] = str(exc).splitlines()[0]
            self.refused.append(f"{kind} {target}")
            return detail, lambda: self._replace(target)
        made = f"{target} started although its {kind} damage was made: {damage}"
        self.undetected.append(Violation(made, None, target))
        return detail, lambda: None

    def _poison(self, target: str) -> tuple[dict[str, Any], Heal]:
        """Turn the target's host hostile; the heal turns it back and judges what happened."""
        pid = faults.live_pid(self.cfg, target)
        seed = self.rng.randrange(2**32)
        self._api(target, "/v1/chaos/poison", {"enabled": True, "seed": seed})

        def heal() -> None:
            self.poisoned += 1
            try:
                answer = self._api(target, "/v1/chaos/poison", {"enabled": False})
            except (ApiError, OSError) as exc:
                answer = {"stats": {"problems": [f"poison could not be stopped: {exc}"]}}
            for problem in answer.get("stats", {}).get("problems", []):
                self.poison_findings.append(Violation(f"poison: {problem}", None, target))
            if faults.live_pid(self.cfg, target) != pid:
                stopped = f"{target} stopped while its host fed it garbage (pid {pid})"
                self.poison_findings.append(Violation(stopped, None, target))
            self.log(f"nemesis: poison {target}: {answer.get('stats', {}).get('sent', {})}")

        return {"seed": seed}, heal

    def _tamper_state(self, target: str) -> dict[str, Any]:
        """Have the target's host change a stored record of the run's contract (a seeded
        mode); nothing to change yet (no record written back) is recorded as skipped."""
        body: dict[str, Any] = {
            "mode": self.rng.choice(TAMPER_MODES),
            "seed": self.rng.randrange(2**63),
        }
        if self.contract is not None:
            body["contract"] = self.contract
        try:
            answer = self._api(target, "/v1/chaos/tamper-state", body)
        except ApiError as exc:
            return {"mode": body["mode"], "skipped": exc.message}
        return {"mode": body["mode"], "tampered": answer.get("tampered")}

    def _tamper_blob(self, target: str) -> tuple[dict[str, Any], Heal]:
        """Have the target's host flip a bit of its copy of the run's blob; the heal puts the
        owner's bytes back. A node without a copy is recorded as skipped."""
        if self.blob is None:
            raise ValueError("tamper-blob needs the data workload's dataset")
        digest = self.blob[0]
        try:
            self._api(target, "/v1/chaos/tamper-blob", {"digest": digest})
        except ApiError as exc:  # 409: no copy here (a replaced node never got one)
            return {"digest": digest[:16], "skipped": exc.message}, lambda: None
        return {"digest": digest[:16]}, lambda: self._restore_blob(target)

    def _restore_blob(self, target: str) -> None:
        """The host stops tampering: its copy is removed and the owner's bytes uploaded again
        through the host's own route (which stores only bytes of the right digest). A failure
        leaves the node without a copy (its computations are refused), and is logged."""
        assert self.blob is not None  # a tamper-blob was made
        digest, ciphertext = self.blob
        try:
            (faults.data_dir(self.cfg, target) / BLOB_DIR / digest).unlink(missing_ok=True)
            upload_blob(self.cfg.node(target), digest, ciphertext)
        except (OSError, KmsimError) as exc:
            self.log(f"nemesis: {target}'s blob could not be restored: {exc}")

    def _recover(self) -> tuple[dict[str, Any], Heal]:
        """Every node loses its sealed state; the heal reopens the cluster with the signer's
        share. Skipped, with nothing touched, when that share cannot reopen it alone."""
        try:
            held = recovery_fault.held_share(self.cfg, self.signer, self.restart_timeout)
        except recovery_fault.RecoveryUnavailable as exc:
            return {"skipped": str(exc)}, lambda: None
        assert self.signer is not None  # held_share needs one
        signer = self.signer
        detail = {**held.detail(), **recovery_fault.lose_every_sealed_state(self.cfg)}

        def heal() -> None:
            notes = recovery_fault.reopen(self.cfg, signer, self.restart_timeout, self.log)
            self.heal_notes["recover"] = notes

        return detail, heal

    # --- heals --------------------------------------------------------------------------------

    def heal_links(self) -> None:
        for name in self.names:
            self._api(name, "/v1/chaos/heal")

    def heal_everything(self) -> None:
        """The end of a run: links healed (and namespaces, if any); processes are healed by
        their own heals, which always run."""
        self.heal_links()
        if in_namespaces(self.cfg):
            netns.heal(self.cfg)

    def _restart(self, target: str) -> None:
        faults.restart(self.cfg, target, timeout=self.restart_timeout)

    def _replace(self, target: str) -> None:
        """Replace the member, then repair its contract state as an operator would
        (``contract_repair``): a fresh node cannot rebuild state whose operations the
        cluster no longer keeps. A failed repair leaves it halted, for the checks to see."""
        faults.replace(self.cfg, target, timeout=self.restart_timeout)
        self._repair_contracts(target)

    def _repair_contracts(self, target: str) -> None:
        """Resync the target's contract state from a peer if it stopped executing."""
        try:
            done = repair_if_halted(self.cfg, target, self.signer, self.restart_timeout)
        except KmsimError as exc:
            done = {"failed": exc.message}
        if done:
            self.log(f"nemesis: resync of {target}'s contract state: {done}")

    def _resume(self, target: str) -> None:
        faults.resume(self.cfg, target)

    def _unstall(self, target: str) -> None:
        self._api(target, "/v1/chaos/ring-stall", {"stalled": False})

    def _rule(self, sender: str, peer: str, rule: dict[str, Any]) -> None:
        self._api(sender, "/v1/chaos/rules", {"peer": peer, **rule})

    def _api(self, node: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return NodeClient.for_node(self.cfg.node(node), 5.0, self.signer).post(path, body or {})

    # --- the verdict on disk damage -----------------------------------------------------------

    def disk_check(self) -> CheckOutcome:
        """Every unrepairable damage must have made its node refuse to start."""
        return CheckOutcome.judge(
            self.undetected,
            f"{len(self.refused)} damaged node(s) refused to start and were replaced"
            + (f" ({', '.join(self.refused)})" if self.refused else ""),
        )

    def poison_check(self) -> CheckOutcome:
        """Every poisoned node kept running and never answered garbage with a 5xx or an
        internal failure."""
        return CheckOutcome.judge(
            self.poison_findings, f"{self.poisoned} poisoned host(s): no node stopped, no 5xx"
        )


def _damage(make: Callable[[], faults.FaultDone]) -> dict[str, Any]:
    """The damage's detail, or why there was nothing to damage (a log too short to hold a
    record in the middle, say): the fault then degrades to a kill and restart."""
    try:
        return make().detail
    except FaultError as exc:
        return {"skipped": str(exc)}


def resolve_kinds(cfg: ClusterConfig, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The kinds a run cycles through: the requested ones, checked, or all the cluster takes."""
    if requested is None:
        return available_kinds(cfg)
    check_kinds(cfg, requested)
    return requested  # empty: a baseline run without faults
