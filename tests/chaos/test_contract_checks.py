"""The contract checks catch each broken promise in a synthetic run and pass a clean one.

A run here is made by hand: the token contract's calls are executed by the reference itself
to get the true answers (what correct nodes would answer and publish), then one thing is
broken per test: a node publishing another digest, a node whose roots differ, a wrong result
opened by the client, a marker planted on the host side.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

import pytest

from kmnode.chaos.contract_calls import CALL_FUEL, CallAnswer, ContractCall, token_wasm
from kmnode.chaos.contract_checks import (
    check_contract_reference,
    check_contract_results,
    check_contract_roots,
    contract_needles,
    tampered_nodes,
)
from kmnode.chaos.contract_evidence import ContractEvidence, NodeContracts, ResultRecord
from kmnode.chaos.contract_reference import ReferenceExecutor
from kmnode.chaos.history import History, HistoryRecorder
from kmnode.chaos.outcome import CheckOutcome
from kmnode.chaos.plaintext import check_plaintext

CONTRACT = "tok"
CALLER = "dev-admin"
NODES = ("km1", "km2", "km3")
ALICE, BOB = "acct-a1b2c3d4e5f60718", "acct-0f1e2d3c4b5a6978"
CODE = token_wasm()
#: Amounts with many nonzero bytes: distinctive enough to be searched for on the host side.
MINT, TRANSFER, OVERDRAFT = 0x2B3C4D5E6F71, 0x1C2D3E4F51, 0x2A3B4C5D6E7F8091
ROOTS = {CONTRACT: "ab" * 32}


class Tick:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def digest(report: dict[str, Any]) -> str:
    """A stand-in for the nodes' keyed digest: equal for equal reports."""
    return hashlib.blake2b(json.dumps(report, sort_keys=True).encode(), digest_size=16).hexdigest()


class Scenario:
    """A run against correct nodes: each call is executed by a reference (the truth), its
    answer recorded in the history and its record 'published' by every node."""

    def __init__(self) -> None:
        self.rec = HistoryRecorder(Tick())
        self.truth = ReferenceExecutor(CONTRACT, CODE)
        self.records: list[ResultRecord] = []
        self.seq = 1
        handle = self.rec.invoke("setup", "contract.deploy", {"contract": CONTRACT}, "km1")
        handle.ok({"seq": 1, "status": "deployed"})
        self.publish(1, "", "", "deployed", "d" * 32)
        self.nonces = 0

    def publish(
        self,
        seq: int,
        function: str,
        nonce: str,
        status: str,
        dig: str,
        nodes: tuple[str, ...] = NODES,
    ) -> None:
        caller = CALLER if function else ""
        for node in nodes:
            self.records.append(
                ResultRecord(node, seq, CONTRACT, function, caller, nonce, status, dig)
            )

    def call(
        self,
        function: str,
        amount: int | None = None,
        account: str | None = None,
        *,
        outcome: str = "ok",
        nodes: tuple[str, ...] = NODES,
    ) -> int:
        """One call; returns its history op id. ``outcome``: ok, pending, info or fail."""
        self.nonces += 1
        call = ContractCall(
            CONTRACT, function, CALLER, f"{self.nonces:032x}", CALL_FUEL, amount, account
        )
        handle = self.rec.invoke("c1", "contract.call", call.to_args(), "km2")
        if outcome == "fail":
            handle.fail("409 refused")
            return handle.op
        self.seq += 1
        report = {**self.truth.execute(call), "seq": self.seq, "contract": CONTRACT}
        report["function"] = function
        dig = digest(report)
        self.publish(self.seq, function, call.nonce, str(report["status"]), dig, nodes)
        if outcome == "ok":
            handle.ok(CallAnswer(self.seq, report["status"], dig, report).to_value())
        elif outcome == "pending":
            handle.ok(CallAnswer(self.seq, "pending").to_value())
        else:
            handle.info("timed out")
        return handle.op

    def standard(self) -> Scenario:
        """init, mints, transfers (one reverts), balances, and one call of each uncertain
        kind: a pending answer, an info (timed out) mint, a failed call."""
        self.call("init")
        self.call("mint", MINT, CALLER)
        self.call("mint", MINT + 0x10101, ALICE, outcome="info")
        self.call("transfer", TRANSFER, BOB)
        self.call("transfer", OVERDRAFT, ALICE)  # reverts: more than any balance
        self.call("balance", None, ALICE, outcome="pending")
        self.call("balance", None, BOB)
        self.call("mint", MINT, BOB, outcome="fail")
        self.call("balance", None, ALICE)  # includes the info mint: replayed or it fails
        return self

    def history(self) -> History:
        return self.rec.history()

    def evidence(self, **changes: Any) -> ContractEvidence:
        views = {
            n: NodeContracts(self.seq, self.seq, "", {self.seq: ROOTS}, {self.seq: ROOTS})
            for n in NODES
        }
        base = ContractEvidence(CONTRACT, self.seq - 1, views, self.records)
        return dataclasses.replace(base, **changes)


def judge(scenario: Scenario, evidence: ContractEvidence | None = None) -> dict[str, CheckOutcome]:
    history = scenario.history()
    ops = history.operations()
    evidence = evidence or scenario.evidence()
    return {
        "results": check_contract_results(ops, evidence.records),
        "roots": check_contract_roots(evidence.nodes, tampered_nodes(history.faults())),
        "reference": check_contract_reference(ops, evidence, CODE),
    }


def only_failing(outcomes: dict[str, CheckOutcome], name: str) -> CheckOutcome:
    assert {n for n, o in outcomes.items() if not o.valid} == {name}, outcomes
    return outcomes[name]


def test_a_clean_run_is_valid_and_every_committed_call_is_replayed() -> None:
    outcomes = judge(Scenario().standard())
    assert all(o.valid for o in outcomes.values()), outcomes
    # 8 calls may have committed (one failed); the info mint and the pending balance too.
    assert outcomes["reference"].detail.startswith("8 committed call(s) of tok replayed")
    assert "6 opened result(s) and 8 published status(es) equal" in outcomes["reference"].detail
    assert outcomes["results"].detail.startswith("9 operation(s) published by 2+ nodes agree")


def test_a_divergent_digest_on_one_node_is_caught_with_the_call_that_exposed_it() -> None:
    scenario = Scenario().standard()
    bad = next(r for r in scenario.records if r.node == "km3" and r.function == "transfer")
    records = [
        dataclasses.replace(r, digest="ff" * 16) if r is bad else r for r in scenario.records
    ]
    outcome = only_failing(judge(scenario, scenario.evidence(records=records)), "results")
    assert f"operation {bad.seq} differs across nodes" in outcome.detail
    assert "km3=tok.transfer/ok/ffffffffffff" in outcome.detail
    assert outcome.first_violation is not None and outcome.first_violation.op is not None
    assert outcome.first_violation.op.args["nonce"] == bad.nonce


def test_an_answer_unlike_what_the_nodes_published_is_caught() -> None:
    scenario = Scenario()
    scenario.call("init")
    seq = scenario.seq
    records = [
        dataclasses.replace(r, status="trapped") if r.seq == seq else r for r in scenario.records
    ]
    outcomes = judge(scenario, scenario.evidence(records=records))
    assert not outcomes["results"].valid
    assert f"operation {seq}: km2 answered ok" in outcomes["results"].detail
    # And the reference says ok, not trapped.
    assert f"operation {seq} (init) published as trapped, the reference says ok" in (
        outcomes["reference"].detail
    )


def test_a_divergent_root_is_caught() -> None:
    scenario = Scenario().standard()
    evidence = scenario.evidence()
    nodes = dict(evidence.nodes)
    nodes["km2"] = dataclasses.replace(
        nodes["km2"], computed_roots={scenario.seq: {CONTRACT: "cd" * 32}}
    )
    outcome = only_failing(judge(scenario, scenario.evidence(nodes=nodes)), "roots")
    assert f"km2's roots after operation {scenario.seq} differ from the committed" in outcome.detail


def test_roots_computed_at_an_uncommitted_checkpoint_must_agree_too() -> None:
    nodes = {
        n: NodeContracts(20, 20, "", {10: ROOTS}, {10: ROOTS, 20: {CONTRACT: r * 32}})
        for n, r in zip(NODES, ("ab", "ab", "ef"), strict=True)
    }
    outcome = check_contract_roots(nodes)
    assert not outcome.valid and "roots after operation 20 differ" in outcome.detail
    assert "km3={tok:efefefefefef}" in outcome.detail


@pytest.mark.parametrize(
    ("halted", "tampered", "valid"),
    [
        (
            "contract state of 'tok' was tampered with: flipped: the record does not open",
            True,
            True,
        ),
        (
            "contract state of 'tok' was tampered with: flipped: the record does not open",
            False,
            False,
        ),
        (
            "no copy of the contract state in the host's store matches a committed checkpoint",
            True,
            True,
        ),
        (
            "no copy of the contract state in the host's store matches a committed checkpoint",
            False,
            False,
        ),
        ("the host's contract store failed (OSError)", True, False),
    ],
)
def test_a_halted_node_is_fine_only_after_tamper_state_and_saying_it_caught_it(
    halted: str, tampered: bool, valid: bool
) -> None:
    nodes = {n: NodeContracts(5, 5, "", {5: ROOTS}, {5: ROOTS}) for n in NODES}
    nodes["km2"] = NodeContracts(3, 5, halted, {5: ROOTS}, {})
    recorder = HistoryRecorder(Tick())
    if tampered:
        recorder.fault_start("tamper-state", "km2", mode="flip", tampered="flip: ...")
    outcome = check_contract_roots(nodes, tampered_nodes(recorder.history().faults()))
    assert outcome.valid is valid, outcome
    assert "km2" in outcome.detail


def test_a_skipped_tamper_excuses_nothing_and_a_lagging_or_unreadable_node_is_caught() -> None:
    recorder = HistoryRecorder(Tick())
    recorder.fault_start("tamper-state", "km1", mode="drop", skipped="nothing to drop")
    assert tampered_nodes(recorder.history().faults()) == frozenset()
    nodes = {
        "km1": NodeContracts(4, 9, "", {}, {}),
        "km2": NodeContracts.unreadable("km2 at 127.0.0.1:1 is unreachable"),
        "km3": NodeContracts(9, 9, "", {}, {}),
    }
    outcome = check_contract_roots(nodes)
    assert not outcome.valid and outcome.violations == 2
    assert "km1 executed 4 of 9 committed operations" in outcome.detail


def test_a_wrong_result_opened_by_the_client_is_caught() -> None:
    scenario = Scenario()
    scenario.call("init")
    scenario.call("mint", 2**46 + 1, ALICE)
    op = scenario.call("balance", None, ALICE)
    history = scenario.history()
    ops = history.operations()
    wrong = next(o for o in ops if o.id == op)
    answer = CallAnswer.from_value(wrong.value)
    assert answer.report is not None
    lying = {
        **answer.report,
        "result": base64.b64encode((2**46 + 2).to_bytes(8, "little")).decode(),
    }
    ops = [
        dataclasses.replace(o, value={**o.value, "report": lying}) if o is wrong else o for o in ops
    ]
    outcome = check_contract_reference(ops, scenario.evidence(), CODE)
    assert not outcome.valid
    assert (
        f"operation {scenario.seq} (balance) answered unlike the reference in result"
        in outcome.detail
    )
    first = outcome.first_violation
    assert first is not None and first.op is not None and first.op.id == op
    # The message names no argument or result (the operation it cites is the client's own).
    assert str(2**46 + 2) not in first.message and ALICE not in first.message


def test_a_result_that_does_not_open_is_a_wrong_answer() -> None:
    scenario = Scenario()
    op = scenario.call("init")
    ops = scenario.history().operations()
    ops = [
        dataclasses.replace(
            o, value={**o.value, "report": None, "unopened": "does not open: CryptoError"}
        )
        if o.id == op
        else o
        for o in ops
    ]
    outcome = check_contract_reference(ops, scenario.evidence(), CODE)
    assert not outcome.valid and "does not open" in outcome.detail


def test_a_call_the_client_never_heard_of_is_replayed_by_its_nonce() -> None:
    """Without the info mint, the last balance would not match: the replay placed it by the
    nonce the nodes published."""
    scenario = Scenario()
    scenario.call("init")
    scenario.call("mint", 2**46 + 5, ALICE, outcome="info")
    scenario.call("balance", None, ALICE)
    assert check_contract_reference(
        scenario.history().operations(), scenario.evidence(), CODE
    ).valid
    # Its records lost: it cannot be placed, and the replay stops before the gap it leaves.
    info_seq = 3
    records = [r for r in scenario.records if r.seq != info_seq]
    outcome = check_contract_reference(
        scenario.history().operations(), scenario.evidence(records=records), CODE
    )
    assert outcome.valid, outcome
    assert outcome.detail.startswith("1 committed call(s)")
    assert f"not judged from operation {info_seq} on (1 committed call(s) unseen)" in outcome.detail


def test_a_call_nobody_made_and_a_call_at_two_places_are_caught() -> None:
    scenario = Scenario().standard()
    phantom = ResultRecord(
        "km1", scenario.seq + 1, CONTRACT, "mint", CALLER, "9" * 32, "ok", "0" * 32
    )
    outcome = check_contract_reference(
        scenario.history().operations(),
        scenario.evidence(records=[*scenario.records, phantom]),
        CODE,
    )
    assert not outcome.valid and "a call of tok no client made" in outcome.detail
    moved = [
        dataclasses.replace(r, seq=99) if r.seq == 2 and r.node == "km3" else r
        for r in scenario.records
    ]
    outcome = check_contract_reference(
        scenario.history().operations(), scenario.evidence(records=moved), CODE
    )
    assert not outcome.valid and "one call committed as operations [2, 99]" in outcome.detail


def test_more_calls_seen_committed_than_the_cluster_counts_is_caught() -> None:
    scenario = Scenario().standard()
    outcome = check_contract_reference(
        scenario.history().operations(), scenario.evidence(committed_calls=3), CODE
    )
    assert not outcome.valid and "counts 3 committed call(s)" in outcome.detail


def test_a_malformed_contract_call_in_the_history_is_a_violation_not_a_crash() -> None:
    recorder = HistoryRecorder(Tick())
    recorder.invoke("c1", "contract.call", {"contract": CONTRACT, "function": 7}, "km1").ok({})
    ops = recorder.history().operations()
    for outcome in (
        check_contract_results(ops, []),
        check_contract_reference(ops, Scenario().evidence(), CODE),
    ):
        assert not outcome.valid and "malformed contract call" in outcome.detail
    assert contract_needles(ops) == []


# --- the plaintext scan's needles ----------------------------------------------------------------


def test_a_planted_marker_or_result_is_found_and_a_clean_host_passes() -> None:
    ops = Scenario().standard().history().operations()
    needles = contract_needles(ops)
    assert ALICE.encode() in needles and BOB.encode() in needles
    assert CALLER.encode() not in needles  # public: every record names it
    assert MINT.to_bytes(8, "little") in needles  # a distinctive amount
    assert OVERDRAFT.to_bytes(8, "little") in needles
    assert (2**61).to_bytes(8, "little") not in needles
    clean = [("nodes/km1/contracts.sqlite", b"\x00" * 64 + b"sealed records"), ("mqtt:x#0", b"{}")]
    assert check_plaintext(clean, needles).valid
    planted = [*clean, ("logs/km2.log", b"... to " + base64.b64encode(b"xx" + BOB.encode()))]
    outcome = check_plaintext(planted, needles)
    assert not outcome.valid and "logs/km2.log" in outcome.detail
    remaining = MINT - TRANSFER  # what the transfer answered: the payer's balance
    result = remaining.to_bytes(8, "little")
    assert result in needles
    assert not check_plaintext([("mqtt:y#3", b"x" + result.hex().encode())], needles).valid


def test_only_distinctive_values_are_searched_and_their_number_is_bounded() -> None:
    scenario = Scenario()
    scenario.call("init")
    for i in range(10):
        scenario.call("mint", MINT + i * 0x1010101, CALLER)
    scenario.call("mint", 3, ALICE)  # 3: found by chance anywhere, not searched for
    needles = contract_needles(scenario.history().operations(), limit=4)
    assert needles[0] == ALICE.encode() and len(needles) == 5
    assert (3).to_bytes(8, "little") not in needles
