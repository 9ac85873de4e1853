"""Releases on one node: early local attestation, provisioning after commit, the outcome, and
waiting for outcomes on behalf of API callers.

The KM enclave decides (``KMEnclave.provision`` looks the committed release up in its own
state); this module moves the challenge, the report and the boxed key between the enclave and
the service enclave's process, and gets the outcome committed as an audit record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from consensus.deadlines import Deadlines
from consensus.types import Entry
from kmnode.histogram import Histogram
from kmnode.km.commands import Applied, ReleaseCompleted, ReleaseOutcome, ReleaseRequested
from kmnode.km.enclave import ProvisionResult
from kmnode.km.forwarding import commit_anywhere
from kmnode.km.service_link import ServiceRefused
from kmnode.km.state import Release
from kmnode.service_pipe import ServiceUnavailable

if TYPE_CHECKING:
    from kmnode.km.node import KMNode

log = logging.getLogger(__name__)
#: Marks a release request in a command's canonical JSON (``commands.CommandModel.encode``).
_RELEASE_REQUEST = b'"op":"release.request"'
#: Early local attestations kept for releases that have not committed (see ``on_append``).
MAX_EARLY_ATTESTATIONS = 1024


#: Releases whose request time is kept for the latency histogram (oldest dropped beyond).
MAX_TIMED_RELEASES = 65536


@dataclasses.dataclass
class EarlyAttestations:
    """Service attestations started when a release to this node entered the log (before it
    committed), and how many of them a committed release went on to use."""

    started: int = 0
    used: int = 0


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a background future's failure as seen: an early attestation nobody ends up
    using must not be reported as an exception that was never retrieved."""
    if not future.cancelled():
        future.exception()


class _ReleaseWaitTimedOut(Exception):
    """A release wait ran out of time (``wait`` returns False)."""


class Releases:
    def __init__(self, node: KMNode) -> None:
        self.node = node
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        #: Local attestations started for releases to this node not yet committed.
        self._early: dict[str, asyncio.Task[tuple[bytes, bytes]]] = {}
        #: Local attestations started before their release committed, and those used.
        self.early_attestations = EarlyAttestations()
        #: From a release's request applied here to its outcome applied here (``/metrics``).
        self.latency = Histogram()
        self._requested_at: dict[str, float] = {}
        self._name_json = json.dumps({"node": node.name}, separators=(",", ":"))[1:-1].encode()
        #: Timeouts of release waits (one timer for all: see ``consensus.deadlines``).
        self._deadlines = Deadlines()

    def close(self) -> None:
        self._deadlines.close()

    # --- applied outcomes and waiting ---------------------------------------------------------

    def on_apply(self, result: Applied) -> None:
        """A committed command was applied: provision a release to this node, wake waiters."""
        if isinstance(result, ReleaseRequested):
            self._requested_at[result.release] = time.perf_counter()
            if len(self._requested_at) > MAX_TIMED_RELEASES:  # outcomes that never came
                del self._requested_at[next(iter(self._requested_at))]
            if result.node == self.node.name:
                self.node.spawn(self.provision(result.release))
        elif isinstance(result, ReleaseCompleted):
            started = self._requested_at.pop(result.release, None)
            if started is not None:
                self.latency.observe(time.perf_counter() - started)
            for future in self._waiters.pop(result.release, []):
                if not future.done():
                    future.set_result(None)

    def done(self, release_id: str) -> bool:
        release = self.node.enclave.state.releases.get(release_id)
        return release is not None and release.status != "requested"

    async def wait(self, release_id: str, timeout: float) -> bool:
        """Wait until the outcome of ``release_id`` is applied here; False on timeout.

        Waiters are keyed by release, so an apply wakes only the callers it concerns (checking
        every waiter on every apply cost a sixth of the leader's CPU under load).
        """
        if self.done(release_id):
            return True
        if timeout <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(release_id, []).append(future)
        self._deadlines.watch(future, timeout, _ReleaseWaitTimedOut)
        try:
            await future
        except _ReleaseWaitTimedOut:
            waiters = self._waiters.get(release_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(release_id, None)
            return False
        return True

    async def commit_outcome(self, command: bytes, release_id: str, timeout: float = 10.0) -> bool:
        """Get a release outcome committed from any node (``forwarding.commit_anywhere``),
        until the release's outcome is applied here."""
        return await commit_anywhere(
            self.node.raft(),
            self.node.forwarder,
            command,
            lambda: self.done(release_id),
            lambda t: self.wait(release_id, t),
            timeout,
        )

    # --- provisioning -------------------------------------------------------------------------

    def on_append(self, entries: tuple[Entry, ...]) -> None:
        """Start attesting our service enclave as soon as a release to this node is in the log.

        The challenge and its answer then travel while the request is still being committed
        (a pipe round trip off every release's latency). Nothing is decided on it: the report
        is checked, against the policy of that moment, and the key provisioned, only once the
        release is committed (``provision``). An entry that is replaced before it commits
        leaves an unused challenge behind, which expires.
        """
        for entry in entries:
            data = entry.data
            if _RELEASE_REQUEST not in data or self._name_json not in data:
                continue
            try:
                command = json.loads(data)
            except ValueError:
                continue
            if not isinstance(command, dict) or command.get("node") != self.node.name:
                continue
            release_id = f"r{entry.index}"
            early = self._early
            if release_id in early:  # the same entry sent again (or replaced): one will do
                continue
            attestation = self.node.spawn(self._attest_service())
            self.early_attestations.started += 1
            attestation.add_done_callback(_consume_outcome)
            early[release_id] = attestation
            if len(early) > MAX_EARLY_ATTESTATIONS:
                early.pop(next(iter(early))).cancel()

    async def _attest_service(self) -> tuple[bytes, bytes]:
        """One local-attestation exchange with our service enclave: (challenge, response)."""
        enclave = self.node.enclave
        challenge = enclave.new_challenge()
        response = await self.node.service.challenge(enclave.identity.measurement, challenge)
        return challenge, response

    async def _provision_to_service(self, release: Release) -> ProvisionResult:
        """Check the attestation and hand the key over. An answer obtained while the release
        was being committed is used first; if the enclave that gave it is gone by now, the
        attestation is done once more with a fresh challenge. The key itself is provisioned
        once per release (the KM enclave refuses a second time): if the service enclave dies
        between the attestation and the delivery, the release is refused as undelivered."""
        early = self._early.pop(release.id, None)
        for attempt in (early, None) if early is not None else (None,):
            try:
                source = attempt if attempt is not None else self._attest_service()
                challenge, response = await source
            except ServiceUnavailable:
                if attempt is None:
                    raise
                continue
            if attempt is not None:
                self.early_attestations.used += 1
            outcome = self.node.enclave.provision(release.id, challenge, response)
            if outcome.ok:
                try:
                    await self.node.service.provide_key(outcome.ciphertext, outcome.vouch)
                except ServiceRefused as exc:
                    # The service enclave refused what its KM enclave sent: never expected,
                    # so an event says so besides the refused release.
                    reason = f"the service enclave refused the key: {exc}"
                    self.node.publish_event("service.refused", release=release.id, reason=reason)
                    return dataclasses.replace(
                        outcome, ok=False, reason=reason, ciphertext=b"", vouch=b""
                    )
                except ServiceUnavailable as exc:
                    raise ServiceUnavailable(f"the key could not be delivered: {exc}") from None
            return outcome
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def provision(self, release_id: str) -> None:
        """Local attestation of our service enclave, key provisioning, then the audit record."""
        node = self.node
        if node.recovery.recovering:
            # Replaying a release committed before the loss: it is provisioned once the
            # node holds the secret again, not refused for lack of it.
            await node.recovery.opened.wait()
        release = node.enclave.state.releases.get(release_id)
        if release is None or release.status != "requested":
            return
        status: Literal["provisioned", "refused"]
        try:
            outcome = await self._provision_to_service(release)
            status, reason = ("provisioned", "") if outcome.ok else ("refused", outcome.reason)
            measurement = outcome.service_measurement
        except ServiceUnavailable as exc:
            status, reason, measurement = "refused", f"service enclave unavailable: {exc}", ""
        command = ReleaseOutcome(
            release=release_id,
            node=node.name,
            status=status,
            reason=reason,
            service_measurement=measurement,
        ).encode()
        committed = await self.commit_outcome(command, release_id)
        record = {
            "release": release_id,
            "key": release.key,
            "generation": release.generation,
            "status": status,
            "reason": reason,
            "committed": committed,
        }
        # One audit record per release: coalesced with its neighbours into one MQTT message
        # under load (a message per record cost the broker as much CPU as a follower's Raft).
        node.publish_audit(record)
        if status == "refused":
            log.warning("%s: release %s refused: %s", node.name, release_id, reason)
