"""The nemesis's ``recover`` fault: every node loses its sealed state at once, and the cluster
comes back only through disaster recovery (DESIGN.md, "Recovery and backup").

Inject: every node is SIGKILLed, marked for recovery (``supervisor.mark_for_recovery``) and
its sealed state deleted; its Raft log stays. Heal: every node is started again (in recovery
mode: it replays the ledger without the master secret), the run's signer submits its share
(``recovery_client.submit_share``, the path `kmctl recovery submit` takes), and every node
must be ready with the master secret again within the restart timeout. The outage lies inside
the recorded fault window, as a kill's lies between its kill and its restart, so the checker
judges it like a restart window; the reopening is recorded with the fault's stop.

The run holds one key, its signer's: the fault can only be healed if that key alone opens the
cluster (its holder's share of a 1-of-n split, as the development profile's ``dev-admin``
holds). Whether it does is checked *before* anything is killed or wiped, by opening the share
against its commitment; otherwise the fault is skipped with the reason, because a wiped cluster
the run cannot reopen would lose every key for good. A split still being made (at genesis, or
the fresh split due after a completed recovery) is waited for: the shares of a split that has
already rebuilt the secret are not taken again.

Nothing here logs or records a share: only holder names, counts and the split's generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kmnode import supervisor
from kmnode.chaos import faults
from kmnode.chaos.faults import FaultError
from kmnode.client import ApiError, ClusterClient, NodeClient
from kmnode.config import ClusterConfig
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys
from kmnode.recovery.shares import RecoveryError
from kmnode.recovery_client import Submitted, holder_share, split_of, submit_share

_POLL = 0.2
_REQUEST_TIMEOUT = 5.0
#: Submission refusals that mean the share is already in (an earlier attempt got through).
_ALREADY_IN = ("already submitted", "has already rebuilt the secret")

Status = Mapping[str, Any]


class RecoveryUnavailable(Exception):
    """The run cannot reopen the cluster on its own; nothing was killed or wiped."""


@dataclass(frozen=True)
class HeldShare:
    """The run's signer holds a share of the ledger's current split, and enough of them."""

    holder: str
    generation: int
    threshold: int
    holders: int

    def detail(self) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "generation": self.generation,
            "threshold": self.threshold,
            "holders": self.holders,
        }


def held_share(cfg: ClusterConfig, signer: IdentityKeys | None, timeout: float) -> HeldShare:
    """Check that ``signer`` alone can reopen the cluster: the ledger's split is current, its
    share opens and matches its commitment, and one share meets the threshold. Waits (up to
    ``timeout``) while a split is due; RecoveryUnavailable says why not otherwise."""
    if signer is None:
        raise RecoveryUnavailable("no signing identity (KMSIM_IDENTITY) to submit a share as")
    client = ClusterClient(cfg, timeout=_REQUEST_TIMEOUT, signer=signer)
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL) + 2):
        try:
            answer = client.get("/v1/recovery")
        except KmsimError as exc:
            raise RecoveryUnavailable(f"the recovery split could not be read: {exc}") from None
        current = isinstance(answer, dict) and not (
            answer.get("split_due") or answer.get("complete_index")
        )
        if current:
            return _one_share_opens(answer, signer)
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    raise RecoveryUnavailable(f"no current recovery split within {timeout:g}s (one is due)")


def _one_share_opens(answer: Any, signer: IdentityKeys) -> HeldShare:
    try:
        split = split_of(answer)
    except KmsimError as exc:
        raise RecoveryUnavailable(exc.message) from None
    try:
        holder_share(split, signer)  # opened and checked here; never kept
    except RecoveryError as exc:
        raise RecoveryUnavailable(
            f"{signer.name!r} holds no share of split {split.generation} it can open: {exc}"
        ) from None
    if split.threshold > 1:
        raise RecoveryUnavailable(
            f"needs {split.threshold} shares of split {split.generation}; the run's signer "
            f"{signer.name!r} holds 1"
        )
    return HeldShare(signer.name, split.generation, split.threshold, len(split.shares))


def lose_every_sealed_state(cfg: ClusterConfig) -> dict[str, Any]:
    """SIGKILL every node, mark each for recovery, then delete each one's sealed state
    (marked first: a node without a Raft log to recover from is refused before anything is
    lost)."""
    names = [n.name for n in cfg.nodes]
    killed = {name: faults.kill(cfg, name).detail["pid"] for name in names}
    for name in names:
        try:
            supervisor.mark_for_recovery(cfg, name)
        except KmsimError as exc:
            raise FaultError(exc.message) from None
    lost = {name: faults.lose_sealed_state(cfg, name).detail["bytes"] for name in names}
    return {"killed": killed, "sealed_bytes_lost": lost}


def reopen(
    cfg: ClusterConfig,
    signer: IdentityKeys,
    timeout: float,
    log: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Start every node again (each in recovery mode), submit the signer's share once every
    node waits for it under one leader, and wait until every node is ready with the master
    secret; all within ``timeout``. FaultError if the cluster does not reopen."""
    started = time.monotonic()
    deadline = started + timeout
    names = [n.name for n in cfg.nodes]
    for name in names:
        # A recovering node counts as ready (``supervisor.describe_readiness``): this returns
        # once it runs in recovery mode, without waiting for a quorum.
        faults.restart(cfg, name, timeout=max(deadline - time.monotonic(), 1.0))
    wait_all(cfg, _recovering, deadline, "every node in recovery mode under one leader")
    submitted = _submit(cfg, signer, deadline)
    # None: an earlier attempt got the share in, but its answer was lost.
    answer = submitted.answer if submitted is not None else {}
    boxed_to = submitted.boxed_to if submitted is not None else None
    left_out = submitted.left_out if submitted is not None else []
    log(
        f"nemesis: recover: {signer.name} submitted its share ({answer.get('have', '?')} of "
        f"{answer.get('need', '?')}), boxed to {', '.join(boxed_to or ['?'])}"
    )
    try:
        wait_all(cfg, _open, deadline, "every node ready with the master secret again")
    except FaultError as exc:
        raise FaultError(f"{exc}; left out of the submission: {left_out or 'none'}") from None
    return {
        "submitted_by": signer.name,
        "have": answer.get("have"),
        "need": answer.get("need"),
        "boxed_to": boxed_to,
        "left_out": left_out,
        "reopened_s": round(time.monotonic() - started, 3),
    }


def _submit(cfg: ClusterConfig, signer: IdentityKeys, deadline: float) -> Submitted | None:
    """Submit the share, retried while no leader takes it; None if an earlier attempt (whose
    answer was lost) got it in."""
    last = "not tried"
    while True:
        try:
            return submit_share(ClusterClient(cfg, timeout=_REQUEST_TIMEOUT, signer=signer))
        except ApiError as exc:
            if exc.status == 409 and any(s in exc.message for s in _ALREADY_IN):
                return None
            if exc.status in (400, 401, 403, 409):
                raise FaultError(f"the share was refused: {exc.message}") from None
            last = exc.message
        except KmsimError as exc:  # unreachable, no leader yet, no verifiable key yet
            last = exc.message
        if time.monotonic() >= deadline:
            raise FaultError(f"the share could not be submitted in time: {last}")
        time.sleep(_POLL)


def _recovering(status: Status) -> bool:
    return status.get("recovering") is True and bool(status.get("leader"))


def _open(status: Status) -> bool:
    return status.get("ready") is True and status.get("has_master_secret") is True


def wait_all(
    cfg: ClusterConfig, wanted: Callable[[Status], bool], deadline: float, what: str
) -> None:
    """Poll every node's /v1/status until ``wanted`` holds for all of them (with ``_recovering``
    also: all name one leader); FaultError naming each node's last status at ``deadline``."""
    seen: dict[str, str] = {}
    remaining = max(deadline - time.monotonic(), 0.0)
    for _ in range(int(remaining / _POLL) + 2):
        statuses: dict[str, Status] = {}
        for spec in cfg.nodes:
            try:
                status = NodeClient.for_node(spec, 2.0).get("/v1/status")
            except KmsimError as exc:
                seen[spec.name] = exc.message
                continue
            if isinstance(status, dict):
                statuses[spec.name] = status
                seen[spec.name] = _describe(status)
        leaders = {s.get("leader") for s in statuses.values()}
        agreed = len(statuses) == len(cfg.nodes) and len(leaders) == 1
        if agreed and all(wanted(s) for s in statuses.values()):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    shown = "; ".join(f"{n}: {s}" for n, s in sorted(seen.items())) or "no answer"
    raise FaultError(f"not {what} in time: {shown}")


def _describe(status: Status) -> str:
    return (
        f"mode {status.get('mode')}, recovering {status.get('recovering')}, ready "
        f"{status.get('ready')}, leader {status.get('leader')}"
    )
