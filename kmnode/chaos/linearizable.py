"""Linearizability of each key's generation, checked by counting (no search): see
``check_linearizable``."""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from kmnode.chaos.history import Operation
from kmnode.chaos.outcome import CheckOutcome, Violation

INCREMENTS = ("key.create", "key.rotate")
#: Pairwise linearizability checks compare each observation with this many predecessors (in
#: invoke order): every pair in ordinary runs, bounded work in very long ones.
PAIR_WINDOW = 256


def observed_generation(value: Any) -> int | None:
    """The generation a ``read``/increment was told: 0 for an absent key, None if malformed."""
    if not isinstance(value, dict) or "generation" not in value:
        return None
    gen = value["generation"]
    if gen is None:
        return 0
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and gen >= 0 else None


def ops_by_created_key(ops: Iterable[Operation]) -> dict[str, list[Operation]]:
    """Generation-bearing ops (increments, key reads) per key, for keys whose ``key.create`` is
    in the history: a key created before recording began starts at an unknown generation, so
    counting arguments about it would be wrong. The runner records its set-up to avoid that."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in ops:
        if op.key is None or "release" in op.args:
            continue
        if op.kind in INCREMENTS or op.kind == "read":
            by_key[op.key].append(op)
    return {k: v for k, v in by_key.items() if any(o.kind == "key.create" for o in v)}


# --- linearizability of each key's generation --------------------------------------------------


def check_linearizable(ops: Sequence[Operation]) -> CheckOutcome:
    """Each key's generation is a counter: absent (0), ``key.create`` takes it 0→1 (at most
    once), ``key.rotate`` adds 1. An observation is an ok linearizable ``read`` of the key (its
    value) or an ok create/rotate (the generation it returned, counting itself). Take any
    linearization: every op that took effect has a point inside [invoke, completion] (info and
    pending ops: [invoke, ∞), or no point at all), an observation sees the number of increments
    placed before its point (plus itself). Then, necessarily:

    * stale read  — v ≥ self + #ok increments completed before it was invoked;
    * future read — v ≤ self + #non-failed increments invoked before it completed (creates
      counted at most once): nothing else can have been placed before its point;
    * real-time order — if o1 completed before o2 was invoked, v2 − v1 ≥ self(o2) + #ok
      increments wholly inside (o1.completion, o2.invoke): they lie between the two points;
    * each generation is returned by at most one ok increment, and one process's observations
      never go backwards (a process is sequential, so its points are ordered).

    Every rule follows from the counter's semantics alone, so a linearizable history can never
    be flagged (sound); together they catch stale reads, reads from the future and reads that
    go back after another client saw a newer generation, even one an info rotation produced.
    (The matching pairwise upper bound, v2 − v1 ≤ increments that may lie between, is implied
    by the stale and future rules, so it is not checked separately.) Plain reads
    (``"linearizable": false``, served from a node's applied state) may be stale, so only the
    future-read rule applies to them. The real-time rule compares each observation with its
    ``PAIR_WINDOW`` predecessors in invoke order. Keys whose create is not in the history are
    skipped: their starting generation is unknown.
    """
    by_key = ops_by_created_key(ops)
    violations: list[Violation] = []
    observed = 0
    for key, key_ops in sorted(by_key.items()):
        found, count = _KeyRegister(key, key_ops).violations()
        violations += found
        observed += count
    return CheckOutcome.judge(
        violations, f"{observed} generation observations on {len(by_key)} keys linearizable"
    )


class _KeyRegister:
    """The per-key counting structures behind ``check_linearizable``."""

    def __init__(self, key: str, ops: list[Operation]) -> None:
        self.key = key
        incs = [o for o in ops if o.kind in INCREMENTS and o.outcome != "fail"]
        self.rotations = sorted((o for o in incs if o.kind == "key.rotate"), key=_inv)
        self.creates = [o for o in incs if o.kind == "key.create"]
        ok_incs = sorted((o for o in incs if o.outcome == "ok"), key=_inv)
        self.ok_invs = [o.invoke_time for o in ok_incs]
        self.ok_cmps_sorted = sorted(o.complete_time for o in ok_incs)
        # suffix_cmps[i]: sorted completions of ok_incs[i:]  (ok increments invoked after a time)
        self.suffix_cmps: list[list[float]] = [[]]
        for o in reversed(ok_incs):
            nxt = list(self.suffix_cmps[-1])
            insort(nxt, o.complete_time)
            self.suffix_cmps.append(nxt)
        self.suffix_cmps.reverse()
        self.rot_invs = [o.invoke_time for o in self.rotations]
        self.ops = ops

    # C(a, b): ok increments invoked after a and completed before b.
    def _between_ok(self, a: float, b: float) -> int:
        return bisect_left(self.suffix_cmps[bisect_right(self.ok_invs, a)], b)

    # Non-failed increments other than ``op`` invoked before ``op`` completed (creates count
    # once: only one can take effect).
    def _may_before(self, op: Operation) -> int:
        b = op.complete_time
        rotations = bisect_left(self.rot_invs, b)
        rotations -= int(op.kind == "key.rotate" and op.invoke_time < b)
        creates = any(o.invoke_time < b and o.id != op.id for o in self.creates)
        return rotations + int(creates)

    def violations(self) -> tuple[list[Violation], int]:
        found: list[Violation] = []
        observations: list[tuple[Operation, int]] = []
        for op in self.ops:
            if op.outcome != "ok":
                continue
            value = observed_generation(op.value)
            if value is None:
                found.append(Violation(f"{self.key!r}: malformed generation {op.value!r}", op))
                continue
            self._single(op, value, found)
            if op.kind != "read" or op.args.get("linearizable", True) is not False:
                observations.append((op, value))
        self._unique(observations, found)
        self._pairs(observations, found)
        return found, len(observations)

    def _single(self, op: Operation, v: int, found: list[Violation]) -> None:
        me = int(op.kind != "read")
        linearizable = op.kind != "read" or op.args.get("linearizable", True) is not False
        least = me + bisect_left(self.ok_cmps_sorted, op.invoke_time)
        if linearizable and v < least:
            found.append(
                Violation(
                    f"stale: {self.key!r} seen at g{v}, but increments completed before it was "
                    f"invoked reach g{least}",
                    op,
                )
            )
        most = me + self._may_before(op)
        if v > most:
            found.append(
                Violation(
                    f"from the future: {self.key!r} seen at g{v}, but only g{most} can have been "
                    f"reached by increments invoked before it completed",
                    op,
                )
            )

    def _unique(self, observations: list[tuple[Operation, int]], found: list[Violation]) -> None:
        returned: dict[int, Operation] = {}
        last_of: dict[str, tuple[Operation, int]] = {}
        for op, v in sorted(observations, key=lambda ov: ov[0].position):
            if op.kind != "read":
                if v in returned:
                    found.append(
                        Violation(
                            f"{self.key!r}: g{v} returned by two increments (op {returned[v].id})",
                            op,
                        )
                    )
                returned.setdefault(v, op)
            previous = last_of.get(op.process)
            if previous is not None and v < previous[1]:
                found.append(
                    Violation(
                        f"{self.key!r}: process {op.process} went back from g{previous[1]} "
                        f"(op {previous[0].id}) to g{v}",
                        op,
                    )
                )
            last_of[op.process] = (op, v)

    def _pairs(self, observations: list[tuple[Operation, int]], found: list[Violation]) -> None:
        """The real-time rule for o1 → o2; only an earlier-invoked o1 can complete before o2."""
        ordered = sorted(observations, key=lambda ov: ov[0].invoke_index)
        for i, (o2, v2) in enumerate(ordered):
            me2 = int(o2.kind != "read")
            for o1, v1 in ordered[max(0, i - PAIR_WINDOW) : i]:
                if o1.complete_time >= o2.invoke_time:
                    continue
                least = v1 + me2 + self._between_ok(o1.complete_time, o2.invoke_time)
                if v2 < least:
                    found.append(
                        Violation(
                            f"stale: {self.key!r} seen at g{v2} after op {o1.id} saw g{v1} "
                            f"and increments since reach g{least}",
                            o2,
                        )
                    )


def _inv(op: Operation) -> float:
    return op.invoke_time
