"""The contract checks of a chaos run (DESIGN.md, "Chaos and checking": identical contract
roots and results across nodes; issue 14's checker bullet).

Every node's service enclave executes every committed contract operation in order, so:

* ``check_contract_results``: every operation published by two or more nodes was published
  alike (the same call at that sequence number, the same status, the same keyed digest), and
  what a client was answered is what the nodes published;
* ``check_contract_roots``: each node's state roots at each committed checkpoint are the
  committed ones, and roots nodes computed at the same operation agree; a node that stopped
  executing is a violation unless the run tampered with its store and the halt says it
  caught that (``TAMPER_EVIDENCE``);
* ``check_contract_reference``: the committed calls, replayed in order through the plain
  uncached reference executor, give the results the clients opened and the statuses the
  nodes published. A call whose outcome the client never learned is replayed too (it changed
  the state) once its sequence number is known, from the API's answer or by its nonce from
  the published records;
* ``contract_needles``: what the plaintext scan looks for besides keys: the workload's
  account names (random markers), and the distinctive amounts and results of its calls.

Pure functions of the history and the ``ContractEvidence``; messages name operations,
functions, statuses and digests, never arguments or results.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

from kmnode.chaos.contract_calls import CallAnswer, CallFormatError, ContractCall
from kmnode.chaos.contract_evidence import ContractEvidence, NodeContracts, ResultRecord
from kmnode.chaos.contract_reference import ReferenceExecutor
from kmnode.chaos.history import FaultEvent, Operation
from kmnode.chaos.outcome import CheckOutcome, Violation
from kmnode.chaos.plaintext import MIN_NEEDLE
from kmnode.contracts.sealed_state import TamperKind

#: The nemesis kind that tampers with a node's contract store.
TAMPER_FAULT = "tamper-state"
TAMPER_KINDS: tuple[str, ...] = get_args(TamperKind)
#: What a halt says when the node caught its host tampering: the kind a read named
#: (``TamperError``), or the rollback anchor refusing the stored state (a restart's restore
#: finds no copy whose roots are committed ones; roots differ from a committed checkpoint).
TAMPER_EVIDENCE: tuple[str, ...] = (
    *TAMPER_KINDS,
    "matches a committed checkpoint",
    "differ from the committed checkpoint",
)
#: A u64 with fewer nonzero bytes (little endian: a small number, or a round one like 2**62)
#: could be found by chance in megabytes of host files: not searched for.
DISTINCTIVE_BYTES = 5
#: At most this many amounts and results are searched for (every marker always is).
MAX_VALUE_NEEDLES = 64


@dataclass(frozen=True)
class MadeCall:
    """A call the client made: the operation, the call and, if committed, what it learned."""

    op: Operation
    call: ContractCall
    answer: CallAnswer | None


def made_calls(ops: Iterable[Operation], contract: str | None = None) -> list[MadeCall]:
    """The history's contract calls (of ``contract``, if given) that may have committed (not
    ``fail``), with their answers. Raises ``CallFormatError`` on a malformed entry."""
    found = []
    for op in ops:
        if op.kind != "contract.call" or op.outcome == "fail":
            continue
        call = ContractCall.from_args(op.args)
        if contract is not None and call.contract != contract:
            continue
        answer = CallAnswer.from_value(op.value) if op.outcome == "ok" else None
        found.append(MadeCall(op, call, answer))
    return found


def _calls_or_violation(
    ops: Iterable[Operation], contract: str | None = None
) -> list[MadeCall] | CheckOutcome:
    try:
        return made_calls(ops, contract)
    except CallFormatError as exc:
        return CheckOutcome.judge(
            [Violation(f"a malformed contract call in the history: {exc}")], ""
        )


def tampered_nodes(faults: Iterable[FaultEvent]) -> frozenset[str]:
    """Nodes whose contract store the nemesis did tamper with (not the skipped attempts)."""
    return frozenset(
        f.target
        for f in faults
        if f.fault == TAMPER_FAULT and f.phase == "start" and "skipped" not in f.detail
    )


# --- identical results ---------------------------------------------------------------------------


def check_contract_results(
    ops: Sequence[Operation], records: Sequence[ResultRecord]
) -> CheckOutcome:
    """See the module docstring (first point)."""
    calls = _calls_or_violation(ops)
    if isinstance(calls, CheckOutcome):
        return calls
    by_seq: dict[int, list[ResultRecord]] = defaultdict(list)
    for record in records:
        by_seq[record.seq].append(record)
    op_of_nonce = {c.call.nonce: c.op for c in calls}
    violations = []
    shared = 0
    for seq, group in sorted(by_seq.items()):
        shared += len({r.node for r in group}) >= 2
        if len({r.outcome for r in group}) > 1:
            shown = ", ".join(sorted({r.shown() for r in group}))
            culprit = next((op_of_nonce[r.nonce] for r in group if r.nonce in op_of_nonce), None)
            violations.append(Violation(f"operation {seq} differs across nodes: {shown}", culprit))
    answered = 0
    for made in calls:
        answer = made.answer
        if answer is None or answer.status == "pending":
            continue
        answered += 1
        told = (made.call.contract, made.call.nonce, answer.status, answer.digest)
        for r in by_seq.get(answer.seq, ()):
            if (r.contract, r.nonce, r.status, r.digest) != told:
                violations.append(
                    Violation(
                        f"operation {answer.seq}: {made.op.node} answered {answer.status}/"
                        f"{answer.digest[:12]}, but {r.node} published {r.shown()}",
                        made.op,
                        r.node,
                    )
                )
                break
    return CheckOutcome.judge(
        violations,
        f"{shared} operation(s) published by 2+ nodes agree ({len(records)} records); "
        f"{answered} answer(s) to clients match what the nodes published",
    )


# --- identical roots -----------------------------------------------------------------------------


def check_contract_roots(
    nodes: Mapping[str, NodeContracts], tampered: frozenset[str] = frozenset()
) -> CheckOutcome:
    """See the module docstring (second point)."""
    violations = []
    notes = []
    computed: dict[int, dict[str, Mapping[str, str]]] = defaultdict(dict)
    committed: dict[int, Mapping[str, str]] = {}
    for name, view in sorted(nodes.items()):
        if view.error:
            violations.append(Violation(f"{name}: no contract view ({view.error})", None, name))
            continue
        if view.halted:
            named = any(said in view.halted for said in TAMPER_EVIDENCE)
            if name in tampered and named:
                notes.append(f"{name} halted after tamper-state ({view.halted[:120]})")
            else:
                why = "after tamper-state, without naming how" if name in tampered else ""
                message = f"{name} stopped executing contracts {why}".rstrip()
                violations.append(Violation(f"{message}: {view.halted[:200]}", None, name))
        elif view.position < view.committed:
            violations.append(
                Violation(
                    f"{name} executed {view.position} of {view.committed} committed operations",
                    None,
                    name,
                )
            )
        for seq, roots in view.computed_roots.items():
            computed[seq][name] = roots
        for seq, roots in sorted(view.committed_roots.items()):
            agreed = committed.setdefault(seq, roots)
            if agreed != roots:
                violations.append(
                    Violation(f"{name} holds another committed checkpoint {seq}", None, name)
                )
            ours = view.computed_roots.get(seq)
            if ours is not None and ours != roots:
                violations.append(
                    Violation(
                        f"{name}'s roots after operation {seq} differ from the committed "
                        f"checkpoint: {_differing(ours, roots)}",
                        None,
                        name,
                    )
                )
    for seq, by_node in sorted(computed.items()):
        if len({tuple(sorted(r.items())) for r in by_node.values()}) > 1:
            shown = ", ".join(f"{n}={_short(r)}" for n, r in sorted(by_node.items()))
            violations.append(Violation(f"roots after operation {seq} differ: {shown}"))
    compared = sum(1 for by_node in computed.values() if len(by_node) >= 2)
    passed = (
        f"{len(committed)} committed checkpoint(s) equal every node's roots; "
        f"{compared} checkpoint(s) computed by 2+ nodes agree"
    )
    return CheckOutcome.judge(violations, "; ".join([passed, *notes]))


def _differing(ours: Mapping[str, str], committed: Mapping[str, str]) -> str:
    names = sorted(set(ours) | set(committed))
    return ", ".join(
        f"{n} {ours.get(n, '-')[:12]} vs {committed.get(n, '-')[:12]}"
        for n in names
        if ours.get(n) != committed.get(n)
    )


def _short(roots: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{c}:{r[:12]}" for c, r in sorted(roots.items())) + "}"


# --- equivalence with the reference ----------------------------------------------------------


def check_contract_reference(
    ops: Sequence[Operation], evidence: ContractEvidence, code: bytes
) -> CheckOutcome:
    """See the module docstring (third point). ``code``: the contract's WebAssembly."""
    contract = evidence.contract
    calls = _calls_or_violation(ops, contract)
    if isinstance(calls, CheckOutcome):
        return calls
    deployed = _deployed_seq(ops, contract)
    if deployed is None:
        return CheckOutcome(True, f"{contract} was not deployed: no call to replay")
    records = [r for r in evidence.records if r.function]  # deploys name no function
    violations: list[Violation] = []
    known = _sequenced(calls, records, violations)
    ours = {c.call.nonce for c in calls}
    for r in records:
        if r.contract == contract and r.nonce not in ours:
            violations.append(
                Violation(
                    f"{r.node} executed operation {r.seq}, a call of {contract} no client made"
                )
            )
    for seq, made in known.items():
        if seq <= deployed:
            message = f"call committed as operation {seq}, before its contract ({deployed})"
            violations.append(Violation(message, made.op))
    limit, unknown = _replayable(evidence, known, deployed, violations)
    statuses: dict[int, set[str]] = defaultdict(set)
    for r in records:
        statuses[r.seq].add(r.status)
    reference = ReferenceExecutor(contract, code)
    opened = published = replayed = 0
    for seq in sorted(s for s in known if deployed < s < limit):
        made = known[seq]
        expected = reference.execute(made.call)
        replayed += 1
        answer = made.answer
        if answer is not None and answer.unopened:
            violations.append(
                Violation(f"the result of operation {seq} {answer.unopened}", made.op)
            )
        elif answer is not None and answer.report is not None:
            opened += 1
            differs = _report_differs(answer.report, expected, seq, made.call)
            if differs:
                violations.append(
                    Violation(
                        f"operation {seq} ({made.call.function}) answered unlike the reference "
                        f"in {', '.join(differs)} (answered {_status(answer.report)}, reference "
                        f"{_status(expected)})",
                        made.op,
                    )
                )
        seen = statuses.get(seq, set())
        published += bool(seen)
        if seen - {expected["status"]}:
            violations.append(
                Violation(
                    f"operation {seq} ({made.call.function}) published as "
                    f"{'/'.join(sorted(seen))}, the reference says {expected['status']}",
                    made.op,
                )
            )
    passed = (
        f"{replayed} committed call(s) of {contract} replayed through the uncached reference: "
        f"{opened} opened result(s) and {published} published status(es) equal"
    )
    if not math.isinf(limit):
        passed += f"; not judged from operation {limit} on ({unknown} committed call(s) unseen)"
    return CheckOutcome.judge(violations, passed)


def _deployed_seq(ops: Iterable[Operation], contract: str) -> int | None:
    for op in ops:
        if (
            op.kind == "contract.deploy"
            and op.outcome == "ok"
            and op.args.get("contract") == contract
        ):
            seq = op.value.get("seq") if isinstance(op.value, dict) else None
            return seq if type(seq) is int else None
    return None


def _sequenced(
    calls: Sequence[MadeCall], records: Sequence[ResultRecord], violations: list[Violation]
) -> dict[int, MadeCall]:
    """The calls whose sequence number is known, by it: from the answer, else from the
    records of the call's nonce (which must name one number, the answer's if there is one)."""
    published: dict[str, set[int]] = defaultdict(set)
    for r in records:
        published[r.nonce].add(r.seq)
    known: dict[int, MadeCall] = {}
    for made in calls:
        seqs = published.get(made.call.nonce, set())
        answered = made.answer.seq if made.answer is not None else None
        if len(seqs) > 1 or (answered is not None and seqs - {answered}):
            shown = sorted(seqs | ({answered} if answered else set()))
            violations.append(Violation(f"one call committed as operations {shown}", made.op))
            continue
        seq = answered if answered is not None else next(iter(seqs), None)
        if seq is None:
            continue
        if seq in known:
            other = known[seq].op.id
            violations.append(
                Violation(f"op {other} and this call are both operation {seq}", made.op)
            )
            continue
        known[seq] = made
    return known


def _replayable(
    evidence: ContractEvidence,
    known: Mapping[int, MadeCall],
    deployed: int,
    violations: list[Violation],
) -> tuple[float, int | None]:
    """(the first operation not to replay, or ∞; committed calls the client cannot place).

    The replay must not skip a committed call: while the contract record counts more calls
    than the client can place, it stops at the first operation after the deploy that neither
    a known call nor another contract's record accounts for (it may be the unplaced call)."""
    total = evidence.committed_calls
    unknown = None if total is None else total - len(known)
    if unknown is not None and unknown < 0:
        violations.append(
            Violation(
                f"the cluster counts {total} committed call(s) of {evidence.contract}, "
                f"but clients saw {len(known)} committed"
            )
        )
    if unknown == 0 or not known:
        return math.inf, unknown
    others = {r.seq for r in evidence.records if r.contract != evidence.contract or not r.function}
    seq = deployed + 1
    while seq in known or seq in others:
        seq += 1
    return (math.inf if seq > max(known) else seq), unknown


def _report_differs(
    report: Mapping[str, object], expected: Mapping[str, object], seq: int, call: ContractCall
) -> list[str]:
    differs = [f for f, v in expected.items() if report.get(f) != v]
    named = {"seq": seq, "contract": call.contract, "function": call.function}
    return differs + [f for f, v in named.items() if report.get(f) != v]


def _status(report: Mapping[str, object]) -> str:
    code = report.get("code")
    return f"{report.get('status')}" + (f" code {code}" if code else "")


# --- plaintext needles ----------------------------------------------------------------------


def contract_needles(ops: Iterable[Operation], limit: int = MAX_VALUE_NEEDLES) -> list[bytes]:
    """The workload's secrets for the plaintext scan: every account name but the caller's
    (each a random marker),
    then up to ``limit`` distinctive u64 amounts and results (8 bytes, little endian) and
    other results of at least ``MIN_NEEDLE`` bytes, in history order."""
    markers: dict[bytes, None] = {}
    values: dict[bytes, None] = {}
    for op in ops:
        if op.kind != "contract.call":
            continue
        try:
            call = ContractCall.from_args(op.args)
            answer = CallAnswer.from_value(op.value) if op.outcome == "ok" else None
        except CallFormatError:
            continue
        # The caller's own name is public (every published record names it): not a marker.
        if call.account not in (None, call.caller) and len(str(call.account)) >= MIN_NEEDLE:
            markers[str(call.account).encode()] = None
        if call.amount is not None and _distinctive(call.amount.to_bytes(8, "little")):
            values[call.amount.to_bytes(8, "little")] = None
        result = _result_bytes(answer)
        if result is not None:
            values[result] = None
    return list(markers) + list(values)[:limit]


def _result_bytes(answer: CallAnswer | None) -> bytes | None:
    """An opened result worth searching for: a distinctive u64, or any other result of at
    least ``MIN_NEEDLE`` bytes."""
    if answer is None or answer.report is None:
        return None
    encoded = answer.report.get("result")
    try:
        result = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        return None
    if len(result) == 8:
        return result if _distinctive(result) else None
    return result if len(result) >= MIN_NEEDLE else None


def _distinctive(u64: bytes) -> bool:
    return sum(1 for b in u64 if b) >= DISTINCTIVE_BYTES


__all__ = [
    "DISTINCTIVE_BYTES",
    "MAX_VALUE_NEEDLES",
    "TAMPER_EVIDENCE",
    "TAMPER_FAULT",
    "TAMPER_KINDS",
    "MadeCall",
    "check_contract_reference",
    "check_contract_results",
    "check_contract_roots",
    "contract_needles",
    "made_calls",
    "tampered_nodes",
]
