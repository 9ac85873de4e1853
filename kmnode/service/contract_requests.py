"""The service enclave's contract requests: pipe messages in, ``ContractRuntime`` calls, replies
and ring records out.

Each outcome leaves twice: in the reply to the KM enclave process (which hands a caller its
sealed result through the operator API) and as a ring record the host publishes on MQTT. Both
carry only what may leave the enclave: the result sealed to the caller, a keyed digest, the
status and the fuel used.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from typing import Protocol

from kmnode.service.contracts import (
    ContractRuntime,
    Deployed,
    Halted,
    NeedKeys,
    Operation,
    OrderError,
    Outcome,
)
from kmnode.service.enclave import ProvisioningError, ServiceEnclave
from kmnode.service_pipe import (
    ContractCheckRequest,
    ContractKeysReply,
    ContractKeysRequest,
    ContractOpsRequest,
    ContractRestoreRequest,
    ContractStateReply,
    ContractStatusReply,
    ContractStatusRequest,
    PipeCheckpoint,
    PipeOutcome,
    Reply,
)

RECORD_CONTRACT_RESULT = 2

ContractRequest = (
    ContractKeysRequest
    | ContractOpsRequest
    | ContractCheckRequest
    | ContractRestoreRequest
    | ContractStatusRequest
)


class Output(Protocol):
    def write(self, data: bytes, type: int = 0) -> bool: ...


class ContractsUnavailable(ValueError):
    """This service enclave has no contract runtime (no store was handed to it)."""


def handle_contract(
    runtime: ContractRuntime | None,
    enclave: ServiceEnclave,
    writer: Output,
    request: ContractRequest,
) -> Reply:
    if runtime is None:
        raise ContractsUnavailable("this service enclave has no contract store")
    if isinstance(request, ContractKeysRequest):
        input_key, keys = enclave.accept_contract_keys(
            bytes.fromhex(request.ciphertext), bytes.fromhex(request.vouch)
        )
        try:
            names = runtime.install_keys(input_key, keys)
        except ValueError as exc:
            raise ProvisioningError(f"contract keys rejected: {exc}") from None
        return ContractKeysReply(contracts=names)
    if isinstance(request, ContractOpsRequest):
        return _execute(runtime, writer, request)
    if isinstance(request, ContractCheckRequest):
        runtime.check(request.checkpoint.seq, request.checkpoint.roots)
        return _state(runtime)
    if isinstance(request, ContractRestoreRequest):
        try:
            runtime.restore(
                [(c.seq, c.roots) for c in request.checkpoints],
                [Deployed(d.name, d.code, d.deployed_seq) for d in request.contracts],
                request.from_genesis,
            )
        except NeedKeys:
            return _state(runtime).model_copy(update={"need_keys": True})
        return _state(runtime)
    return _status(runtime)


def _execute(runtime: ContractRuntime, writer: Output, request: ContractOpsRequest) -> Reply:
    outcomes: list[PipeOutcome] = []
    crossed: list[PipeCheckpoint] = []
    need_keys = False
    for message in request.ops:
        if message.seq <= runtime.position:
            continue  # executed before (a request sent again): never twice
        op = Operation(**message.model_dump())
        try:
            outcome = runtime.execute(op)
        except NeedKeys:
            need_keys = True
            break
        except (OrderError, Halted):
            break
        except Exception as exc:  # the host's store failed under a call: not a result
            runtime.halted = (
                f"the host's contract store failed ({type(exc).__name__}); "
                "restart the node or resync (kmctl contracts resync NODE)"
            )
            break
        outcomes.append(_pipe_outcome(outcome))
        writer.write(_record(op, outcome), RECORD_CONTRACT_RESULT)
        if op.seq in runtime.roots_at:
            crossed.append(PipeCheckpoint(seq=op.seq, roots=runtime.roots_at[op.seq]))
    return _state(runtime).model_copy(
        update={"outcomes": outcomes, "checkpoints": crossed, "need_keys": need_keys}
    )


def _pipe_outcome(outcome: Outcome) -> PipeOutcome:
    return PipeOutcome(
        seq=outcome.seq,
        status=outcome.status,  # type: ignore[arg-type]  # one of PipeOutcome's statuses
        sealed=base64.b64encode(outcome.sealed).decode(),
        digest=outcome.digest,
        fuel_used=outcome.fuel_used,
    )


def _record(op: Operation, outcome: Outcome) -> bytes:
    """The ring record of an outcome (published on MQTT: public fields and ciphertext)."""
    record = {
        "kind": "contract.result",
        "seq": op.seq,
        "contract": op.contract,
        "function": op.function,
        "caller": op.caller,
        "nonce": op.nonce,
        "status": outcome.status,
        "digest": outcome.digest,
        "fuel_used": outcome.fuel_used,
        "sealed": base64.b64encode(outcome.sealed).decode(),
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _state(runtime: ContractRuntime) -> ContractStateReply:
    return ContractStateReply(position=runtime.position, halted=runtime.halted[:1024])


def _status(runtime: ContractRuntime) -> ContractStatusReply:
    stats = runtime.cache_stats()
    cache: dict[str, int | float] = {k: v for k, v in asdict(stats).items()}
    cache["hit_ratio"] = round(stats.hit_ratio, 6)
    roots = [PipeCheckpoint(seq=s, roots=r) for s, r in sorted(runtime.roots_at.items())]
    return ContractStatusReply(
        position=runtime.position,
        halted=runtime.halted[:1024],
        restores=runtime.restores,
        contracts=runtime.contracts(),
        cache=cache,
        cache_config=asdict(runtime.cache_config),
        checkpoints=roots[-8:],
    )


__all__ = ["ContractRequest", "ContractsUnavailable", "handle_contract"]
