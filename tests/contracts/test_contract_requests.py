"""The service enclave's contract requests when the host's store fails under a call: the call
leaves no outcome, no ring record and no position behind, execution stops saying why, and a
restore (from a committed checkpoint or from nothing) brings it back."""

from __future__ import annotations

import secrets
from pathlib import Path

from nacl.public import PrivateKey

from kmnode.cli.contracts_cmds import encode_args
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.envelope import seal_call
from kmnode.contracts.store_wire import StoreUnavailable
from kmnode.host.contract_store import ContractStore
from kmnode.service.contract_requests import handle_contract
from kmnode.service.contracts import ContractRuntime
from kmnode.service_pipe import (
    ContractOpsRequest,
    ContractRestoreRequest,
    ContractStateReply,
    PipeDeployed,
    PipeOperation,
)
from tests.contracts.test_service_runtime import INPUT, TOKEN
from tests.km.enclaves import service

USER = PrivateKey.generate()


class FlakyStore(ContractStore):
    """The real store, until the host stops answering reads."""

    failing = False

    def get(self, contract: str, hidden: bytes) -> bytes | None:
        if self.failing:
            raise StoreUnavailable("no reply within 10s")
        return super().get(contract, hidden)


class Ring:
    def __init__(self) -> None:
        self.records: list[bytes] = []

    def write(self, data: bytes, type: int = 0) -> bool:
        self.records.append(data)
        return True


def call(seq: int, function: str, *args: str) -> PipeOperation:
    nonce = secrets.token_hex(16)
    sealed = seal_call(bytes(INPUT.public_key), "uma", nonce, encode_args(args), None)
    return PipeOperation(
        seq=seq, kind="call", contract="token", function=function, args=sealed, caller="uma",
        caller_box_key=bytes(USER.public_key).hex(), nonce=nonce, fuel=1_000_000,
    )  # fmt: skip


def ops(*items: PipeOperation) -> ContractOpsRequest:
    return ContractOpsRequest(ops=list(items))


def send(runtime: ContractRuntime, ring: Ring, request: object) -> ContractStateReply:
    reply = handle_contract(runtime, service("a"), ring, request)  # type: ignore[arg-type]
    assert isinstance(reply, ContractStateReply)
    return reply


def test_a_store_that_fails_under_a_call_stops_execution_and_nothing_leaves(
    tmp_path: Path,
) -> None:
    store = FlakyStore(tmp_path / "c.sqlite", fsync=False)
    runtime = ContractRuntime(store, CacheConfig(max_entries=0), 100)
    runtime.install_keys(bytes(INPUT), {"token": secrets.token_bytes(32)})
    ring = Ring()
    deploy = PipeOperation(seq=1, kind="deploy", contract="token", code=TOKEN)
    first = send(runtime, ring, ops(deploy, call(2, "init"), call(3, "mint", "u64:5", "uma")))
    assert first.position == 3 and len(first.outcomes) == 3 and len(ring.records) == 3
    store.failing = True
    stalled = send(runtime, ring, ops(call(4, "balance", "uma"), call(5, "init")))
    assert stalled.position == 3 and stalled.outcomes == [] and len(ring.records) == 3
    assert "store failed" in stalled.halted and "StoreUnavailable" in stalled.halted
    again = send(runtime, ring, ops(call(4, "balance", "uma")))
    assert again.position == 3 and again.outcomes == []  # halted: nothing runs
    # The host answers again; a restore from nothing (no checkpoint was committed yet) and a
    # replay of the kept operations bring the same state back.
    store.failing = False
    restored = send(
        runtime,
        ring,
        ContractRestoreRequest(
            checkpoints=[],
            contracts=[PipeDeployed(name="token", code=TOKEN, deployed_seq=1)],
            from_genesis=True,
        ),
    )
    assert restored.position == 0 and not restored.halted
    replay = send(
        runtime,
        ring,
        ops(deploy, call(2, "init"), call(3, "mint", "u64:5", "uma"), call(4, "balance", "uma")),
    )
    assert replay.position == 4 and [o.status for o in replay.outcomes] == [
        "deployed",
        "ok",
        "ok",
        "ok",
    ]
    store.close()
