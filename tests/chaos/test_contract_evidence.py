"""What the contract checks read from the untrusted side (MQTT records, node views) and from
the history (calls, answers): garbage is counted or refused, never trusted and never a crash;
the client's crypto round-trips as the service enclave does it; nothing secret in a repr."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from nacl.public import PrivateKey, SealedBox
from nacl.secret import SecretBox

from kmnode.chaos.contract_calls import (
    CallAnswer,
    CallFormatError,
    ContractCall,
    open_report,
    seal_args,
)
from kmnode.chaos.contract_evidence import (
    ContractEvidence,
    NodeContracts,
    ResultRecord,
    parse_results,
)
from kmnode.chaos.nemesis import OPT_IN_KINDS, available_kinds, resolve_kinds
from kmnode.chaos.runner import RunConfig
from kmnode.config import ClusterConfig
from kmnode.contracts.envelope import SEALED_BOX, SEALED_REPLY_KEY

PREFIX, CLUSTER = "kmsim", "demo"
MARKER = "acct-5e3c7a9b1d2f4e60"


def topic(node: str, kind: str = "service/out") -> str:
    return f"{PREFIX}/{CLUSTER}/{node}/{kind}"


def record(seq: Any = 7, **changes: Any) -> dict[str, Any]:
    base = {
        "kind": "contract.result", "seq": seq, "contract": "tok", "function": "mint",
        "caller": "dev-admin", "nonce": "ab" * 16, "status": "ok", "digest": "cd" * 16,
        "fuel_used": 3000, "sealed": "AQ==",
    }  # fmt: skip
    return {**base, **changes}


def payload(data: Any) -> bytes:
    return json.dumps(data).encode()


def test_records_are_parsed_per_node_and_garbage_is_counted_not_trusted() -> None:
    messages = [
        (topic("km1"), payload(record())),
        (topic("km2"), payload({"records": [record(), record(8)]})),  # a coalesced message
        (topic("km3"), b"\xff not json"),
        (topic("km3"), payload({"kind": "service.other", "seq": 1})),  # another kind: skipped
        (topic("km3"), payload(record(seq="7"))),  # malformed
        (topic("km3"), payload(record(seq=0))),  # malformed: no operation 0
        (topic("km3"), payload(record(digest=None))),  # malformed
        (topic("km3", "events"), payload(record())),  # not the service topic
        (f"other/{CLUSTER}/km1/service/out", payload(record())),  # not this cluster
        (topic("km3"), payload([record()])),  # not an object
    ]
    records, malformed = parse_results(messages, PREFIX, CLUSTER)
    assert malformed == 3
    assert [(r.node, r.seq) for r in records] == [("km1", 7), ("km2", 7), ("km2", 8)]
    assert records[0].outcome == records[1].outcome
    assert records[0] == ResultRecord(
        "km1", 7, "tok", "mint", "dev-admin", "ab" * 16, "ok", "cd" * 16
    )


@pytest.mark.parametrize(
    "view",
    [
        None,
        [],
        {"position": "3", "committed": 3, "checkpoints": []},
        {"position": 3, "committed": 3, "checkpoints": {}},
        {"position": 3, "committed": 3, "checkpoints": [{"seq": 3}]},
        {"position": 3, "committed": 3, "checkpoints": [{"seq": 3, "roots": {"t": 5}}]},
        {"position": 3, "committed": 3, "checkpoints": [7]},
        {"position": 3, "committed": 3, "checkpoints": [], "service": {"checkpoints": None}},
    ],
)
def test_a_malformed_node_view_becomes_an_error_view(view: Any) -> None:
    parsed = NodeContracts.from_api(view)
    assert parsed.error.startswith("a malformed view") and not parsed.settled


def test_a_node_view_and_the_evidence_round_trip_through_json() -> None:
    view = NodeContracts.from_api(
        {
            "position": 12, "committed": 12, "halted": "",
            "checkpoints": [{"seq": 10, "index": 99, "roots": {"tok": "ab" * 32}}],
            "service": {"checkpoints": [{"seq": 10, "roots": {"tok": "ab" * 32}}]},
        }
    )  # fmt: skip
    assert view.settled and view.committed_roots == {10: {"tok": "ab" * 32}}
    evidence = ContractEvidence(
        "tok", 11, {"km1": view, "km2": NodeContracts.unreadable("unreachable")},
        [ResultRecord("km1", 7, "tok", "mint", "dev-admin", "ab" * 16, "ok", "cd" * 16)], 2,
    )  # fmt: skip
    again = ContractEvidence.from_json(json.loads(json.dumps(evidence.to_json())))
    assert again == evidence


def call(**changes: Any) -> ContractCall:
    base = ContractCall("tok", "transfer", "dev-admin", "ab" * 16, 1000, 0x2B3C4D5E6F71, MARKER)
    return ContractCall(**{**base.__dict__, **changes})


def test_a_call_round_trips_and_its_repr_shows_no_argument() -> None:
    made = call()
    assert ContractCall.from_args(json.loads(json.dumps(made.to_args()))) == made
    assert made.args_bytes() == (0x2B3C4D5E6F71).to_bytes(8, "little") + MARKER.encode()
    assert call(amount=None).args_bytes() == MARKER.encode()
    shown = repr(made)
    assert MARKER not in shown and str(0x2B3C4D5E6F71) not in shown


@pytest.mark.parametrize(
    "changes",
    [
        {"contract": ""},
        {"nonce": 5},
        {"fuel": 0},
        {"fuel": True},
        {"amount": -1},
        {"amount": 2**64},
        {"amount": "5"},
        {"account": 7},
    ],
)
def test_a_malformed_call_in_the_history_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(CallFormatError):
        ContractCall.from_args({**call().to_args(), **changes})


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        {"seq": 0, "status": "ok"},
        {"seq": "3", "status": "ok"},
        {"seq": 3, "status": "exploded"},
        {"seq": 3, "status": "ok", "digest": 5},
        {"seq": 3, "status": "ok", "report": "x"},
    ],
)
def test_a_malformed_answer_is_refused(value: Any) -> None:
    with pytest.raises(CallFormatError):
        CallAnswer.from_value(value)


def test_an_answer_round_trips_and_its_repr_shows_no_result() -> None:
    answer = CallAnswer(9, "ok", "ef" * 16, {"status": "ok", "result": "c2VjcmV0IQ=="})
    assert CallAnswer.from_value(json.loads(json.dumps(answer.to_value()))) == answer
    assert "c2VjcmV0IQ" not in repr(answer)


def test_sealed_arguments_open_only_with_the_input_key_and_carry_the_call() -> None:
    input_key, reply_key = PrivateKey.generate(), b"\x07" * SecretBox.KEY_SIZE
    sealed = seal_args(bytes(input_key.public_key), call(), reply_key)
    inner = json.loads(SealedBox(input_key).decrypt(base64.b64decode(sealed)))
    assert inner["caller"] == "dev-admin" and inner["nonce"] == "ab" * 16
    assert base64.b64decode(inner["args"]) == call().args_bytes()
    assert bytes.fromhex(inner["reply"]) == reply_key
    assert MARKER.encode() not in base64.b64decode(sealed)


def test_a_result_opens_under_the_reply_key_or_the_callers_key_and_nothing_else() -> None:
    caller, reply_key = PrivateKey.generate(), b"\x05" * SecretBox.KEY_SIZE
    report = {"status": "ok", "result": "AAAA"}
    data = json.dumps(report).encode()
    under_reply = SEALED_REPLY_KEY + bytes(SecretBox(reply_key).encrypt(data))
    boxed = SEALED_BOX + bytes(SealedBox(caller.public_key).encrypt(data))
    for sealed in (under_reply, boxed):
        assert open_report(bytes(caller), base64.b64encode(sealed).decode(), reply_key) == report
    with pytest.raises(CallFormatError, match="does not open"):  # another call's reply key
        open_report(bytes(caller), base64.b64encode(under_reply).decode(), b"\x06" * 32)
    with pytest.raises(CallFormatError, match="does not open"):  # another caller
        open_report(bytes(PrivateKey.generate()), base64.b64encode(boxed).decode(), reply_key)
    for garbage in ("", "!!!", base64.b64encode(b"\x09" + data).decode()):
        with pytest.raises(CallFormatError):
            open_report(bytes(caller), garbage, reply_key)
    not_an_object = SEALED_REPLY_KEY + bytes(SecretBox(reply_key).encrypt(b"[1]"))
    with pytest.raises(CallFormatError, match="not a JSON object"):
        open_report(bytes(caller), base64.b64encode(not_an_object).decode(), reply_key)


def test_tamper_state_is_taken_only_when_named_and_only_with_contracts() -> None:
    cfg = ClusterConfig.default(3)
    assert "tamper-state" in OPT_IN_KINDS and "tamper-state" not in available_kinds(cfg)
    assert resolve_kinds(cfg, ("tamper-state", "kill")) == ("tamper-state", "kill")
    RunConfig(seed=1, faults=("tamper-state",))
    with pytest.raises(ValueError, match="needs the contract workload"):
        RunConfig(seed=1, faults=("tamper-state",), contracts=False)
