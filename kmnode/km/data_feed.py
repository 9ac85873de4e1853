"""This node as a privacy computing platform (issue 15, S5): its service enclave's measurement
on the ledger, committed tokens for it turned into computations, revocations passed on.

One task, in the order things were applied (so a revocation applied before a token's job is
handed over is always seen first):

1. a service instance it has not seen gets attested locally; its measurement is committed
   (``service.measured``) if the ledger holds another one for this node, and it is told every
   grant revoked so far;
2. each grant revoked later is passed to the service enclave at once; the time from applying
   the revocation here to the enclave's answer is the observation lag (``status``);
3. each token issued for this node is provisioned (``KMEnclave.provision_data_job`` decides,
   from the committed state) and run; its end (``data.consume``: consumed with the result's
   hash, or refused with the reason) is committed from here, and the sealed result kept for the
   user (``result``) and for the API request waiting on it.

Nothing here decides what may be computed: the KM enclave decides what it boxes, the service
enclave what it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmnode.km.command_base import Applied
from kmnode.km.data_commands import (
    MAX_ENDS,
    DataConsume,
    GrantChanged,
    PlatformMeasured,
    RequestChanged,
    ServiceMeasured,
    TokenEnd,
    TokenIssued,
    TokensFinished,
)
from kmnode.km.forwarding import commit_anywhere
from kmnode.service_pipe import (
    DataJobReply,
    DataJobRequest,
    DataReleaseReply,
    DataReleaseRequest,
    DataRevokeReply,
    DataRevokeRequest,
    ServiceUnavailable,
)

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

log = logging.getLogger(__name__)
#: Sealed results kept for their users (the oldest are dropped; MQTT carried them too).
RESULTS_KEPT = 4096
#: Grants per revocation message to the service enclave.
REVOKE_BATCH = 4096
#: Pause after the service could not be reached.
RETRY_S = 0.5
#: How long a token's end waits for others to share its Raft entry: ends come one per job,
#: and an entry each would put a second commit beside every token's own. A result leaves
#: only once its end is committed, so this is also how much later a result may reach its user
#: (at 50 ms, a compute on 1 MiB reached its user in 84 ms at p50; at 10 ms, in 41 ms).
ENDS_LINGER_S = 0.01
#: How long a committed token waits before its batch starts: its API answer (and those of the
#: tokens committed next) goes out first, and the batch gathers the tokens of a few turns.
JOBS_LINGER_S = 0.005
#: Jobs handed to the service enclave at once (it runs them in order; their attestations and
#: replies overlap on the pipe, and their ends are committed while the next ones run).
JOBS_IN_FLIGHT = 32


@dataclass
class JobOutcome:
    token: str
    status: str
    reason: str = ""
    sealed: str = ""
    result_hash: str = ""


@dataclass
class LagStats:
    """Revocation observation lag: applied here until the service enclave acknowledged it."""

    count: int = 0
    last_ms: float = 0.0
    max_ms: float = 0.0
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def add(self, ms: float) -> None:
        self.count += 1
        self.last_ms = ms
        self.max_ms = max(self.max_ms, ms)
        self.samples.append(ms)

    def view(self) -> dict[str, Any]:
        ordered = sorted(self.samples)
        p50 = ordered[len(ordered) // 2] if ordered else 0.0
        return {
            "count": self.count,
            "last_ms": round(self.last_ms, 3),
            "p50_ms": round(p50, 3),
            "max_ms": round(self.max_ms, 3),
        }


class DataFeed:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        self._wake = asyncio.Event()
        self._instance: int | None = None
        #: Work in apply order: ("revoke", grant, applied at) or ("token", id, 0.0).
        self._queue: deque[tuple[str, str, float]] = deque()
        self._results: OrderedDict[str, JobOutcome] = OrderedDict()
        self._finished: dict[str, list[asyncio.Future[None]]] = {}
        self._measured = asyncio.Event()
        self.lag = LagStats()
        self._wake_timer: asyncio.TimerHandle | None = None
        #: Token ends waiting to be committed (``_commit_end``).
        self._ends: list[TokenEnd] = []
        self._ends_timer: asyncio.TimerHandle | None = None
        self.jobs = {"consumed": 0, "refused": 0}

    # --- applied commands -------------------------------------------------------------------

    def on_apply(self, result: Applied) -> None:
        if self._instance != self.node.service.restarts:
            self._wake.set()  # a service instance not attested yet (or the secret just came)
        if isinstance(result, TokenIssued) and result.node == self.node.name:
            self._queue.append(("token", result.token, 0.0))
            if self._wake_timer is None:
                self._wake_timer = asyncio.get_running_loop().call_later(
                    JOBS_LINGER_S, self._wake_for_jobs
                )
        elif isinstance(result, GrantChanged) and result.state == "revoked":
            self._queue.append(("revoke", result.grant, time.monotonic()))
            self._wake.set()
        elif isinstance(result, TokensFinished):
            for token in result.finished:
                for future in self._finished.pop(token, []):
                    if not future.done():
                        future.set_result(None)
        elif isinstance(result, PlatformMeasured) and result.node == self.node.name:
            self._measured.set()
        elif isinstance(result, RequestChanged) and result.state == "open":
            driver = self.node.driver
            if driver is not None and driver.is_leader:  # one node publishes it, not all
                self.node.publish_event(
                    "data.request",
                    request=result.request,
                    dataset=result.dataset,
                    user=result.user,
                    owner=result.owner,
                )

    def _wake_for_jobs(self) -> None:
        self._wake_timer = None
        self._wake.set()

    async def wait_finished(self, token: str, timeout: float) -> bool:
        """Wait until token ``token`` has ended in the state applied here; False on timeout."""
        if self._token_done(token):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._finished.setdefault(token, []).append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return self._token_done(token)
        finally:
            waiters = self._finished.get(token, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._finished.pop(token, None)
        return True

    def _token_done(self, token: str) -> bool:
        record = self.node.enclave.state.data.tokens.get(token)
        return record is not None and record.state != "issued"

    def result(self, token: str) -> JobOutcome | None:
        return self._results.get(token)

    def status(self) -> dict[str, Any]:
        data = self.node.enclave.state.data
        mine = [t for t in data.tokens.values() if t.node == self.node.name]
        return {
            "node": self.node.name,
            "measurement": data.platforms.get(self.node.name, ""),
            "queued": len(self._queue),
            "jobs": dict(self.jobs),
            "tokens_issued_here": len(mine),
            "tokens_pending": sum(1 for t in mine if t.state == "issued"),
            "revocation_lag": self.lag.view(),
            "results_kept": len(self._results),
        }

    # --- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """The feed's task (``KMNode.spawn``)."""
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except ServiceUnavailable as exc:
                log.warning("%s: data: service enclave unavailable: %s", self.node.name, exc)
                await asyncio.sleep(RETRY_S)
                self._wake.set()
            except Exception:  # never let the feed die: it is the only one
                log.exception("%s: data: serving a job failed", self.node.name)
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    async def _sync(self) -> None:
        node = self.node
        if not node.enclave.has_master_secret or not node.enclave.state.cluster:
            return
        service = node.service
        if self._instance != service.restarts or not service.running:
            await self._attest_new_instance()
        while self._queue:
            kind, name, applied_at = self._queue[0]
            if kind == "revoke":  # a barrier: jobs queued after it start only once it is sent
                await self._send_revocations([name])
                self.lag.add((time.monotonic() - applied_at) * 1000)
                self._queue.popleft()
                continue
            batch: list[str] = []
            while self._queue and self._queue[0][0] == "token" and len(batch) < JOBS_IN_FLIGHT:
                batch.append(self._queue.popleft()[1])
            try:
                left = await self._run_batch(batch)
            except Exception:
                # Tried again (a job boxed already is refused then: the token ends refused).
                self._queue.extendleft(("token", t, 0.0) for t in reversed(batch))
                raise
            self._queue.extendleft(("token", t, 0.0) for t in reversed(left))

    async def _attest_new_instance(self) -> None:
        """Attest a service instance this feed has not seen, put its measurement on the ledger
        if that changed, and tell it every revocation so far."""
        node = self.node
        enclave = node.enclave
        challenge = enclave.new_challenge()
        response = await node.service.challenge(enclave.identity.measurement, challenge)
        measurement = enclave.attested_measurement(challenge, response)
        first = self._instance is None
        self._instance = node.service.restarts
        if first:
            self._end_orphans()
        if not measurement:
            log.warning("%s: data: the service enclave did not attest", node.name)
            return
        revoked = [g.id for g in enclave.state.data.grants.values() if g.revoked_index]
        for start in range(0, len(revoked), REVOKE_BATCH):
            await self._send_revocations(revoked[start : start + REVOKE_BATCH])
        if enclave.state.data.platforms.get(node.name) != measurement:
            command = ServiceMeasured(node=node.name, measurement=measurement).encode()
            self._measured.clear()
            await commit_anywhere(
                node.raft(),
                node.forwarder,
                command,
                lambda: enclave.state.data.platforms.get(node.name) == measurement,
                self._wait_measured,
            )

    def _end_orphans(self) -> None:
        """Tokens for this node issued before this process first reached its service enclave
        (the node restarted): whether their job ran before the restart is unknown here, so
        they end refused rather than risk a second computation of one token."""
        node = self.node
        boundary = node.enclave.state.applied_index
        orphans = {
            t.id
            for t in node.enclave.state.data.tokens.values()
            if t.node == node.name and t.state == "issued" and t.issued_index <= boundary
        }
        if not orphans:
            return
        self._queue = deque(item for item in self._queue if item[1] not in orphans)
        reason = "the platform node restarted before the job ended; it is not run again"
        for token_id in sorted(orphans):
            outcome = JobOutcome(token_id, "refused", reason)
            self._results[token_id] = outcome
            self._commit_end(outcome)

    def _commit_end(self, outcome: JobOutcome) -> None:
        """Queue how a token ended; the ends queued within ``ENDS_LINGER_S`` are committed as
        one ``data.consume`` (a Raft entry per batch of jobs, not per job)."""
        end = TokenEnd(
            token=outcome.token,
            status=outcome.status,  # type: ignore[arg-type]  # consumed or refused
            result_hash=outcome.result_hash,
            reason=outcome.reason[:500],
        )
        if not self._ends:
            self._ends_timer = asyncio.get_running_loop().call_later(
                ENDS_LINGER_S, self._flush_ends
            )
        self._ends.append(end)

    def _flush_ends(self) -> None:
        """Commit the queued ends, in batches, each in a task of its own that retries until
        every token of its batch has ended in the state applied here."""
        node = self.node
        if self._ends_timer is not None:
            self._ends_timer.cancel()
            self._ends_timer = None
        ends, self._ends = self._ends, []
        for start in range(0, len(ends), MAX_ENDS):
            batch = ends[start : start + MAX_ENDS]
            command = DataConsume(node=node.name, ends=batch).encode()
            node.spawn(self._commit_batch(command, [end.token for end in batch]))

    async def _commit_batch(self, command: bytes, tokens: list[str]) -> None:
        """Commit a batch of ends, then let the service enclave release the results of those
        the ledger now holds as consumed (never before: a platform that crashed before the
        commit ends them refused after its restart, and no result of theirs has left)."""
        node = self.node
        await commit_anywhere(
            node.raft(),
            node.forwarder,
            command,
            lambda: all(self._token_done(t) for t in tokens),
            lambda timeout: self.wait_finished(tokens[-1], timeout),
        )
        records = node.enclave.state.data.tokens
        consumed = [t for t in tokens if t in records and records[t].state == "consumed"]
        if not consumed:
            return
        try:
            await node.service.request(DataReleaseRequest(tokens=consumed), DataReleaseReply)
        except ServiceUnavailable as exc:  # the results stay at this node's API
            log.warning("%s: data: results not released: %s", node.name, exc)

    async def _wait_measured(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._measured.wait(), timeout)

    async def _send_revocations(self, grants: list[str]) -> None:
        reply = await self.node.service.request(DataRevokeRequest(grants=grants), DataRevokeReply)
        if not reply.ok:
            raise ServiceUnavailable(f"the service enclave refused revocations: {reply.error}")

    async def _run_batch(self, batch: list[str]) -> list[str]:
        """Hand a batch of this node's tokens to the service enclave under one local
        attestation and one box; record and commit how each ended. The tokens the box had no
        room for are returned, untouched."""
        node = self.node
        enclave = node.enclave
        issued = [t for t in batch if self._token_issued(t)]
        if not issued:
            return []
        outcomes: dict[str, JobOutcome] = {}
        try:
            challenge = enclave.new_challenge()
            response = await node.service.challenge(enclave.identity.measurement, challenge)
        except ServiceUnavailable as exc:
            reason = f"service enclave unavailable: {exc}"
            self._finish([JobOutcome(t, "refused", reason) for t in issued])
            return []
        provisioned = enclave.provision_data_jobs(issued, challenge, response)
        for token_id, reason in provisioned.refused.items():
            outcomes[token_id] = JobOutcome(token_id, "refused", reason)
        handed = [t for t in issued if t not in outcomes and t not in provisioned.left]
        if handed:
            box = provisioned.result
            request = DataJobRequest(ciphertext=box.ciphertext.hex(), vouch=box.vouch.hex())
            try:
                reply = await node.service.request(request, DataJobReply)
                why = reply.error
            except ServiceUnavailable as exc:
                # The material went to an enclave that is gone: the tokens are spent.
                reply, why = DataJobReply(), f"service enclave unavailable: {exc}"
            ends = {end.token: end for end in reply.ends} if reply.ok else {}
            for token_id in handed:
                end = ends.get(token_id)
                outcomes[token_id] = (
                    JobOutcome(token_id, end.status, end.reason, end.sealed, end.result_hash)
                    if end is not None
                    else JobOutcome(
                        token_id, "refused", f"the service enclave gave no end: {why or 'none'}"
                    )
                )
        self._finish([outcomes[t] for t in issued if t in outcomes])
        return list(provisioned.left)

    def _token_issued(self, token_id: str) -> bool:
        token = self.node.enclave.state.data.tokens.get(token_id)
        return token is not None and token.state == "issued"

    def _finish(self, outcomes: list[JobOutcome]) -> None:
        """Keep each outcome for its user and commit how each token ended."""
        for outcome in outcomes:
            self.jobs[outcome.status] = self.jobs.get(outcome.status, 0) + 1
            self._results[outcome.token] = outcome
            if len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)
            self._commit_end(outcome)
            if outcome.status == "refused":
                log.warning(
                    "%s: data: token %s refused: %s", self.node.name, outcome.token, outcome.reason
                )
