"""Contracts in the KM state machine: who may deploy and call, the contract sequence every
service enclave executes in, nonces that commit once, and checkpoints that keep what a
restarting service needs to replay (and no more).

The state machine is held to this on its own: a faulty or hostile leader could commit anything.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import wasmtime

from kmnode.identity import IdentityKeys
from kmnode.km.commands import ContractCheckpointed, ContractOpCommitted
from kmnode.km.state import KMState, encode_command
from tests.km.test_state import run
from tests.km.test_state_auth import ADMIN, AUDITOR, OPERATOR, T0, auth, genesis, refusal

USER = IdentityKeys.generate("uma").public(["user"])
CODE = base64.b64encode(wasmtime.wat2wasm('(module (memory (export "memory") 1))')).decode()
_ids = itertools.count(1)


def state() -> KMState:
    return genesis((ADMIN, OPERATOR, AUDITOR, USER))


def deploy(name: str = "token", code: str = CODE, who: Any = OPERATOR) -> bytes:
    return encode_command("contract.deploy", name=name, code=code, auth=auth(who, str(next(_ids))))


def call(contract: str = "token", nonce: str | None = None, who: Any = USER, **more: Any) -> bytes:
    n = next(_ids)
    return encode_command(
        "contract.call",
        contract=contract,
        function="transfer",
        args="A" * 64,
        nonce=nonce or f"{n:032x}",
        auth=auth(who, f"c{n}", T0),
        **more,
    )


def checkpoint(seq: int, roots: dict[str, str]) -> bytes:
    return encode_command("contract.checkpoint", seq=seq, roots=roots)


def test_an_operator_deploys_and_a_user_calls_in_one_sequence() -> None:
    s = state()
    deployed, called = run(s, deploy(), call())
    assert deployed == ContractOpCommitted("token", 1, "deploy")
    assert called == ContractOpCommitted("token", 2, "call")
    op = s.contract_ops[-1]
    assert (op.seq, op.caller, op.caller_box_key, op.function) == (
        2,
        "uma",
        USER.box_key,
        "transfer",
    )
    assert s.contracts["token"].calls == 1 and s.contracts["token"].deployed_by == "otto"


def test_who_may_deploy_and_call() -> None:
    s = state()
    by_user, by_auditor, unsigned = run(
        s,
        deploy(who=USER),
        deploy(who=AUDITOR),
        encode_command("contract.deploy", name="token", code=CODE),
    )
    assert refusal(by_user)[0] == refusal(by_auditor)[0] == refusal(unsigned)[0] == "forbidden"
    run(s, deploy())
    (by_operator,) = run(s, call(who=OPERATOR))
    assert refusal(by_operator)[0] == "forbidden"  # calling is a user's act
    assert s.contract_seq == 1


def test_bad_deploys_and_calls_change_nothing() -> None:
    s = state()
    run(s, deploy())
    before = (s.contract_seq, list(s.contract_ops), dict(s.contracts))
    not_wasm = base64.b64encode(b"#!/bin/sh\nrm -rf /\n").decode()
    results = run(
        s,
        deploy(),  # the name exists
        deploy("other", not_wasm),
        deploy("other", "!!!not base64!!!"),
        deploy("Bad Name"),
        call("nope"),
        call(fuel=0),
        call(fuel=10**12),
        encode_command(
            "contract.call", contract="token", function="f", args="A" * 64, nonce="0" * 32
        ),
    )
    for result in results:
        assert not result.ok, result
    assert (s.contract_seq, list(s.contract_ops), dict(s.contracts)) == before


def test_a_nonce_commits_once() -> None:
    s = state()
    run(s, deploy())
    first, again = run(s, call(nonce="ab" * 16), call(nonce="ab" * 16))
    assert first.ok
    assert refusal(again) == ("replay", f"nonce {'ab' * 16} was used before")
    assert s.contract_seq == 2


def test_checkpoints_move_forward_and_name_every_deployed_contract() -> None:
    s = state()
    run(s, deploy(), call(), deploy("counter"), call())
    root = "ab" * 32
    results = run(
        s,
        checkpoint(5, {"token": root, "counter": root}),  # beyond the sequence
        checkpoint(2, {"token": root, "counter": root}),  # counter came at 3
        checkpoint(3, {"token": root}),  # counter is missing
        checkpoint(3, {"token": root, "counter": root}),
        checkpoint(3, {"token": root, "counter": root}),  # not after the newest
    )
    assert [r.ok for r in results] == [False, False, False, True, False]
    assert results[3] == ContractCheckpointed(3)
    assert [c.seq for c in s.checkpoints] == [3]


def test_checkpoints_keep_the_operations_after_the_older_of_the_newest_two() -> None:
    s = state()
    run(s, deploy(), *[call() for _ in range(5)])  # operations 1..6
    root = {"token": "cd" * 32}
    run(s, checkpoint(2, root))
    assert [op.seq for op in s.contract_ops] == [1, 2, 3, 4, 5, 6]  # one checkpoint: keep all
    run(s, checkpoint(4, root))
    assert [op.seq for op in s.contract_ops] == [3, 4, 5, 6]
    assert [op.seq for op in s.contract_ops_after(4)] == [5, 6]
    run(s, checkpoint(6, root))
    assert [c.seq for c in s.checkpoints] == [4, 6]
    assert [op.seq for op in s.contract_ops] == [5, 6]
    # The pruned calls' nonces are forgotten (the request window still refuses their replay).
    assert len(s.call_nonces) == 2


def test_contract_state_survives_a_snapshot() -> None:
    s = state()
    run(s, deploy(), call(), call(), checkpoint(2, {"token": "ef" * 32}))
    restored = KMState.restore(s.snapshot())
    assert restored == s
    assert restored.snapshot() == s.snapshot()
