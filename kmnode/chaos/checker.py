"""The checker: does a chaos run's history, plus what every node holds after healing, keep the
cluster's promises (DESIGN.md, "Chaos and checking")?

Each invariant is a named check returning a ``CheckOutcome`` with the first violation (ordered
by the history position of the operation that exposes it; violations only visible in the final
state come after those). Everything here is a pure function of its arguments, so each check is
tested against hand-made bad histories and against generated correct ones.

``final_state`` maps each node the runner could read after healing (and after waiting for the
nodes to converge) to a ``NodeState``: its committed releases, key generations, the key
fingerprints it derives per (key, generation), and the service measurements each key may go to.

The per-key linearizability check (``linearizable.py``) and the plaintext scan
(``plaintext.py``) have modules of their own; ``check`` runs them with the rest and their
entry points are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kmnode.chaos.history import FaultEvent, History, Operation
from kmnode.chaos.linearizable import (
    INCREMENTS,
    check_linearizable,
    observed_generation,
    ops_by_created_key,
)
from kmnode.chaos.outcome import CheckOutcome, Violation
from kmnode.chaos.plaintext import PlaintextHit, check_plaintext, scan_plaintext

TERMINAL = ("provisioned", "refused")


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    checks: dict[str, CheckOutcome]
    stats: dict[str, dict[str, int]]  #: op kind -> outcome -> count
    faults: dict[str, int]  #: fault kind -> times started

    def rows(self) -> list[tuple[str, str, str]]:
        """(check, "ok"/"FAIL", detail) per check, for a table."""
        return [(n, "ok" if c.valid else "FAIL", c.detail) for n, c in self.checks.items()]

    def summary(self) -> str:
        width = max((len(n) for n in self.checks), default=5)
        lines = [f"{'check':<{width}}  result  detail"]
        lines += [f"{n:<{width}}  {r:<6}  {d}" for n, r, d in self.rows()]
        for kind, counts in sorted(self.stats.items()):
            lines.append(f"ops {kind}: " + " ".join(f"{o}={c}" for o, c in sorted(counts.items())))
        faults = " ".join(f"{k}={c}" for k, c in sorted(self.faults.items())) or "none"
        lines.append(f"faults: {faults}")
        lines.append("VALID" if self.valid else "INVALID")
        return "\n".join(lines)


# --- final state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    id: str
    key: str
    generation: int
    node: str
    status: str  #: requested | provisioned | refused
    service_measurement: str = ""


@dataclass(frozen=True)
class NodeState:
    """What one node reports after healing (read with ``?linearizable=1``)."""

    keys: Mapping[str, int] = field(default_factory=dict)  #: name -> generation
    releases: Mapping[str, ReleaseRecord] = field(default_factory=dict)  #: id -> release
    fingerprints: Mapping[tuple[str, int], str] = field(default_factory=dict)
    #: Measurements each key may be provisioned to (the key's own list); keys absent or with an
    #: empty set fall back to ``default_allowed`` (the policy's service measurements). A runner
    #: that changes policy during the run passes every measurement that was allowed at any time.
    allowed_service: Mapping[str, frozenset[str]] = field(default_factory=dict)
    default_allowed: frozenset[str] = frozenset()

    def allowed_for(self, key: str) -> frozenset[str]:
        return self.allowed_service.get(key) or self.default_allowed

    @classmethod
    def from_api(
        cls,
        keys: Iterable[Mapping[str, Any]],
        releases: Iterable[Mapping[str, Any]],
        fingerprints: Mapping[str, Mapping[str, str]],
        policy: Mapping[str, Any],
    ) -> NodeState:
        """Build from the operator API's answers: ``GET /v1/keys`` ["keys"], ``GET
        /v1/releases`` ["releases"], each ``GET /v1/keys/{name}`` ["fingerprints"] by key
        name, and ``GET /v1/policy`` — so the runner does not re-derive any field."""
        return cls(
            keys={str(k["name"]): int(k["generation"]) for k in keys},
            releases={
                str(r["id"]): ReleaseRecord(
                    str(r["id"]),
                    str(r["key"]),
                    int(r["generation"]),
                    str(r["node"]),
                    str(r["status"]),
                    str(r.get("service_measurement", "")),
                )
                for r in releases
            },
            fingerprints={
                (name, int(gen)): str(fp)
                for name, by_gen in fingerprints.items()
                for gen, fp in by_gen.items()
            },
            allowed_service={
                str(k["name"]): frozenset(k.get("allowed_service") or ()) for k in keys
            },
            default_allowed=frozenset(policy.get("measurements", {}).get("service", ())),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON form (saved next to the history, so a run can be re-checked offline)."""
        return {
            "keys": dict(self.keys),
            "releases": [asdict(r) for r in self.releases.values()],
            "fingerprints": [[k, g, fp] for (k, g), fp in sorted(self.fingerprints.items())],
            "allowed_service": {k: sorted(v) for k, v in self.allowed_service.items()},
            "default_allowed": sorted(self.default_allowed),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeState:
        return cls(
            keys=dict(data["keys"]),
            releases={r["id"]: ReleaseRecord(**r) for r in data["releases"]},
            fingerprints={(k, g): fp for k, g, fp in data["fingerprints"]},
            allowed_service={k: frozenset(v) for k, v in data["allowed_service"].items()},
            default_allowed=frozenset(data["default_allowed"]),
        )


FinalState = Mapping[str, NodeState]


# --- the entry point ---------------------------------------------------------------------------


def check(
    history: History,
    final_state: FinalState,
    *,
    haystacks: Sequence[tuple[str, bytes]] | None = None,
    needles: Sequence[bytes] = (),
    recovery_bound: float | None = None,
    heal_time: float | None = None,
    recovery_until: float = math.inf,
    observed: Mapping[str, CheckOutcome] | None = None,
) -> CheckResult:
    """Run every check; the plaintext scan and the recovery bound only when given their inputs.
    ``observed``: verdicts the runner reached while the run went on (a damaged node that did
    not refuse to start, say), judged with the rest."""
    ops = history.operations()
    checks = {
        "release-committed": check_release_committed(ops, final_state),
        "allowed-measurement": check_allowed_measurement(ops, final_state),
        "identical-keys": check_identical_keys(ops, final_state),
        "no-lost-ops": check_no_lost_ops(ops, final_state),
        "linearizable-keys": check_linearizable(ops),
    }
    if haystacks is not None:
        checks["no-plaintext-keys"] = check_plaintext(haystacks, needles)
    if recovery_bound is not None:
        checks["recovery"] = check_recovery(history, recovery_bound, heal_time, recovery_until)
    checks.update(observed or {})
    stats: dict[str, dict[str, int]] = defaultdict(dict)
    for (kind, outcome), count in Counter((o.kind, o.outcome) for o in ops).items():
        stats[kind][outcome] = count
    faults = Counter(f.fault for f in history.faults() if f.phase == "start")
    return CheckResult(
        valid=all(c.valid for c in checks.values()),
        checks=checks,
        stats=dict(stats),
        faults=dict(faults),
    )


# --- helpers ------------------------------------------------------------------------------------


def _ok(ops: Iterable[Operation], kind: str) -> list[Operation]:
    return [o for o in ops if o.kind == kind and o.outcome == "ok"]


def _reported_releases(op: Operation) -> list[dict[str, Any]]:
    """The release entries an ok ``release`` op was told about (malformed entries dropped)."""
    value = op.value if isinstance(op.value, dict) else {}
    entries = value.get("releases", [])
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _release_op_index(ops: Iterable[Operation]) -> dict[str, Operation]:
    """Release id -> the first ok ``release`` op that reported it."""
    found: dict[str, Operation] = {}
    for op in _ok(ops, "release"):
        for entry in _reported_releases(op):
            found.setdefault(str(entry.get("release")), op)
    return found


# --- no release without a committed request ----------------------------------------------------


def check_release_committed(ops: Sequence[Operation], final: FinalState) -> CheckOutcome:
    """Every key a service enclave proved to hold, and every release a client was told was
    provisioned, must be backed on every node by a committed release request of that
    (key, generation) to that node which was not refused: a key reaching a service without a
    committed request is exactly what the Raft agreement exists to prevent. ``requested``
    backs it too: the key may reach the service before its outcome entry commits (whether the
    told status survived is ``no-lost-ops``'s business). The final state cannot show *when* a
    request committed, so a proof that preceded its request is not detectable here."""
    evidence: list[tuple[Operation, str, Any, Any, str | None]] = []
    for op in _ok(ops, "prove"):
        value = op.value if isinstance(op.value, dict) else {}
        key = value.get("key", op.args.get("key"))
        gen = value.get("generation", op.args.get("generation"))
        evidence.append((op, str(value.get("node") or op.node), key, gen, None))
    for op in _ok(ops, "release"):
        for e in _reported_releases(op):
            if e.get("status") == "provisioned":
                release_id = str(e.get("release"))
                evidence.append(
                    (op, str(e.get("node")), e.get("key"), e.get("generation"), release_id)
                )
    violations = []
    for op, target, key, gen, wanted in evidence:
        for name, state in sorted(final.items()):
            backed = any(
                r.key == key
                and r.generation == gen
                and r.node == target
                and r.status != "refused"
                and wanted in (None, r.id)
                for r in state.releases.values()
            )
            if not backed:
                what = f"release {wanted}" if wanted else "a proof"
                violations.append(
                    Violation(
                        f"{what} of {key!r} g{gen} on {target} has no committed, unrefused "
                        f"release request on {name}",
                        op,
                        name,
                    )
                )
    return CheckOutcome.judge(violations, f"{len(evidence)} provisions all committed")


# --- provisioned only to allowed measurements -----------------------------------------------


def check_allowed_measurement(ops: Sequence[Operation], final: FinalState) -> CheckOutcome:
    """A provisioned release names the service measurement the KM enclave locally attested;
    it must be one the key (or the policy) allows, on every node's copy of the record."""
    by_release = _release_op_index(ops)
    violations = []
    count = 0
    for name, state in sorted(final.items()):
        for r in state.releases.values():
            if r.status != "provisioned":
                continue
            count += 1
            if not r.service_measurement or r.service_measurement not in state.allowed_for(r.key):
                shown = r.service_measurement[:16] or "(none)"
                violations.append(
                    Violation(
                        f"release {r.id} of {r.key!r} g{r.generation} provisioned to {r.node} for "
                        f"measurement {shown}, not allowed on {name}",
                        by_release.get(r.id),
                        name,
                    )
                )
    return CheckOutcome.judge(violations, f"{count} provisioned records, all to allowed services")


# --- identical keys -----------------------------------------------------------------------------


def check_identical_keys(ops: Sequence[Operation], final: FinalState) -> CheckOutcome:
    """All nodes must derive the same key bytes for a (key, generation) — compared through
    fingerprints, which are equal iff the keys are — and distinct (key, generation) pairs must
    derive distinct keys (a rotation that changes nothing is not a rotation). A node that
    reports fingerprints for a key must report every generation up to its current one (the API
    shows them all: a gap means it cannot derive that key). Fingerprints that clients read
    during the run must match the final ones too."""
    violations = []
    agreed: dict[tuple[str, int], str] = {}
    per_pair: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
    for name, state in sorted(final.items()):
        seen: dict[str, tuple[str, int]] = {}
        for pair, fp in sorted(state.fingerprints.items()):
            per_pair[pair][name] = fp
            if fp in seen:
                violations.append(
                    Violation(f"{name} derives the same key for {seen[fp]} and {pair}", None, name)
                )
            seen[fp] = pair
        for key in sorted({k for k, _ in state.fingerprints}):
            missing = [
                g
                for g in range(1, state.keys.get(key, 0) + 1)
                if (key, g) not in state.fingerprints
            ]
            if missing:
                violations.append(
                    Violation(f"{name} reports no fingerprint for {key!r} g{missing}", None, name)
                )
    for pair, by_node in sorted(per_pair.items()):
        distinct = sorted(set(by_node.values()))
        if len(distinct) > 1:
            shown = ", ".join(f"{n}={fp[:12]}" for n, fp in sorted(by_node.items()))
            violations.append(Violation(f"key {pair[0]!r} g{pair[1]} differs: {shown}"))
        else:
            agreed[pair] = distinct[0]
    for op in _ok(ops, "read"):
        fps = op.value.get("fingerprints") if isinstance(op.value, dict) else None
        read_key = op.key
        if not isinstance(fps, dict) or read_key is None:
            continue
        for gen, fp in fps.items():
            final_fp = agreed.get((read_key, int(gen))) if str(gen).isdigit() else None
            if final_fp is not None and fp != final_fp:
                violations.append(
                    Violation(
                        f"read saw {read_key!r} g{gen} as {str(fp)[:12]}, final is {final_fp[:12]}",
                        op,
                    )
                )
    return CheckOutcome.judge(violations, f"{len(per_pair)} (key, generation) agree on all nodes")


# --- no lost committed operation ---------------------------------------------------------------


def check_no_lost_ops(ops: Sequence[Operation], final: FinalState) -> CheckOutcome:
    """Nothing a client was told happened may be missing afterwards: every ok create leaves the
    key on every node, every ok rotation's generation is reached, every release an ok op or read
    reported exists everywhere with the same target and a terminal status it was seen with.
    Each touched key's final generation lies between what must have happened (ok increments,
    and any generation observed) and what may have (one create plus every ok or info rotation),
    and all nodes agree."""
    if not final:
        return CheckOutcome.judge([Violation("no node state was collected")], "")
    violations: list[Violation] = []
    violations += _lost_keys(ops, final)
    violations += _lost_releases(ops, final)
    return CheckOutcome.judge(violations, f"{len(ops)} ops against {len(final)} nodes: none lost")


def _lost_keys(ops: Sequence[Operation], final: FinalState) -> list[Violation]:
    violations = []
    for key, key_ops in sorted(ops_by_created_key(ops).items()):
        incs = [o for o in key_ops if o.kind in INCREMENTS]
        ok = [o for o in incs if o.outcome == "ok"]
        ok_rot = [o for o in ok if o.kind == "key.rotate"]
        maybe_rot = [o for o in incs if o.kind == "key.rotate" and o.outcome != "fail"]
        created = any(o.kind == "key.create" and o.outcome != "fail" for o in incs)
        seen = [observed_generation(o.value) or 0 for o in key_ops if o.outcome == "ok"]
        lower = max([len(ok_rot) + 1 if ok else 0, *seen])
        upper = int(created) + len(maybe_rot)
        gens = {name: state.keys.get(key, 0) for name, state in final.items()}
        for name, gen in sorted(gens.items()):
            if gen < lower:
                culprit = next(
                    (
                        o
                        for o in key_ops
                        if o.outcome == "ok" and (observed_generation(o.value) or 0) > gen
                    ),
                    ok[-1] if ok else key_ops[-1],
                )
                violations.append(
                    Violation(
                        f"{name} has {key!r} at g{gen}, below the g{lower} that ok operations "
                        "reached",
                        culprit,
                        name,
                    )
                )
            elif gen > upper:
                violations.append(
                    Violation(
                        f"{name} has {key!r} at g{gen}, above the g{upper} that ok and info "
                        f"operations allow",
                        incs[-1],
                        name,
                    )
                )
        if len(set(gens.values())) > 1:
            shown = ", ".join(f"{n}=g{g}" for n, g in sorted(gens.items()))
            violations.append(Violation(f"nodes disagree on {key!r}: {shown}"))
    return violations


def _lost_releases(ops: Sequence[Operation], final: FinalState) -> list[Violation]:
    violations = []
    expected: list[tuple[Operation, str, dict[str, Any]]] = []
    for op in _ok(ops, "release"):
        expected += [(op, str(e.get("release")), e) for e in _reported_releases(op)]
    for op in _ok(ops, "read"):
        release_id = op.args.get("release")
        if isinstance(release_id, str) and isinstance(op.value, dict):
            expected.append((op, release_id, {"status": op.value.get("status")}))
    for op, release_id, seen in expected:
        for name, state in sorted(final.items()):
            r = state.releases.get(release_id)
            if r is None:
                violations.append(Violation(f"release {release_id} is missing on {name}", op, name))
                continue
            mismatched = [
                f"{f}={getattr(r, f)!r} (told {seen[f]!r})"
                for f in ("key", "generation", "node")
                if f in seen and seen[f] != getattr(r, f)
            ]
            if seen.get("status") in TERMINAL and seen["status"] != r.status:
                mismatched.append(f"status={r.status!r} (told {seen['status']!r})")
            if mismatched:
                violations.append(
                    Violation(
                        f"release {release_id} on {name} changed: {', '.join(mismatched)}", op, name
                    )
                )
    statuses: dict[str, dict[str, str]] = defaultdict(dict)
    for name, state in final.items():
        for r in state.releases.values():
            statuses[r.id][name] = r.status
    for release_id, by_node in sorted(statuses.items()):
        if len(by_node) != len(final) or len(set(by_node.values())) > 1:
            shown = ", ".join(f"{n}={by_node.get(n, 'missing')}" for n in sorted(final))
            violations.append(Violation(f"nodes disagree on release {release_id}: {shown}"))
    return violations


# --- recovery within a bound --------------------------------------------------------------------


def check_recovery(
    history: History, bound: float, heal_time: float | None = None, until: float = math.inf
) -> CheckOutcome:
    """After each heal (the moment no fault is active any more, or the given ``heal_time``), an
    operation must complete ok within ``bound`` seconds. A heal followed by a new fault, or by
    the end of the clients' activity (``until``), before the bound elapsed is not judged: the
    cluster was not given its chance."""
    ops = history.operations()
    oks = sorted(o.complete_time for o in ops if o.outcome == "ok")
    windows = _heal_windows(history.faults()) if heal_time is None else [(heal_time, math.inf)]
    windows = [(healed, min(next_fault, until)) for healed, next_fault in windows]
    violations = []
    worst = 0.0
    for healed, next_fault in windows:
        i = bisect_left(oks, healed)
        recovered = oks[i] - healed if i < len(oks) else math.inf
        if recovered <= bound:
            worst = max(worst, recovered)
        elif next_fault - healed >= bound:
            first_late = next((o for o in ops if o.complete_time >= healed), None)
            took = "no ok operation after it" if math.isinf(recovered) else f"{recovered:.3f}s"
            violations.append(
                Violation(f"heal at {healed:.3f}: recovery took {took}, bound {bound}s", first_late)
            )
    judged = CheckOutcome.judge(
        violations, f"{len(windows)} heals, slowest recovery {worst:.3f}s (bound {bound}s)"
    )
    return dataclasses.replace(judged, figure=worst)


def _heal_windows(faults: Iterable[FaultEvent]) -> list[tuple[float, float]]:
    """(heal time, next fault start or ∞) for each moment the active-fault set became empty."""
    active: Counter[tuple[str, str]] = Counter()
    heals: list[tuple[float, float]] = []
    for event in faults:
        key = (event.fault, event.target)
        if event.phase == "start":
            if not active and heals and math.isinf(heals[-1][1]):
                heals[-1] = (heals[-1][0], event.time)
            active[key] += 1
        elif active[key] > 0:
            active[key] -= 1
            if active[key] == 0:
                del active[key]
            if not active:
                heals.append((event.time, math.inf))
    return heals


__all__ = [
    "CheckOutcome",
    "CheckResult",
    "FinalState",
    "NodeState",
    "PlaintextHit",
    "ReleaseRecord",
    "Violation",
    "check",
    "check_allowed_measurement",
    "check_identical_keys",
    "check_linearizable",
    "check_no_lost_ops",
    "check_plaintext",
    "check_recovery",
    "check_release_committed",
    "scan_plaintext",
]
