"""The service enclave's contract runtime against a hostile caller and a hostile host: it
executes only the next committed operation, opens only arguments sealed for that very call,
seals results to the caller alone, halts on tampered state or a differing committed root,
and restores only from a copy whose roots a checkpoint committed.

The host's store here is the real one (``kmnode.host.contract_store``), used in-process."""

from __future__ import annotations

import base64
import json
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from nacl.public import PrivateKey, SealedBox

from kmnode.cli.contracts_cmds import encode_args
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.envelope import open_result, seal_call
from kmnode.host.contract_store import ContractStore
from kmnode.service.contracts import (
    ContractRuntime,
    Deployed,
    Halted,
    NeedKeys,
    Operation,
    OrderError,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = base64.b64encode(
    wasmtime.wat2wasm((REPO / "examples/contracts/token.wat").read_text())
).decode()
INPUT = PrivateKey.generate()
STATE_KEY = secrets.token_bytes(32)
USERS = {name: PrivateKey.generate() for name in ("alice", "bob", "eve")}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContractStore]:
    with ContractStore(tmp_path / "contracts.sqlite", fsync=False) as opened:
        yield opened


def runtime(store: ContractStore, every: int = 4, entries: int = 2) -> ContractRuntime:
    made = ContractRuntime(store, CacheConfig(max_entries=entries, flush_every=2), every)
    made.install_keys(bytes(INPUT), {"token": STATE_KEY})
    return made


def call(
    seq: int, function: str, *args: str, caller: str = "alice", sealed_for: str = ""
) -> Operation:
    nonce = secrets.token_hex(16)
    sealed = seal_call(bytes(INPUT.public_key), sealed_for or caller, nonce, encode_args(args))
    return Operation(
        seq, "call", "token", function, sealed, caller,
        bytes(USERS[caller].public_key).hex(), nonce, 1_000_000,
    )  # fmt: skip


def deploy(seq: int = 1) -> Operation:
    return Operation(seq, "deploy", "token", code=TOKEN)


def script() -> list[Operation]:
    """Deploy, init, mint to three accounts, transfers: ten operations."""
    return [
        deploy(),
        call(2, "init"),
        call(3, "mint", "u64:100", "alice"),
        call(4, "mint", "u64:50", "bob"),
        call(5, "mint", "u64:10", "eve"),
        call(6, "transfer", "u64:30", "bob"),
        call(7, "transfer", "u64:5", "alice", caller="bob"),
        call(8, "balance", "alice"),
        call(9, "balance", "bob"),
        call(10, "transfer", "u64:1000", "eve"),
    ]


def opened(caller: str, sealed: bytes) -> dict[str, object]:
    return open_result(bytes(USERS[caller]), base64.b64encode(sealed).decode(), None)


def u64(result: dict[str, object]) -> int:
    return int.from_bytes(base64.b64decode(str(result["result"])), "little")


def test_results_are_sealed_to_the_caller_and_equal_on_every_node(tmp_path: Path) -> None:
    stores = [ContractStore(tmp_path / f"n{i}.sqlite", fsync=False) for i in range(2)]
    nodes = [runtime(stores[0], entries=0), runtime(stores[1], entries=64)]
    ops = script()
    outcomes = [[node.execute(op) for op in ops] for node in nodes]
    assert [o.digest for o in outcomes[0]] == [o.digest for o in outcomes[1]]
    assert [o.status for o in outcomes[0]] == [
        "deployed", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "reverted"
    ]  # fmt: skip
    assert u64(opened("alice", outcomes[0][7].sealed)) == 75
    assert u64(opened("alice", outcomes[0][8].sealed)) == 75  # bob: 50 + 30 - 5
    with pytest.raises(Exception, match="does not open"):
        opened("eve", outcomes[0][7].sealed)  # alice's result is alice's alone
    assert nodes[0].roots() == nodes[1].roots()
    for s in stores:
        s.close()


def test_a_reply_key_sealed_with_the_arguments_is_what_the_result_opens_with(
    store: ContractStore,
) -> None:
    node = runtime(store)
    for op in script()[:3]:
        node.execute(op)
    reply = secrets.token_bytes(32)
    nonce = secrets.token_hex(16)
    sealed = seal_call(bytes(INPUT.public_key), "alice", nonce, encode_args(("alice",)), reply)
    op = Operation(4, "call", "token", "balance", sealed, "alice",
                   bytes(USERS["alice"].public_key).hex(), nonce, 1_000_000)  # fmt: skip
    outcome = node.execute(op)
    encoded = base64.b64encode(outcome.sealed).decode()
    assert outcome.sealed[:1] == b"\x01"
    assert u64(open_result(bytes(USERS["alice"]), encoded, reply)) == 100
    with pytest.raises(Exception, match="does not open"):
        open_result(bytes(USERS["alice"]), encoded, None)  # the identity's key alone does not
    with pytest.raises(Exception, match="does not open"):
        open_result(bytes(USERS["eve"]), encoded, secrets.token_bytes(32))


def test_only_the_next_operation_executes(store: ContractStore) -> None:
    node = runtime(store)
    node.execute(deploy())
    with pytest.raises(OrderError):
        node.execute(call(3, "init"))  # a gap
    node.execute(call(2, "init"))
    with pytest.raises(OrderError):
        node.execute(call(2, "init"))  # a replay
    assert node.position == 2


def test_arguments_sealed_for_another_call_are_refused_alike(store: ContractStore) -> None:
    node = runtime(store)
    for op in script()[:4]:
        node.execute(op)
    # Eve pastes arguments alice sealed (for alice) into a call of her own.
    stolen = call(5, "transfer", "u64:100", "eve", caller="eve", sealed_for="alice")
    refused = node.execute(stolen)
    assert refused.status == "refused"
    assert "not sealed for this call" in str(opened("eve", refused.sealed)["error"])
    garbage = Operation(6, "call", "token", "transfer", base64.b64encode(b"x" * 80).decode(),
                        "eve", bytes(USERS["eve"].public_key).hex(), "00" * 16, 1000)  # fmt: skip
    assert node.execute(garbage).status == "refused"
    balance = node.execute(call(7, "balance", "alice"))
    assert u64(opened("alice", balance.sealed)) == 100  # nothing moved


def test_keys_are_never_replaced_and_calls_wait_for_them(store: ContractStore) -> None:
    bare = ContractRuntime(store, CacheConfig(), 4)
    with pytest.raises(NeedKeys):
        bare.execute(deploy())
    assert bare.position == 0
    bare.install_keys(bytes(INPUT), {"token": STATE_KEY})
    with pytest.raises(ValueError, match="other bytes"):
        bare.install_keys(bytes(INPUT), {"token": secrets.token_bytes(32)})
    with pytest.raises(ValueError, match="other bytes"):
        bare.install_keys(secrets.token_bytes(32), {})
    assert bare.execute(deploy()).status == "deployed"


@pytest.mark.parametrize("mode", ["flip", "swap", "rollback", "drop"])
def test_tampered_state_halts_before_any_result_that_depends_on_it(
    store: ContractStore, mode: str
) -> None:
    node = runtime(store, entries=0)  # every read goes to the host
    for op in script()[:7]:
        node.execute(op)
    store.tamper(mode, "token", random.Random(1))  # type: ignore[arg-type]
    outcomes = []
    # Between them, these read every key: the owner, and each account.
    after = [
        call(8, "mint", "u64:1", "alice"),
        call(9, "transfer", "u64:1", "eve", caller="bob"),
        call(10, "transfer", "u64:1", "alice", caller="eve"),
    ]
    with pytest.raises(Halted) as halted:
        for op in after:
            outcomes.append(node.execute(op))
    kinds = ("flipped", "swapped", "stale", "missing")
    assert any(kind in str(halted.value) for kind in kinds), halted.value
    assert node.halted and node.position == 7 + len(outcomes)
    with pytest.raises(Halted):
        node.execute(call(node.position + 1, "balance", "alice"))


def test_a_differing_committed_root_halts_and_drops_the_cache(store: ContractStore) -> None:
    node = runtime(store, every=4)
    for op in script()[:4]:
        node.execute(op)
    ours = node.roots_at[4]
    node.check(4, {"token": "00" * 32})
    assert "differ from the committed checkpoint" in node.halted
    assert node.cache_stats().drops == 1 and ours == node.roots_at[4]


def test_a_committed_checkpoint_ahead_is_compared_when_reached(store: ContractStore) -> None:
    node = runtime(store, every=4)
    node.check(4, {"token": "11" * 32})  # committed before this node got there
    for op in script()[:3]:
        node.execute(op)
    assert not node.halted
    node.execute(script()[3])
    assert node.halted


def test_restore_from_a_committed_checkpoint_then_replay(tmp_path: Path) -> None:
    with ContractStore(tmp_path / "a.sqlite", fsync=False) as store:
        first = runtime(store, every=4)
        ops = script()
        outcomes = [first.execute(op) for op in ops]
        committed = [(8, first.roots_at[8]), (4, first.roots_at[4])]
        contracts = [Deployed("token", TOKEN, 1)]
        # A restarted enclave: nothing but the host's store and the committed checkpoints.
        second = runtime(store, every=4)
        second.restore(committed, contracts, from_genesis=False)
        assert second.position == 8 and not second.halted
        replayed = [second.execute(op) for op in ops[8:]]
        assert [o.digest for o in replayed] == [o.digest for o in outcomes[8:]]
        assert second.roots() == first.roots()


def test_restore_refuses_copies_that_do_not_match_a_committed_root(tmp_path: Path) -> None:
    with ContractStore(tmp_path / "a.sqlite", fsync=False) as store:
        first = runtime(store, every=4)
        for op in script():
            first.execute(op)
        wrong = [(8, {"token": "22" * 32}), (4, {"token": "33" * 32})]
        second = runtime(store, every=4)
        second.restore(wrong, [Deployed("token", TOKEN, 1)], from_genesis=False)
        assert "resync" in second.halted and second.position == 0
        with pytest.raises(Halted):
            second.execute(deploy())


def test_restore_from_genesis_clears_what_the_host_kept(tmp_path: Path) -> None:
    with ContractStore(tmp_path / "a.sqlite", fsync=False) as store:
        first = runtime(store, every=100)
        outcomes = [first.execute(op) for op in script()]
        first.roots()  # everything written back
        assert sum(1 for _ in store.records()) > 0
        second = runtime(store, every=100)
        second.restore([], [Deployed("token", TOKEN, 1)], from_genesis=True)
        assert second.position == 0 and sum(1 for _ in store.records()) == 0
        again = [second.execute(op) for op in script()]
        assert [o.digest for o in again] == [o.digest for o in outcomes]


def test_nothing_secret_in_repr_or_outcome_fields(store: ContractStore) -> None:
    node = runtime(store)
    outcomes = [node.execute(op) for op in script()]
    text = repr(node) + "".join(repr(o) + o.digest for o in outcomes)
    assert STATE_KEY.hex() not in text and bytes(INPUT).hex() not in text
    public = json.dumps([o.status for o in outcomes])
    assert "alice" not in public
    assert all(SealedBox for _ in outcomes)
