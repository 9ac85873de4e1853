"""Process and disk faults on a local cluster started by `kmctl up`, callable from Python.

Process faults act on the pid the supervisor recorded, and only after :func:`is_ours`
confirms that pid is still that very process: a stale pid file must never make chaos tooling
signal an unrelated program. Disk faults edit a node's files and refuse while the node runs,
because a live process would overwrite the damage or see it half-made; they model what a crash
or a bad disk leaves behind for the next start.

Every fault returns a :class:`FaultDone`: what was done, to which file and offset, ready to be
recorded as a nemesis event (``recorder.fault_start(done.fault, done.node, **done.detail)``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from consensus.segments import HEADER_SIZE, read_records
from kmnode import supervisor
from kmnode.client import ApiError, NodeClient, NodeUnreachable, default_signer
from kmnode.config import ClusterConfig
from kmnode.datadir import JOIN_MARKER, RAFT_DIR, SEALED_STATE
from kmnode.errors import KmsimError
from kmnode.procfs import stat_fields

if TYPE_CHECKING:
    from kmnode.supervisor import ProcessRecord

#: How long a SIGKILLed process may take to disappear from /proc.
KILL_WAIT = 5.0
_POLL = 0.05

Where = Literal["middle", "tail"]


class FaultError(Exception):
    """The fault cannot be injected (node not running, running when it must be stopped,
    nothing to damage); the message says why."""


@dataclass(frozen=True)
class FaultDone:
    fault: str
    node: str
    summary: str  #: one line for people
    detail: dict[str, Any] = field(default_factory=dict)  #: JSON for the history

    def to_dict(self) -> dict[str, Any]:
        return {"fault": self.fault, "node": self.node, "summary": self.summary, **self.detail}


def data_dir(cfg: ClusterConfig, node: str) -> Path:
    cfg.node(node)  # KeyError naming the node if it is not in the cluster
    return cfg.state_dir / "nodes" / node


def raft_dir(cfg: ClusterConfig, node: str) -> Path:
    return data_dir(cfg, node) / RAFT_DIR


def _record(cfg: ClusterConfig, node: str) -> ProcessRecord | None:
    """The node's process if it is alive and really the one its pid file names."""
    cfg.node(node)
    record = supervisor.read_pid_file(supervisor.pid_path(cfg, node))
    return record if record is not None and supervisor.is_ours(record) else None


def live_pid(cfg: ClusterConfig, node: str) -> int | None:
    """The node's process id if it runs (and really is the process its pid file names)."""
    record = _record(cfg, node)
    return record.pid if record is not None else None


def _running(cfg: ClusterConfig, node: str) -> ProcessRecord:
    record = _record(cfg, node)
    if record is None:
        raise FaultError(f"{node} is not running (no live process behind its pid file)")
    return record


def _process_state(pid: int) -> str:
    fields = stat_fields(pid)
    return fields[0] if fields else ""


# --- process faults ----------------------------------------------------------------------------


def _signal_node(pid: int, sig: signal.Signals) -> None:
    """Signal the node's whole process group when it leads one (as `kmctl up` starts it): the
    host and its two enclave processes are one machine, and a pause or a kill must stop all
    three at once, not leave the KM enclave talking to its peers."""
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        if group == pid:
            os.killpg(group, sig)
        else:
            os.kill(pid, sig)


def kill(cfg: ClusterConfig, node: str) -> FaultDone:
    """SIGKILL the node's processes (host, KM enclave and service enclave) at once."""
    record = _running(cfg, node)
    _signal_node(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    # A zombie is not "ours" either: no need to reap a child of the caller here.
    while supervisor.is_ours(record) and time.monotonic() < deadline:
        time.sleep(_POLL)
    if supervisor.is_ours(record):
        raise FaultError(f"{node} (pid {record.pid}) survived SIGKILL for {KILL_WAIT:g}s")
    return FaultDone(
        "kill",
        node,
        f"killed {node} (pid {record.pid}) with SIGKILL",
        {"pid": record.pid, "signal": "SIGKILL"},
    )


def pause(cfg: ClusterConfig, node: str) -> FaultDone:
    """SIGSTOP the node's processes: they keep their sockets but answer nothing (a long GC pause,
    a frozen VM), so peers see timeouts rather than refused connections."""
    record = _running(cfg, node)
    _signal_node(record.pid, signal.SIGSTOP)
    # Signal delivery is asynchronous: return once the process really is stopped.
    deadline = time.monotonic() + KILL_WAIT
    while _process_state(record.pid) not in ("T", "t", "") and time.monotonic() < deadline:
        time.sleep(0.005)
    return FaultDone(
        "pause",
        node,
        f"paused {node} (pid {record.pid}) with SIGSTOP",
        {"pid": record.pid, "signal": "SIGSTOP"},
    )


def resume(cfg: ClusterConfig, node: str) -> FaultDone:
    """SIGCONT a paused node (harmless if it was not paused; ``was_stopped`` says which)."""
    record = _running(cfg, node)
    was_stopped = _process_state(record.pid) in ("T", "t")
    _signal_node(record.pid, signal.SIGCONT)
    return FaultDone(
        "resume",
        node,
        f"resumed {node} (pid {record.pid}) with SIGCONT",
        {"pid": record.pid, "signal": "SIGCONT", "was_stopped": was_stopped},
    )


def restart(
    cfg: ClusterConfig, node: str, *, wait: bool = True, timeout: float = 30.0
) -> FaultDone:
    """Start a stopped (killed) node again as `kmctl up` does: same command, log and pid file.

    With ``wait``, return once the node reports ready; a node whose quorum is down cannot
    become ready, so ``wait=False`` just starts it. Raises FaultError if it is running, exits
    early (with the end of its log) or is not ready within ``timeout``.
    """
    spec = cfg.node(node)
    if _record(cfg, node) is not None:
        raise FaultError(f"{node} is running; kill it first")
    config_file = supervisor.effective_config_path(cfg)
    with supervisor.exclusive(cfg):
        if not config_file.is_file():
            config_file = supervisor.write_effective_config(cfg)
        log = supervisor.log_path(cfg, node)
        supervisor.rotate_log(log)
        offset = log.stat().st_size if log.exists() else 0
        try:
            proc, record = supervisor.spawn(
                node,
                supervisor.node_command_for(cfg, config_file, node),
                log,
                supervisor.pid_path(cfg, node),
            )
        except KmsimError as exc:
            raise FaultError(exc.message) from None
    detail: dict[str, Any] = {"pid": record.pid, "ready": False}
    if wait:
        _wait_ready(cfg, node, proc.poll, NodeClient.for_node(spec, 2.0), timeout, offset)
        detail["ready"] = True
    state = "ready" if wait else "started"
    return FaultDone("restart", node, f"restarted {node} (pid {record.pid}): {state}", detail)


def _wait_ready(
    cfg: ClusterConfig,
    node: str,
    exited: Any,
    client: NodeClient,
    timeout: float,
    log_offset: int,
) -> None:
    deadline = time.monotonic() + timeout
    phase = "not answering"
    for _ in range(int(timeout / 0.1) + 2):
        code = exited()
        if code is not None:
            tail = supervisor.log_tail(supervisor.log_path(cfg, node), offset=log_offset)
            raise FaultError(f"{node} exited with code {code} after restart:\n{tail}")
        with contextlib.suppress(NodeUnreachable, KmsimError):
            ready, phase = supervisor.describe_readiness(client.get("/v1/status"))
            if ready:
                return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise FaultError(f"{node} was not ready {timeout:g}s after restart (last seen: {phase})")


# --- disk faults -------------------------------------------------------------------------------


def _stopped(cfg: ClusterConfig, node: str) -> None:
    record = _record(cfg, node)
    if record is not None:
        raise FaultError(f"{node} is running (pid {record.pid}); stop or kill it first")


def _segments(cfg: ClusterConfig, node: str) -> list[Path]:
    directory = raft_dir(cfg, node)
    segments = sorted(directory.glob("wal-*.log"))
    if not segments:
        raise FaultError(f"{node} has no Raft log segments in {directory}")
    return segments


def _flip(path: Path, offset: int) -> tuple[int, int]:
    """XOR the byte at ``offset`` with 0xFF in place; returns (old, new)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return old, old ^ 0xFF


def torn_tail(cfg: ClusterConfig, node: str) -> FaultDone:
    """Leave a half-written record after the last complete one, as a crash in the middle of an
    append does. The next start truncates the log back to ``record_offset``.

    Only a record that was never complete can be torn by a crash: the node fsyncs before it
    acknowledges anything, so every complete record may already have been counted by a quorum.
    Cutting one of those would model a disk that loses acknowledged writes, which Raft (like
    every consensus protocol) does not promise to survive; the fault therefore appends the
    first half of a copy of the last record instead of shortening it.
    """
    _stopped(cfg, node)
    path = _segments(cfg, node)[-1]
    data = path.read_bytes()
    records, damage = read_records(data)
    if damage is not None:
        raise FaultError(f"{path} is already damaged at offset {damage.offset} ({damage.reason})")
    if not records:
        raise FaultError(f"{path} holds no record to copy a torn one from")
    last_offset, payload = records[-1]
    whole = data[last_offset : last_offset + HEADER_SIZE + len(payload)]
    torn = whole[: len(whole) // 2]
    record_offset = len(data)
    with open(path, "ab") as f:
        f.write(torn)
        f.flush()
        os.fsync(f.fileno())
    return FaultDone(
        "torn-tail",
        node,
        f"appended {len(torn)} bytes of a half-written record to {path} at offset "
        f"{record_offset}",
        {"file": str(path), "offset": record_offset + len(torn), "record_offset": record_offset,
         "torn_bytes": len(torn)},
    )  # fmt: skip


def flip_byte(cfg: ClusterConfig, node: str, where: Where = "middle") -> FaultDone:
    """Flip one payload byte of a Raft log record.

    ``middle``: a record with intact records after it, which no crash can explain, so the
    next start refuses with CorruptLogError naming ``record_offset``. ``tail``: the last record
    of the newest segment, indistinguishable from a torn write, so the next start truncates it:
    the node loses a record it may have acknowledged (a disk that lies), which the cluster
    repairs from the others but which, on the leader of a 3-node cluster, may lose a write.
    """
    if where not in ("middle", "tail"):
        raise ValueError(f"where must be 'middle' or 'tail', not {where!r}")
    _stopped(cfg, node)
    found: list[tuple[Path, int, int]] = []
    for path in _segments(cfg, node):
        records, damage = read_records(path.read_bytes())
        if damage is not None:
            # Another flip would land relative to records we cannot see past the damage.
            raise FaultError(
                f"{path} is already damaged at offset {damage.offset} ({damage.reason})"
            )
        found += [(path, offset, len(payload)) for offset, payload in records]
    if where == "tail":
        if not found or found[-1][0] != _segments(cfg, node)[-1]:
            raise FaultError(f"{node}'s newest segment holds no intact record")
        path, record_offset, length = found[-1]
    else:
        if len(found) < 2:
            raise FaultError(f"{node}'s log has {len(found)} record(s): nothing in the middle")
        path, record_offset, length = found[(len(found) - 1) // 2]
    offset = record_offset + HEADER_SIZE + length // 2
    old, new = _flip(path, offset)
    return FaultDone(
        "flip-byte",
        node,
        f"flipped byte {offset} of {path} ({old:#04x} -> {new:#04x}, {where})",
        {"file": str(path), "offset": offset, "record_offset": record_offset, "where": where},
    )


def tamper_sealed(cfg: ClusterConfig, node: str) -> FaultDone:
    """Flip the last byte of the sealed enclave state (inside its authentication tag): the
    enclave can no longer unseal it, so the node must refuse to start."""
    _stopped(cfg, node)
    path = data_dir(cfg, node) / SEALED_STATE
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FaultError(f"{node} has no sealed state at {path}") from None
    if size == 0:
        raise FaultError(f"{path} is empty")
    old, new = _flip(path, size - 1)
    return FaultDone(
        "tamper-sealed",
        node,
        f"flipped byte {size - 1} of {path} ({old:#04x} -> {new:#04x})",
        {"file": str(path), "offset": size - 1},
    )


def lose_sealed_state(cfg: ClusterConfig, node: str) -> FaultDone:
    """Delete the sealed enclave state of a stopped node, as a lost disk or a wiped machine
    would: its Raft log survives, its enclave's secrets do not. The node starts again only in
    recovery mode (``supervisor.mark_for_recovery``), and only opens once recovery holders
    submit their shares."""
    _stopped(cfg, node)
    path = data_dir(cfg, node) / SEALED_STATE
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        raise FaultError(f"{node} has no sealed state at {path}") from None
    return FaultDone(
        "lose-sealed",
        node,
        f"deleted {node}'s sealed state {path} ({size} bytes)",
        {"file": str(path), "bytes": size},
    )


# --- replacing a member that cannot start ------------------------------------------------------


def replace(cfg: ClusterConfig, node: str, *, timeout: float = 60.0) -> FaultDone:
    """Replace a stopped member by a fresh node of the same name on the same platform.

    For a node that can never start again (a log damaged mid-way, sealed state it cannot
    open): its membership is removed through the leader (a proposal, then the Raft voter), a
    proposal admits it again, its data directory is kept aside as ``<name>.replaced-N`` for
    inspection, and it starts from an empty directory marked to join, so it attests, joins as
    the member it was admitted as and receives the master secret like any joiner. Both
    proposals are the signing admin's: in the development profile (one admin) they pass at
    once. Reusing the Raft identity is safe only because the removal committed first: the new
    incarnation never counts towards a quorum it forgot.
    """
    _stopped(cfg, node)
    _remove_member(cfg, node, timeout)
    _admit(cfg, node, timeout)
    old = data_dir(cfg, node)
    kept = next(
        old.with_name(f"{node}.replaced-{i}")
        for i in range(1, 10_000)
        if not old.with_name(f"{node}.replaced-{i}").exists()
    )
    if old.exists():
        old.rename(kept)
    old.mkdir(parents=True, mode=0o700)
    (old / JOIN_MARKER).write_text(f"replaced; the old directory is {kept.name}\n")
    started = restart(cfg, node, timeout=timeout)
    return FaultDone(
        "replace",
        node,
        f"removed {node} from the cluster and started it afresh (pid {started.detail['pid']}); "
        f"old data kept in {kept}",
        {"old_data": str(kept), "pid": started.detail["pid"]},
    )


def _remove_member(cfg: ClusterConfig, node: str, timeout: float) -> None:
    """Commit the removal (a proposal, which the development profile's single admin passes at
    once; then the Raft voter) through whichever live member answers."""
    _governed(cfg, node, "/v1/members/remove", {"name": node}, "remove", timeout)


def _admit(cfg: ClusterConfig, node: str, timeout: float) -> None:
    """Admit the fresh node again (removing a member drops its admission)."""
    action = {"op": "node.admit", "member": cfg.node(node).member_record()}
    _governed(cfg, node, "/v1/proposals", {"actions": [action]}, "admit", timeout)


def _governed(
    cfg: ClusterConfig, node: str, path: str, body: dict[str, Any], what: str, timeout: float
) -> None:
    """Ask for a governed change through whichever live member answers (its API forwards to
    the leader); retried while leadership moves or another membership change is in flight.
    A proposal that stays open needs other admins: the fault cannot go on alone."""
    others = [n for n in cfg.nodes if n.name != node]
    if not others:
        raise FaultError(f"{node} is the only node: there is no cluster to {what} it in")
    deadline = time.monotonic() + timeout
    last = "no member answered"
    signer = default_signer(cfg)
    for attempt in range(int(timeout / 0.2) + 1):
        spec = others[attempt % len(others)]
        try:
            answer = NodeClient.for_node(spec, 5.0, signer).post(path, body)
        except ApiError as exc:
            if exc.status == 409 and "is not a member" in exc.message:
                return  # removed already (an earlier attempt, or by an operator)
            last = exc.message
        except KmsimError as exc:  # unreachable, or no leader right now
            last = exc.message
        else:
            state, error = answer.get("state"), str(answer.get("error") or "")
            if state == "accepted" or (state == "failed" and "is not a member" in error):
                return
            if state == "open":
                raise FaultError(
                    f"the proposal to {what} {node} ({answer.get('proposal')}) needs other "
                    "admins' votes: a fault cannot govern alone"
                )
            return  # a remove of a voter that is no longer a member (the second step)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise FaultError(f"could not {what} {node} within {timeout:g}s: {last}")
