"""Feeding committed contract operations to this node's service enclave, in order.

The KM state holds the committed contract operations a service may still need (``KMState.
contract_ops``), the deployed contracts and the newest checkpoints; this module keeps the
service enclave in step with them, one exchange at a time (a single task, so operations can
never overtake each other):

1. a service instance it has not seen (the node just started, or the service crashed and was
   started again) gets the contract keys by local attestation (``KMEnclave.
   provision_contract_keys``) and is told to restore: from the host store's kept copy that
   matches a committed checkpoint, or from nothing while every operation is still kept;
2. the contract keys are provided again after every deploy (the envelope holds them all);
3. committed checkpoints are handed over for comparison (a mismatch halts the service);
4. the operations after the service's position go over in batches; their outcomes wake the
   API requests waiting for them, and the checkpoints the service crossed are proposed by the
   leader.

Nothing here decides what a service may do: the KM enclave decides which keys it gets, the
service decides what it executes (only the next operation, only with keys it holds).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from kmnode.km.commands import (
    Applied,
    ContractCheckpoint,
    ContractCheckpointed,
    ContractOpCommitted,
)
from kmnode.km.service_link import ServiceRefused
from kmnode.km.state import ContractOp, KMState
from kmnode.service_pipe import (
    MAX_OPS_BATCH,
    MAX_OPS_BATCH_BYTES,
    ContractCheckRequest,
    ContractKeysReply,
    ContractKeysRequest,
    ContractOpsRequest,
    ContractRestoreRequest,
    ContractStateReply,
    ContractStatusReply,
    ContractStatusRequest,
    PipeCheckpoint,
    PipeDeployed,
    PipeOperation,
    PipeOutcome,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

log = logging.getLogger(__name__)
#: Outcomes kept for API requests that ask after the service answered.
OUTCOMES_KEPT = 4096
#: Pause after the service could not be reached (it is restarted by the next request).
RETRY_S = 0.5


class ContractFeed:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        self._wake = asyncio.Event()
        #: The service instance (restart count) last restored, and the contracts whose keys it got.
        self._instance: int | None = None
        self._keys_for: frozenset[str] | None = None
        #: The service's position and why it stopped ("" while it runs).
        self.position = 0
        self.halted = ""
        #: The newest committed checkpoint handed to the service.
        self._checked = 0
        self._outcomes: OrderedDict[int, PipeOutcome] = OrderedDict()
        self._waiters: dict[int, list[asyncio.Future[PipeOutcome]]] = {}

    # --- driving ----------------------------------------------------------------------------

    def on_apply(self, result: Applied) -> None:
        if isinstance(result, ContractOpCommitted | ContractCheckpointed):
            self._wake.set()

    def wake(self) -> None:
        """Look again now: the master secret just came back (a recovery), so the operations
        committed before it can run."""
        self._wake.set()

    def resync(self) -> None:
        """Restore the service again (``kmctl contracts resync`` put a copy in the store)."""
        self._instance = None
        self._wake.set()

    async def run(self) -> None:
        """The feed's task (``KMNode.spawn``): wake, bring the service up to date, repeat."""
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                more = await self._sync()
            except ServiceUnavailable as exc:
                log.warning("%s: contracts: service enclave unavailable: %s", self.node.name, exc)
                await asyncio.sleep(RETRY_S)
                more = True
            except Exception:  # never let the feed die: it is the only one
                log.exception("%s: contracts: feeding the service failed", self.node.name)
                await asyncio.sleep(RETRY_S)
                more = True
            if more:
                self._wake.set()

    async def _sync(self) -> bool:
        """One step; True if there is more to do at once."""
        state = self.node.enclave.state
        if state.contract_seq == 0 or not self.node.enclave.has_master_secret:
            return False
        service = self.node.service
        if self._instance != service.restarts or not service.running:
            # A restore is what repairs a halted service: try it afresh.
            self._keys_for, self.halted = None, ""
            await self._provide_keys(state)
            if not self.halted and await self._restore(state):
                self._instance = service.restarts
            return not self.halted
        if self._keys_for != frozenset(state.contracts):
            await self._provide_keys(state)
        if self.halted:
            return False
        for checkpoint in state.checkpoints:
            if checkpoint.seq > self._checked:
                message = PipeCheckpoint(seq=checkpoint.seq, roots=checkpoint.roots)
                self._track(await self._ask(ContractCheckRequest(checkpoint=message)))
                self._checked = checkpoint.seq
        ops = state.contract_ops_after(self.position)
        if not ops:
            if self.position < state.contract_seq:
                self._halt(
                    f"this service is at operation {self.position}, before the operations the "
                    "cluster keeps: resync from a peer (kmctl contracts resync NODE)"
                )
            return False
        before = self.position
        reply = await self._ask(ContractOpsRequest(ops=_batch(state, ops)))
        self._track(reply)
        for outcome in reply.outcomes:
            self._deliver(outcome)
        for crossed in reply.checkpoints:
            self._propose_checkpoint(crossed)
        if reply.need_keys:
            self._keys_for = None
            return True
        if reply.position < before:  # a service we had not noticed was restarted
            self._instance = None
            return True
        return reply.position > before and not self.halted

    async def _ask(self, request: Any) -> ContractStateReply:
        reply: ContractStateReply = await self.node.service.request(request, ContractStateReply)
        return reply

    def _track(self, reply: ContractStateReply) -> None:
        self.position = reply.position
        if reply.halted:
            self._halt(reply.halted)

    def _halt(self, reason: str) -> None:
        if not self.halted:
            log.error("%s: contract execution stopped: %s", self.node.name, reason)
            self.node.publish_event("contracts.halted", reason=reason, position=self.position)
        self.halted = reason

    async def _provide_keys(self, state: KMState) -> None:
        """Local attestation, then every contract key boxed to the service (``KMEnclave.
        provision_contract_keys`` decides)."""
        enclave = self.node.enclave
        wanted = frozenset(state.contracts)
        challenge = enclave.new_challenge()
        response = await self.node.service.challenge(enclave.identity.measurement, challenge)
        result = enclave.provision_contract_keys(challenge, response)
        if not result.ok:
            self._halt(f"the contract keys were refused to this service: {result.reason}")
            return
        request = ContractKeysRequest(ciphertext=result.ciphertext.hex(), vouch=result.vouch.hex())
        try:
            await self.node.service.request(request, ContractKeysReply)
        except ServiceRefused as exc:
            self._halt(f"the service enclave refused the contract keys: {exc}")
            return
        self._keys_for = wanted

    async def _restore(self, state: KMState) -> bool:
        """Tell the service to restore; False if it lacked keys for it (asked again later)."""
        checkpoints = [
            PipeCheckpoint(seq=c.seq, roots=c.roots) for c in reversed(state.checkpoints)
        ]
        contracts = [
            PipeDeployed(name=c.name, code=c.code, deployed_seq=c.deployed_seq)
            for c in state.contracts.values()
        ]
        # With fewer than two checkpoints nothing was pruned: every operation can be replayed.
        request = ContractRestoreRequest(
            checkpoints=checkpoints, contracts=contracts, from_genesis=len(state.checkpoints) < 2
        )
        self.halted = ""
        reply = await self._ask(request)
        if reply.need_keys:
            self._keys_for = None
            return False
        self._track(reply)
        # A checkpoint the restore used needs no comparison; newer ones do.
        self._checked = reply.position if not reply.halted else self._checked
        if not reply.halted:
            log.info("%s: contracts restored to operation %d", self.node.name, reply.position)
        return True

    def _propose_checkpoint(self, crossed: PipeCheckpoint) -> None:
        """The leader proposes the roots its service reached (a follower's are compared)."""
        driver = self.node.driver
        state = self.node.enclave.state
        newest = state.checkpoints[-1].seq if state.checkpoints else 0
        if driver is None or not driver.is_leader or crossed.seq <= newest or self.halted:
            return
        command = ContractCheckpoint(seq=crossed.seq, roots=dict(crossed.roots)).encode()

        async def propose() -> None:
            try:
                await self.node.propose(command)
            except Exception as exc:  # a lost leadership, a timeout: the next one will do
                log.info("%s: checkpoint %d not committed: %s", self.node.name, crossed.seq, exc)

        self.node.spawn(propose())

    # --- outcomes for API callers -------------------------------------------------------------

    def _deliver(self, outcome: PipeOutcome) -> None:
        self._outcomes[outcome.seq] = outcome
        while len(self._outcomes) > OUTCOMES_KEPT:
            self._outcomes.popitem(last=False)
        for future in self._waiters.pop(outcome.seq, []):
            if not future.done():
                future.set_result(outcome)

    async def outcome(self, seq: int, timeout: float) -> PipeOutcome | None:
        """The outcome of operation ``seq`` on this node, once executed (None after
        ``timeout``)."""
        known = self._outcomes.get(seq)
        if known is not None:
            return known
        future: asyncio.Future[PipeOutcome] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(seq, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(seq, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(seq, None)

    async def status(self) -> dict[str, Any]:
        """This node's contract execution: the feed's view and the service's own."""
        view: dict[str, Any] = {
            "node": self.node.name,
            "position": self.position,
            "committed": self.node.enclave.state.contract_seq,
            "halted": self.halted,
        }
        try:
            reply = await self.node.service.request(ContractStatusRequest(), ContractStatusReply)
        except ServiceUnavailable as exc:
            return {**view, "service": None, "service_error": str(exc)}
        view["service"] = reply.model_dump(exclude={"id", "ok", "error", "outcomes"})
        return view


def _batch(state: KMState, ops: list[ContractOp]) -> list[PipeOperation]:
    """The next operations, bounded in count and bytes (a deploy carries its code)."""
    batch: list[PipeOperation] = []
    size = 0
    for op in ops[:MAX_OPS_BATCH]:
        code = state.contracts[op.contract].code if op.kind == "deploy" else ""
        message = PipeOperation(
            seq=op.seq,
            kind=op.kind,  # type: ignore[arg-type]  # deploy | call, as the state wrote it
            contract=op.contract,
            function=op.function,
            args=op.args,
            caller=op.caller,
            caller_box_key=op.caller_box_key,
            nonce=op.nonce,
            fuel=op.fuel,
            code=code,
        )
        size += len(op.args) + len(code) + 256
        if batch and size > MAX_OPS_BATCH_BYTES:
            break
        batch.append(message)
    return batch


__all__ = ["ContractFeed"]
