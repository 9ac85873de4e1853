"""The contract workload of `kmctl chaos run`: the token contract, deployed once per run, and
a modest share of token calls mixed into the clients' operations.

Why a fresh contract per run: its state starts empty and only this run calls it, so the
checker can replay every committed call from the beginning through its reference. Why random
account names: they are markers the plaintext scan looks for on the host side; the caller
(the signing identity, the only user a development cluster has) pays every transfer, mints
go to it and to the markers, and some transfers ask for more than it holds (they revert).
Amounts are large random numbers so that amounts and balances are distinctive bytes too.

After the run, ``collect`` waits (bounded) until every node has executed every committed
operation or says why not, and until the nodes' records of them reached the MQTT capture,
then reads what the contract checks need (``ContractEvidence``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import secrets
import time
import urllib.parse
from collections.abc import Callable, Sequence

import wasmtime
from nacl.secret import SecretBox

from kmnode.chaos.contract_calls import (
    CALL_FUEL,
    CallAnswer,
    CallFormatError,
    ContractCall,
    open_report,
    seal_args,
    token_wasm,
)
from kmnode.chaos.contract_evidence import (
    ContractEvidence,
    NodeContracts,
    ResultRecord,
    parse_results,
)
from kmnode.chaos.history import HistoryRecorder
from kmnode.client import NodeClient
from kmnode.config import ClusterConfig
from kmnode.errors import EXIT_FAILURE, KmsimError
from kmnode.identity import IdentityKeys

#: Seconds a call waits for its node to execute it (then it is answered ``pending``).
EXECUTION_WAIT = 5.0
#: Seconds a node waits for its service enclave to execute a deploy (then: ``pending``).
DEPLOY_WAIT = 10.0
#: Seconds the HTTP request of a call may take on top of that.
REQUEST_SLACK = 5.0
ACCOUNTS = 4
#: Seconds to wait for the newest records to reach the capture (records a killed node never
#: published are not worth a longer wait: the checks judge what was captured).
RECORDS_WAIT = 10.0
_POLL = 0.2


class WorkloadError(KmsimError):
    """The workload could not start (no contract code, deploy or init refused)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the contract workload could not start: {message}", EXIT_FAILURE)


class TokenWorkload:
    """One run's token contract, its accounts and the calls made of it."""

    def __init__(self, cfg: ClusterConfig, signer: IdentityKeys, seed: int) -> None:
        self.cfg, self.signer = cfg, signer
        self.names = [n.name for n in cfg.nodes]
        self.contract = f"chaos{seed % 10**6}-{time.time_ns() % 10**9:09d}"
        self.accounts = [f"acct-{secrets.token_hex(8)}" for _ in range(ACCOUNTS)]
        try:
            self.code = token_wasm()
        except (OSError, wasmtime.WasmtimeError) as exc:
            raise WorkloadError(f"no token contract ({exc}); --no-contracts runs without") from None
        self._input_key = b""

    def __repr__(self) -> str:
        return f"TokenWorkload({self.contract}, {len(self.accounts)} accounts)"

    def _client(self, node: str, timeout: float = EXECUTION_WAIT + REQUEST_SLACK) -> NodeClient:
        return NodeClient.for_node(self.cfg.node(node), timeout, self.signer)

    # --- before the clients start -------------------------------------------------------------

    def setup(self, recorder: HistoryRecorder) -> None:
        """Deploy the contract and call ``init`` as the signer, both recorded in the history;
        ``WorkloadError`` (or the client's error) if either is refused. Either may be answered
        ``pending`` (committed, not executed in time by the node asked: it may have stopped
        executing): the other nodes execute it all the same."""
        node = self.names[0]
        client = self._client(node, DEPLOY_WAIT + REQUEST_SLACK)
        args = {"contract": self.contract, "code_sha256": hashlib.sha256(self.code).hexdigest()}
        with recorder.invoke("setup", "contract.deploy", args, node) as handle:
            body = {"name": self.contract, "code": base64.b64encode(self.code).decode()}
            answer = client.post("/v1/contracts", body)
            handle.ok({"seq": answer.get("seq"), "status": answer.get("status")})
        if answer.get("status") not in ("deployed", "pending"):
            raise WorkloadError(f"the token contract was not deployed: {answer.get('status')}")
        self._input_key = bytes.fromhex(client.get("/v1/contract-input-key")["input_key"])
        init = self.call("init")
        with recorder.invoke("setup", "contract.call", init.to_args(), node) as handle:
            told = self.perform(client, init)
            handle.ok(told.to_value())
        if told.status != "pending" and (told.report or {}).get("status") != "ok":
            raise WorkloadError(f"init of the token contract did not succeed: {told.status}")

    # --- the clients' calls -------------------------------------------------------------------

    def call(
        self, function: str, amount: int | None = None, account: str | None = None
    ) -> ContractCall:
        """A call of ``function`` as the signer, under a fresh nonce."""
        return ContractCall(
            self.contract, function, self.signer.name, secrets.token_hex(16), CALL_FUEL,
            amount, account,
        )  # fmt: skip

    def next_call(self, rng: random.Random) -> ContractCall:
        """A seeded choice of mint, transfer or balance (the nonce is random, never reused)."""
        function = rng.choices(["mint", "transfer", "balance"], weights=[2, 3, 2])[0]
        account = rng.choice(self.accounts)
        if function == "mint":
            to = self.signer.name if rng.random() < 0.5 else account
            return self.call("mint", rng.randrange(2**46, 2**47), to)
        if function == "transfer":
            # One in eight asks for more than any balance can be (a mint credits less than
            # 2**47, and no run mints 2**14 times): it must revert (code 2) everywhere.
            overdraft = rng.random() >= 0.875
            amount = rng.randrange(2**61, 2**62) if overdraft else rng.randrange(2**40, 2**45)
            return self.call("transfer", amount, account)
        return self.call("balance", None, rng.choice([*self.accounts, self.signer.name]))

    def perform(self, client: NodeClient, call: ContractCall) -> CallAnswer:
        """Send ``call`` through ``client`` and open its result. The client's errors escape
        (the runner classifies them); an answer that is not one raises ``KmsimError``."""
        reply_key = secrets.token_bytes(SecretBox.KEY_SIZE)
        body = {
            "function": call.function,
            "args": seal_args(self._input_key, call, reply_key),
            "nonce": call.nonce,
            "fuel": call.fuel,
            "timeout": EXECUTION_WAIT,
        }
        path = f"/v1/contracts/{urllib.parse.quote(call.contract, safe='')}/calls"
        answer = client.request("POST", path, body)
        try:
            told = CallAnswer.from_value({**answer, "report": None})
        except (CallFormatError, TypeError) as exc:
            raise KmsimError(f"a malformed answer to a call: {exc}", EXIT_FAILURE) from None
        if told.status == "pending":
            return told
        try:
            report = open_report(self.signer.box_secret, str(answer.get("sealed")), reply_key)
        except CallFormatError as exc:
            return dataclasses.replace(told, unopened=str(exc))
        return dataclasses.replace(told, report=report)

    # --- after the run ------------------------------------------------------------------------

    def collect(
        self, messages: Callable[[], Sequence[tuple[str, bytes]]], timeout: float
    ) -> ContractEvidence:
        """Wait (at most ``timeout`` seconds) until every node executed every committed
        operation or halted, then (at most ``RECORDS_WAIT``) until its newest records were
        captured; then the evidence."""
        deadline = time.monotonic() + timeout
        views = self._views()
        for _ in range(int(timeout / _POLL) + 1):
            if all(v.settled for v in views.values()) or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
            views = self._views()
        prefix, cluster = self.cfg.mqtt.topic_prefix, self.cfg.cluster
        records, malformed = parse_results(list(messages()), prefix, cluster)
        deadline = time.monotonic() + RECORDS_WAIT
        for _ in range(int(RECORDS_WAIT / _POLL) + 1):
            if _published(views, records) or time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
            records, malformed = parse_results(list(messages()), prefix, cluster)
        return ContractEvidence(self.contract, self._committed_calls(), views, records, malformed)

    def _views(self) -> dict[str, NodeContracts]:
        views = {}
        for name in self.names:
            try:
                views[name] = NodeContracts.from_api(self._client(name).get("/v1/node/contracts"))
            except KmsimError as exc:
                views[name] = NodeContracts.unreadable(exc.message)
        return views

    def _committed_calls(self) -> int | None:
        path = f"/v1/contracts/{urllib.parse.quote(self.contract, safe='')}"
        for name in self.names:
            try:
                calls = self._client(name).get(path).get("calls")
            except (KmsimError, AttributeError):
                continue
            if type(calls) is int:
                return calls
        return None


def _published(views: dict[str, NodeContracts], records: Sequence[ResultRecord]) -> bool:
    """Every executing node's records reached its position (what it executed last)."""
    newest: dict[str, int] = {}
    for r in records:
        newest[r.node] = max(newest.get(r.node, 0), r.seq)
    return all(
        newest.get(name, 0) >= v.position
        for name, v in views.items()
        if not v.error and not v.halted and v.position > 0
    )


__all__ = ["ACCOUNTS", "EXECUTION_WAIT", "TokenWorkload", "WorkloadError"]
