"""The checker must catch each kind of broken promise, naming the right check and the first
violating operation, and must accept valid concurrency (info ops, overlapping rotations)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.chaos.checker import (
    FinalState,
    NodeState,
    ReleaseRecord,
    check,
    check_linearizable,
    check_plaintext,
    check_recovery,
    scan_plaintext,
)
from kmnode.chaos.history import History, HistoryRecorder, OpEvent, OpHandle, OpKind
from kmnode.km.state import Release

ALLOWED = "aa" * 32
ROGUE = "bb" * 32
NODES = ("km1", "km2", "km3")


class Tick:
    """A fake monotonic clock: one second per reading; ``jump`` lets time pass."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now

    def jump(self, seconds: float) -> None:
        self.now += seconds


def fingerprint(key: str, generation: int) -> str:
    return hashlib.blake2b(f"{key}/{generation}".encode(), digest_size=16).hexdigest()


class Run:
    """A hand-written history: ``op`` records a whole sequential operation, ``start`` an open
    one to complete later (for concurrency)."""

    def __init__(self) -> None:
        self.clock = Tick()
        self.rec = HistoryRecorder(self.clock)

    def start(self, process: str, kind: OpKind, node: str = "km1", **args: Any) -> OpHandle:
        return self.rec.invoke(process, kind, args, node=node)

    def op(
        self, process: str, kind: OpKind, value: Any = None, *, outcome: str = "ok", **args: Any
    ) -> int:
        handle = self.start(process, kind, **args)
        if outcome == "ok":
            handle.ok(value)
        elif outcome == "fail":
            handle.fail("409 refused")
        else:
            handle.info("timeout")
        return handle.op

    def history(self) -> History:
        return self.rec.history()


def node_state(
    generation: int = 2,
    releases: Iterable[ReleaseRecord] = (),
    *,
    key: str = "k",
    fingerprints: dict[tuple[str, int], str] | None = None,
) -> NodeState:
    fps = {(key, g): fingerprint(key, g) for g in range(1, generation + 1)}
    return NodeState(
        keys={key: generation},
        releases={r.id: r for r in releases},
        fingerprints=fps if fingerprints is None else fingerprints,
        allowed_service={key: frozenset({ALLOWED})},
    )


R9 = ReleaseRecord("r9", "k", 2, "km2", "provisioned", ALLOWED)


def cluster(generation: int = 2, releases: Iterable[ReleaseRecord] = (R9,)) -> dict[str, NodeState]:
    return {n: node_state(generation, list(releases)) for n in NODES}


class Base:
    """A valid run: create, a rotation concurrent with a read, an info rotation (whose effect
    is a parameter), a partition healed, a provisioned release, a proof, release and key reads."""

    def __init__(self, info_took_effect: bool) -> None:
        self.run = run = Run()
        self.create = run.op("c1", "key.create", {"key": "k", "generation": 1}, key="k")
        rotate = run.start("c1", "key.rotate", key="k")
        read = run.start("c2", "read", node="km2", key="k")
        rotate.ok({"key": "k", "generation": 2})
        read.ok({"generation": 1})  # concurrent with the rotation: old value is fine
        self.rotate, self.concurrent_read = rotate.op, read.op
        self.info_rotate = run.op("c3", "key.rotate", outcome="info", key="k")
        run.rec.fault_start("partition", "km3")
        entry = {"release": "r9", "node": "km2", "key": "k", "generation": 2}
        self.release = run.op(
            "c1", "release", {"releases": [{**entry, "status": "provisioned"}]}, key="k", node="km2"
        )
        run.rec.fault_stop("partition", "km3")
        self.prove = run.op(
            "c2", "prove", {"node": "km2", "key": "k", "generation": 2, "mac": "00" * 32},
            key="k", generation=2,
        )  # fmt: skip
        run.op("c1", "read", {"status": "provisioned"}, release="r9")
        self.generation = 3 if info_took_effect else 2
        self.read = run.op("c2", "read", {"generation": self.generation}, key="k")

    def final(self) -> dict[str, NodeState]:
        return cluster(self.generation)


@pytest.fixture
def base() -> Base:
    return Base(info_took_effect=False)


def failing(history: History, final: FinalState, name: str) -> tuple[int, str]:
    """Assert exactly the check ``name`` fails; return (first violating op id, detail)."""
    result = check(history, final)
    failed = [n for n, c in result.checks.items() if not c.valid]
    assert name in failed, result.summary()
    outcome = result.checks[name]
    assert not result.valid and outcome.first_violation is not None
    op = outcome.first_violation.op
    return (-1 if op is None else op.id), outcome.detail


# --- valid histories ----------------------------------------------------------------------------


@pytest.mark.parametrize("took_effect", [False, True])
def test_valid_run_passes_every_check(took_effect: bool) -> None:
    b = Base(took_effect)
    result = check(
        b.run.history(),
        b.final(),
        haystacks=[("km1/raft.log", b"nothing secret here" * 10)],
        needles=[bytes(range(32))],
        recovery_bound=5.0,
    )
    assert result.valid, result.summary()
    assert set(result.checks) == {
        "release-committed",
        "allowed-measurement",
        "identical-keys",
        "no-lost-ops",
        "linearizable-keys",
        "no-plaintext-keys",
        "recovery",
    }
    assert result.stats["key.rotate"] == {"ok": 1, "info": 1}
    assert result.stats["read"] == {"ok": 3}
    assert result.faults == {"partition": 1}
    summary = result.summary()
    assert "VALID" in summary and "linearizable-keys" in summary and "FAIL" not in summary


def test_concurrent_rotations_and_reads_may_see_any_overlapping_generation() -> None:
    run = Run()
    run.op("c0", "key.create", {"generation": 1}, key="k")
    r1 = run.start("c1", "key.rotate", key="k")
    r2 = run.start("c2", "key.rotate", key="k")
    reads = [run.start(f"r{i}", "read", key="k") for i in range(4)]
    r2.ok({"generation": 2})  # the later-invoked rotation may be linearized first
    reads[0].ok({"generation": 3})
    reads[1].ok({"generation": 1})  # overlaps both rotations: before either
    r1.ok({"generation": 3})
    reads[2].ok({"generation": 2})
    reads[3].ok({"generation": 3})
    run.op("r0", "read", {"generation": 3}, key="k")
    outcome = check_linearizable(run.history().operations())
    assert outcome.valid, outcome.detail
    result = check(run.history(), cluster(3, releases=()))
    assert result.valid, result.summary()


def test_info_rotation_may_take_effect_late_or_never() -> None:
    run = Run()
    run.op("c0", "key.create", {"generation": 1}, key="k")
    run.op("c1", "key.rotate", outcome="info", key="k")
    run.op("c2", "read", {"generation": 1}, key="k")  # not yet (or never)
    run.op("c2", "read", {"generation": 2}, key="k")  # it committed after the client gave up
    run.op("c3", "key.rotate", outcome="fail", key="k")  # definitely nothing
    run.op("c2", "read", {"generation": 2}, key="k")
    assert check(run.history(), cluster(2, releases=())).valid
    pending = run.start("c4", "key.rotate", key="k")  # never completes: judged like info
    assert pending.op > 0
    assert check(run.history(), cluster(3, releases=())).valid
    assert check(run.history(), cluster(2, releases=())).valid


def test_plain_reads_may_be_stale_but_not_from_the_future() -> None:
    run = Run()
    run.op("c0", "key.create", {"generation": 1}, key="k")
    run.op("c0", "key.rotate", {"generation": 2}, key="k")
    run.op("c1", "read", {"generation": 1}, key="k", linearizable=False)
    assert check_linearizable(run.history().operations()).valid
    future = run.op("c1", "read", {"generation": 3}, key="k", linearizable=False)
    outcome = check_linearizable(run.history().operations())
    assert not outcome.valid and outcome.first_violation is not None
    assert outcome.first_violation.op is not None and outcome.first_violation.op.id == future


def test_absent_key_reads_zero_before_its_create() -> None:
    run = Run()
    read = run.start("c1", "read", key="k")
    create = run.start("c0", "key.create", key="k")
    read.ok({"generation": None})  # 404 while the create is in flight
    create.ok({"generation": 1})
    assert check_linearizable(run.history().operations()).valid
    run.op("c1", "read", {"generation": 0}, key="k")
    assert not check_linearizable(run.history().operations()).valid


def test_keys_created_outside_the_history_are_not_counted() -> None:
    run = Run()
    run.op("c1", "key.rotate", {"generation": 7}, key="old")
    outcome = check_linearizable(run.history().operations())
    assert outcome.valid and "on 0 keys" in outcome.detail
    assert check(run.history(), {"km1": node_state(7, key="old")}).valid


# --- each bad history caught by the right check, at the right op ------------------------------


def test_lost_write_ok_release_missing_from_a_node(base: Base) -> None:
    final = base.final()
    final["km3"] = node_state(2, releases=())
    op, detail = failing(base.run.history(), final, "no-lost-ops")
    assert op == base.release and "r9 is missing on km3" in detail


def test_lost_rotation_and_impossible_generations(base: Base) -> None:
    op, detail = failing(base.run.history(), cluster(1), "no-lost-ops")
    assert op == base.rotate and "below the g2" in detail
    op, detail = failing(base.run.history(), cluster(4), "no-lost-ops")
    assert op == base.info_rotate and "above the g3" in detail
    final = base.final()
    final["km2"] = node_state(3, [R9])
    op, detail = failing(base.run.history(), final, "no-lost-ops")
    assert op == -1 and "nodes disagree on 'k': km1=g2, km2=g3, km3=g2" in detail


def test_release_status_seen_must_survive(base: Base) -> None:
    refused = ReleaseRecord("r9", "k", 2, "km2", "refused", ALLOWED)
    op, detail = failing(base.run.history(), cluster(2, [refused]), "no-lost-ops")
    assert op == base.release and "status='refused' (told 'provisioned')" in detail


def test_nodes_must_agree_on_releases(base: Base) -> None:
    final = base.final()
    extra = ReleaseRecord("r12", "k", 1, "km1", "refused")
    final["km1"] = node_state(2, [R9, extra])
    op, detail = failing(base.run.history(), final, "no-lost-ops")
    assert op == -1 and "disagree on release r12" in detail


def test_no_node_state_collected_is_a_failure(base: Base) -> None:
    _, detail = failing(base.run.history(), {}, "no-lost-ops")
    assert "no node state" in detail


def test_release_without_commit_a_proof_of_an_unreleased_key(base: Base) -> None:
    prove = base.run.op(
        "c3", "prove", {"node": "km1", "key": "k", "generation": 1, "mac": "11" * 32},
        key="k", generation=1, node="km1",
    )  # fmt: skip
    op, detail = failing(base.run.history(), base.final(), "release-committed")
    assert (
        op == prove and "'k' g1 on km1 has no committed, unrefused release request on km1" in detail
    )


def test_release_told_provisioned_but_committed_as_refused(base: Base) -> None:
    refused = ReleaseRecord("r9", "k", 2, "km2", "refused")
    op, _ = failing(base.run.history(), cluster(2, [refused]), "release-committed")
    assert op == base.release
    assert not check(base.run.history(), cluster(2, [refused])).checks["no-lost-ops"].valid


def test_a_proof_may_precede_the_outcome_entry(base: Base) -> None:
    """The service may hold the key before ``release.outcome`` commits; the request backs it."""
    requested = ReleaseRecord("r9", "k", 2, "km2", "requested")
    history = base.run.history()
    assert check(history, cluster(2, [requested])).checks["release-committed"].valid


def test_stale_read_below_a_completed_rotation(base: Base) -> None:
    stale = base.run.op("c4", "read", {"generation": 1}, key="k")
    op, detail = failing(base.run.history(), base.final(), "linearizable-keys")
    assert op == stale and "completed before it was invoked reach g2" in detail


def test_read_from_the_future(base: Base) -> None:
    future = base.run.op("c4", "read", {"generation": 5}, key="k")
    op, detail = failing(base.run.history(), base.final(), "linearizable-keys")
    assert op == future and "from the future" in detail and "only g3" in detail


def test_read_going_back_after_another_client_saw_an_info_rotation() -> None:
    b = Base(info_took_effect=True)  # c2 read g3: the info rotation took effect
    back = b.run.op("c4", "read", {"generation": 2}, key="k")  # ≥ completed-rotation bound
    op, detail = failing(b.run.history(), b.final(), "linearizable-keys")
    assert op == back and f"after op {b.read} saw g3" in detail


def test_two_rotations_returning_the_same_generation() -> None:
    run = Run()
    run.op("c0", "key.create", {"generation": 1}, key="k")
    a, b = run.start("c1", "key.rotate", key="k"), run.start("c2", "key.rotate", key="k")
    a.ok({"generation": 2})
    b.ok({"generation": 2})
    outcome = check_linearizable(run.history().operations())
    assert not outcome.valid and outcome.first_violation is not None
    assert outcome.first_violation.op is not None and outcome.first_violation.op.id == b.op
    assert "returned by two increments" in outcome.detail


def test_provisioned_to_a_disallowed_measurement(base: Base) -> None:
    rogue = ReleaseRecord("r9", "k", 2, "km2", "provisioned", ROGUE)
    op, detail = failing(base.run.history(), cluster(2, [rogue]), "allowed-measurement")
    assert op == base.release and "bbbbbbbbbbbbbbbb, not allowed on km1" in detail
    blank = ReleaseRecord("r9", "k", 2, "km2", "provisioned", "")
    _, detail = failing(base.run.history(), cluster(2, [blank]), "allowed-measurement")
    assert "(none)" in detail


def test_policy_default_applies_when_the_key_has_no_list(base: Base) -> None:
    fps = {("k", 1): "a1", ("k", 2): "a2"}
    final = {n: NodeState({"k": 2}, {"r9": R9}, fps, {}, frozenset()) for n in NODES}
    assert not check(base.run.history(), final).checks["allowed-measurement"].valid
    final = {n: NodeState({"k": 2}, {"r9": R9}, fps, {}, frozenset({ALLOWED})) for n in NODES}
    assert check(base.run.history(), final).valid


def test_differing_fingerprints_between_nodes(base: Base) -> None:
    final = base.final()
    final["km2"] = node_state(
        2, [R9], fingerprints={("k", 1): fingerprint("k", 1), ("k", 2): "ff" * 16}
    )
    op, detail = failing(base.run.history(), final, "identical-keys")
    assert op == -1 and "key 'k' g2 differs" in detail and "km2=ffffffffffff" in detail


def test_a_rotation_must_change_the_key(base: Base) -> None:
    same = {("k", 1): fingerprint("k", 1), ("k", 2): fingerprint("k", 1)}
    final = {n: node_state(2, [R9], fingerprints=same) for n in NODES}
    _, detail = failing(base.run.history(), final, "identical-keys")
    assert "same key for ('k', 1) and ('k', 2)" in detail


def test_fingerprint_read_during_the_run_must_match(base: Base) -> None:
    read = base.run.op("c4", "read", {"generation": 2, "fingerprints": {"2": "ee" * 16}}, key="k")
    op, _ = failing(base.run.history(), base.final(), "identical-keys")
    assert op == read


def test_plaintext_needle_found_raw_hex_and_base64() -> None:
    secret = bytes(range(100, 132))
    other = bytes(range(32))
    haystacks = [
        ("clean.log", b"x" * 500),
        ("raw.bin", b"head" + secret + b"tail"),
        ("hex.log", b"key=" + secret.hex().encode() + b"\n"),
        ("HEX.log", secret.hex().upper().encode()),
    ]
    for shift in range(3):
        haystacks.append((f"b64-{shift}.json", base64.b64encode(b"p" * shift + secret + b"suffix")))
    haystacks.append(("url.txt", base64.urlsafe_b64encode(b"ab" + secret)))
    hits = scan_plaintext(haystacks, [other, secret])
    found = {(h.source, h.encoding) for h in hits}
    assert ("raw.bin", "raw") in found and ("hex.log", "hex") in found
    assert ("HEX.log", "HEX") in found
    assert {("b64-0.json", "base64@0"), ("b64-1.json", "base64@1")} <= found
    assert ("b64-2.json", "base64@2") in found and ("url.txt", "base64url@2") in found
    assert all(h.needle == 1 for h in hits) and "clean.log" not in {h.source for h in hits}
    assert next(h for h in hits if h.source == "raw.bin").offset == 4
    outcome = check_plaintext(haystacks, [secret])
    assert not outcome.valid and "found raw in raw.bin at offset 4" in outcome.detail
    assert check_plaintext(haystacks[:1], [secret]).valid
    with pytest.raises(ValueError, match="too short"):
        scan_plaintext(haystacks, [b"abc"])


def test_plaintext_check_in_the_full_result(base: Base) -> None:
    secret = b"S" * 32
    result = check(
        base.run.history(), base.final(), haystacks=[("mqtt", secret.hex().encode())],
        needles=[secret],
    )  # fmt: skip
    assert not result.valid and not result.checks["no-plaintext-keys"].valid
    assert "found hex in mqtt" in result.checks["no-plaintext-keys"].detail


def test_recovery_over_the_bound(base: Base) -> None:
    history = base.run.history()
    assert check_recovery(history, bound=2.0).valid  # the prove completed 2 s after the heal
    run = base.run
    run.rec.fault_start("kill", "km1")
    run.rec.fault_stop("kill", "km1")
    run.clock.jump(30.0)
    late = run.op("c1", "read", {"generation": 2}, key="k")
    outcome = check_recovery(run.history(), bound=10.0)
    assert not outcome.valid and outcome.first_violation is not None
    assert outcome.first_violation.op is not None and outcome.first_violation.op.id == late
    assert "recovery took 32.000s, bound 10.0s" in outcome.detail
    heal = run.history().faults()[-1].time
    assert check_recovery(run.history(), bound=40.0, heal_time=heal).valid
    assert not check(run.history(), base.final(), recovery_bound=10.0).valid


def test_recovery_never_happening_and_interrupted_heals() -> None:
    run = Run()
    run.rec.fault_start("pause", "km1")
    run.rec.fault_stop("pause", "km1")
    run.op("c1", "read", outcome="info", key="k")
    outcome = check_recovery(run.history(), bound=5.0)
    assert not outcome.valid and "no ok operation after it" in outcome.detail
    run2 = Run()
    run2.rec.fault_start("pause", "km1")
    run2.rec.fault_stop("pause", "km1")
    run2.rec.fault_start("pause", "km2")  # the next fault came before the bound elapsed
    run2.clock.jump(100.0)
    run2.rec.fault_stop("pause", "km2")
    run2.op("c1", "read", {"generation": 0}, key="k")
    assert check_recovery(run2.history(), bound=5.0).valid
    assert check_recovery(Run().history(), bound=1.0).valid  # no fault, nothing to judge


# --- generated histories from a correct linearizable register ----------------------------------

#: (which applicable move, rotate rather than read, outcome choice), read by ``simulate``.
Step = tuple[int, bool, int]
steps = st.lists(
    st.tuples(st.integers(0, 63), st.booleans(), st.integers(0, 3)), min_size=5, max_size=120
)
PROCESSES = 4


def simulate(plan: list[Step]) -> tuple[History, int]:
    """Run a correct generation register under random concurrency: each op takes effect
    atomically at one moment inside its window; its client then learns the outcome (ok), or
    gives up (info: a rotation may still take effect later, or never), or — if nothing happened
    yet — is refused (fail). Each step picks one of the moves possible in the current state, so
    every step does something. Returns the history and the final generation."""
    run = Run()
    run.op("setup", "key.create", {"key": "k", "generation": 1}, key="k")
    generation = 1
    open_ops: dict[int, tuple[OpHandle, bool, int | None]] = {}  # proc -> (handle, rotate, result)
    limbo = 0  # info rotations that have not taken effect (yet)
    for move, rotate, choice in plan:
        moves = [("invoke", p) for p in range(PROCESSES) if p not in open_ops]
        moves += [("apply", p) for p, (_, _, r) in open_ops.items() if r is None]
        moves += [("complete", p) for p in open_ops]
        moves += [("late", -1)] * min(limbo, 1)
        what, proc = moves[move % len(moves)]
        if what == "invoke":
            kind: OpKind = "key.rotate" if rotate else "read"
            handle = run.start(f"c{proc}", kind, node=f"km{proc % 3 + 1}", key="k")
            open_ops[proc] = (handle, rotate, None)
        elif what == "apply":  # the op takes effect now, inside its window
            handle, is_rotate, _ = open_ops[proc]
            generation += int(is_rotate)
            open_ops[proc] = (handle, is_rotate, generation)
        elif what == "late":  # a given-up rotation commits after its client gave up
            limbo -= 1
            generation += 1
        else:
            handle, is_rotate, result = open_ops.pop(proc)
            if choice == 1:
                handle.info("timeout")
                limbo += int(is_rotate and result is None)
            elif choice == 2 and result is None:
                handle.fail("not the leader")
            else:
                if result is None:
                    generation += int(is_rotate)
                    result = generation
                handle.ok({"key": "k", "generation": result})
    run.op("final", "read", {"generation": generation}, key="k")
    return run.history(), generation


def corrupt_read(history: History, pick: int) -> tuple[History, int]:
    """Lower one ok read just below the bound set by increments completed before it began."""
    ops = history.operations()
    ok_incs = [o for o in ops if o.kind in ("key.create", "key.rotate") and o.outcome == "ok"]
    reads = [o for o in ops if o.kind == "read" and o.outcome == "ok"]
    target = reads[pick % len(reads)]
    bound = sum(1 for o in ok_incs if o.complete_time < target.invoke_time)
    assert bound >= 1  # the create completed before any read was invoked
    events = list(history.events)
    index = target.complete_index
    assert index is not None
    event = events[index]
    assert isinstance(event, OpEvent)
    events[index] = replace(event, value={"generation": bound - 1})
    return History(tuple(events)), target.id


@settings(max_examples=300, deadline=None)
@given(steps, st.integers(0, 1000))
def test_generated_linearizable_histories_pass_and_corrupted_ones_fail(
    plan: list[Step], pick: int
) -> None:
    history, generation = simulate(plan)
    history = History.loads(history.to_jsonl())  # what the runner saves is what gets checked
    result = check(history, cluster(generation, releases=()))
    assert result.valid, result.summary()
    bad, corrupted = corrupt_read(history, pick)
    outcome = check(bad, cluster(generation, releases=())).checks["linearizable-keys"]
    assert not outcome.valid
    assert outcome.first_violation is not None and outcome.first_violation.op is not None
    assert outcome.first_violation.op.id == corrupted


def test_node_state_from_the_operator_api_and_json() -> None:
    keys = [{"name": "k", "generation": 2, "allowed_service": [], "created_index": 3}]
    release = Release("r9", "k", 2, "km2", 9, "provisioned", "", ALLOWED, 11)
    policy = {"measurements": {"km": ["cc" * 32], "service": [ALLOWED]}, "min_svn": 1}
    fps = {"k": {"1": fingerprint("k", 1), "2": fingerprint("k", 2)}}
    state = NodeState.from_api(keys, [asdict(release)], fps, policy)
    assert state.allowed_for("k") == frozenset({ALLOWED})  # the policy's, as the key has none
    assert state.releases["r9"] == R9 and state.keys == {"k": 2}
    assert state.fingerprints[("k", 2)] == fingerprint("k", 2)
    assert NodeState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_node_must_derive_every_generation(base: Base) -> None:
    final = base.final()
    final["km3"] = node_state(2, [R9], fingerprints={("k", 1): fingerprint("k", 1)})
    op, detail = failing(base.run.history(), final, "identical-keys")
    assert op == -1 and "km3 reports no fingerprint for 'k' g[2]" in detail
