"""Starting and stopping the processes of a single-machine cluster (`kmctl up` / `kmctl down`).

Each node is its own detached OS process (its own session, so a Ctrl-C in the operator's shell
does not take the cluster down) running ``python -m kmnode.cli -c <state>/cluster.yaml node run
NAME``. The config the nodes run with is written to ``<state_dir>/cluster.yaml``, so `down`,
`status` and later invocations see the cluster that is really running, even after ``-n``.

A node whose spec has ``netns`` runs inside that Linux network namespace (made by `kmctl chaos
netns setup`, kmnode.netns): it is started as ``ip netns exec NS <node command>``.

A pid file is three lines: the pid, the process start time (clock ticks since boot, from
/proc/PID/stat) and the argv as JSON. `down` signals a pid only when /proc still shows exactly
that start time and argv: a pid file left behind by a crash must never make kmctl kill
whatever unrelated process has since been given the same pid. For a node in a namespace the
recorded argv is the node command itself, not the ``ip`` one: ``ip netns exec`` execs the
command in place, so that is what /proc shows for the rest of the process's life.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmnode
from consensus.fileio import atomic_write
from kmnode import netns
from kmnode.client import NodeClient, NodeUnreachable
from kmnode.config import ClusterConfig, ConfigError, NodeSpec, config_to_yaml, load_config
from kmnode.datadir import NODES_DIR, RAFT_DIR, RECOVER_MARKER, RESTORE_SNAPSHOT, SEALED_STATE
from kmnode.errors import EXIT_FAILURE, KmsimError
from kmnode.host.broker import BrokerStartError, start_embedded_broker, stop_broker
from kmnode.identity import dev_key_path, ensure_dev_identity
from kmnode.procfs import stat_fields

BROKER = "broker"
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_STOP_GRACE = 5.0
LOG_TAIL_LINES = 10
_POLL_FIRST = 0.05
_POLL_MAX = 0.1
_STATUS_TIMEOUT = 2.0

#: (node name, what it is doing now): `up` reports each change through this.
Progress = Callable[[str, str], None]
#: Builds the argv of a node process from the effective config file and the node's name.
NodeCommand = Callable[[Path, str], list[str]]


class SupervisorError(KmsimError):
    """`up` or `down` failed; the message says which process and why (log tail included)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)


def node_command(config_file: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "kmnode.cli", "-c", str(config_file), "node", "run", name]


def in_node_netns(node: NodeSpec, argv: Sequence[str]) -> list[str]:
    """``argv`` as ``node`` must be started: wrapped in ``ip netns exec`` if it has a network
    namespace, else unchanged (so nothing changes for clusters without namespaces)."""
    if node.netns is None:
        return list(argv)
    try:
        ip = netns.ip_binary()
    except netns.NetnsError as exc:
        raise SupervisorError(f"cannot start {node.name} in netns {node.netns!r}: {exc}") from None
    return netns.node_argv(node, argv, ip)


def node_command_for(cfg: ClusterConfig, config_file: Path, name: str) -> list[str]:
    """The argv that starts node ``name`` of ``cfg``: :func:`node_command`, inside the node's
    network namespace if it has one. Whatever starts a node (`up`, a chaos restart) uses
    this, and :func:`spawn` recognises the wrapping when it records the process."""
    return in_node_netns(cfg.node(name), node_command(config_file, name))


def run_dir(cfg: ClusterConfig) -> Path:
    return cfg.state_dir / "run"


def log_dir(cfg: ClusterConfig) -> Path:
    return cfg.state_dir / "logs"


def effective_config_path(cfg: ClusterConfig) -> Path:
    return cfg.state_dir / "cluster.yaml"


def log_path(cfg: ClusterConfig, name: str) -> Path:
    return log_dir(cfg) / f"{name}.log"


def pid_path(cfg: ClusterConfig, name: str) -> Path:
    return run_dir(cfg) / f"{name}.pid"


def write_effective_config(cfg: ClusterConfig) -> Path:
    """Write the config the nodes will run with; the state_dir in it is absolute."""
    cfg = cfg.model_copy(update={"state_dir": cfg.state_dir.resolve()})
    path = effective_config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by `kmctl up`: the configuration this cluster's nodes run with.\n"
    atomic_write(path, (text + config_to_yaml(cfg)).encode())
    return path


# --- processes and pid files ---------------------------------------------------------------


@dataclass(frozen=True)
class ProcessRecord:
    """What a pid file says; enough to recognise the very same process later."""

    pid: int
    start_ticks: int
    argv: tuple[str, ...]

    def encode(self) -> str:
        return f"{self.pid}\n{self.start_ticks}\n{json.dumps(list(self.argv))}\n"

    @classmethod
    def decode(cls, text: str) -> ProcessRecord:
        lines = text.splitlines()
        if len(lines) != 3:
            raise ValueError(f"expected 3 lines, found {len(lines)}")
        argv = json.loads(lines[2])
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv is not a JSON list of strings")
        return cls(int(lines[0]), int(lines[1]), tuple(argv))

    @classmethod
    def of(cls, pid: int) -> ProcessRecord | None:
        """The live process ``pid`` as /proc shows it; None if gone or a zombie."""
        stat = stat_fields(pid)
        if stat is None or stat[0] == "Z":
            return None
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])
        return cls(pid, int(stat[19]), argv)


def write_pid_file(path: Path, record: ProcessRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, record.encode().encode(), fsync=False)  # gone at reboot anyway


def read_pid_file(path: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.decode(path.read_text())
    except (OSError, ValueError):
        return None


def effective_config(cfg: ClusterConfig) -> ClusterConfig:
    """The config the running (or last started) cluster uses, else ``cfg`` itself: after
    `kmctl up -n 5`, `status` must look at five nodes even with the 3-node defaults."""
    path = effective_config_path(cfg)
    if not path.is_file():
        return cfg
    try:
        return load_config(path)
    except ConfigError:
        return cfg


def is_ours(record: ProcessRecord) -> bool:
    """True while the recorded process itself is alive (not a recycled pid)."""
    return ProcessRecord.of(record.pid) == record


def running(cfg: ClusterConfig) -> dict[str, ProcessRecord]:
    """Processes of this cluster (nodes and broker) that are alive, by pid-file name."""
    alive: dict[str, ProcessRecord] = {}
    if not run_dir(cfg).is_dir():
        return alive
    for path in sorted(run_dir(cfg).glob("*.pid")):
        record = read_pid_file(path)
        if record is not None and is_ours(record):
            alive[path.stem] = record
    return alive


#: A node's log is rotated when a start finds it this large (``KMSIM_LOG_MAX_BYTES``) ...
LOG_MAX_BYTES = 16 << 20
#: ... and this many rotated files are kept (``NAME.log.1`` the newest).
LOG_KEEP = 5


def rotate_log(path: Path, max_bytes: int | None = None, keep: int = LOG_KEEP) -> bool:
    """Rotate ``path`` (to ``.1``, older ones up to ``.keep``) if it has grown past
    ``max_bytes``; whether it did. The node writes through an inherited descriptor, so
    rotation happens when `kmctl up` (or a restart) starts a node, never under a running one:
    callers rotate before they note where the new run's lines begin."""
    if max_bytes is None:
        configured = os.environ.get("KMSIM_LOG_MAX_BYTES", "")
        max_bytes = int(configured) if configured.isdigit() else LOG_MAX_BYTES
    try:
        if path.stat().st_size < max_bytes:
            return False
    except FileNotFoundError:
        return False
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for generation in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{generation}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{generation + 1}"))
    path.rename(path.with_name(f"{path.name}.1"))
    return True


def spawn(
    name: str, argv: Sequence[str], log_file: Path, pid_file: Path
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start a detached process logging to ``log_file`` and record it in ``pid_file``.

    An ``ip netns exec NS CMD`` argv is recorded as CMD: what /proc shows once ``ip`` has
    entered the namespace and exec'd it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must run this very code, installed or not.
    root = str(Path(kmnode.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    offset = _log_size(log_file)
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    record = _settled_record(proc, argv)
    if record is None:
        # Exited already: Popen returns only after exec, so this is the program failing.
        proc.wait()
        raise SupervisorError(
            f"{name} exited at once with code {proc.returncode}; "
            f"end of {log_file}:\n{log_tail(log_file, offset=offset)}"
        )
    write_pid_file(pid_file, record)
    return proc, record


def _settled_record(proc: subprocess.Popen[bytes], argv: Sequence[str]) -> ProcessRecord | None:
    """The child's record once exec has finished: Popen returns while the kernel may still
    show an empty /proc/PID/cmdline, and a record taken then would never match again. For
    ``ip netns exec NS CMD`` that means the second exec too: until /proc shows CMD, it shows
    ``ip``, which is gone a moment later (same pid, same start time, other argv)."""
    final = tuple(netns.unwrap_exec(argv))
    wrapped = final != tuple(argv)
    deadline = time.monotonic() + 2.0
    while True:
        record = ProcessRecord.of(proc.pid)
        if record is None or (record.argv and (not wrapped or record.argv == final)):
            return record
        if time.monotonic() >= deadline:
            return ProcessRecord(record.pid, record.start_ticks, final)
        time.sleep(0.005)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, offset: int = 0) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) or "  | (empty)"


@dataclass(frozen=True)
class StopOutcome:
    name: str
    pid: int
    #: "stopped" (exited after SIGTERM), "killed" (needed SIGKILL), "gone" (was not running),
    #: or "not ours" (the pid now belongs to another program: left alone).
    result: str


def stop_processes(
    records: dict[str, ProcessRecord], grace: float = DEFAULT_STOP_GRACE
) -> list[StopOutcome]:
    """SIGTERM each process that is still the recorded one, SIGKILL what remains after
    ``grace`` seconds, then SIGKILL leftovers in their sessions (a node's service enclave)."""
    outcomes: dict[str, StopOutcome] = {}
    waiting: dict[str, ProcessRecord] = {}
    for name, record in records.items():
        current = ProcessRecord.of(record.pid)
        if current is None:
            outcomes[name] = StopOutcome(name, record.pid, "gone")
        elif current != record:
            outcomes[name] = StopOutcome(name, record.pid, "not ours")
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            waiting[name] = record
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline:
        for name, record in list(waiting.items()):
            _reap(record.pid)
            if not is_ours(record):
                outcomes[name] = StopOutcome(name, record.pid, "stopped")
                del waiting[name]
        if waiting:
            time.sleep(0.05)
    for name, record in waiting.items():
        if is_ours(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
        outcomes[name] = StopOutcome(name, record.pid, "killed")
    for name in records:
        if outcomes[name].result in ("stopped", "killed"):
            _kill_session(records[name].pid)
    return [outcomes[name] for name in records]


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child (after a failed `up`)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _kill_session(sid: int) -> None:
    """SIGKILL whatever is left in the session ``sid`` led. Safe: Linux does not hand out a
    pid that is still some live process's session id, so these are the node's descendants."""
    deadline = time.monotonic() + DEFAULT_STOP_GRACE
    while time.monotonic() < deadline:
        members = [pid for pid in _pids() if _session_of(pid) == sid]
        if not members:
            _reap(sid)
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        time.sleep(0.05)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _session_of(pid: int) -> int | None:
    stat = stat_fields(pid)
    if stat is None or stat[0] == "Z":
        return None
    return int(stat[3])


# --- up and down -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpResult:
    config_file: Path
    #: Names of the processes this call started ("broker" first if it was); empty if all ran.
    started: list[str]

    @property
    def already_up(self) -> bool:
        return not self.started


@contextlib.contextmanager
def exclusive(cfg: ClusterConfig) -> Iterator[None]:
    """Serialise `up` and `down` on one state directory: two at once would start a node
    twice or stop one that the other is still waiting for."""
    path = run_dir(cfg) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SupervisorError(
                f"another kmctl up or down is running on {cfg.state_dir} (lock {path})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ignore(_node: str, _message: str) -> None:
    return None


def up(
    cfg: ClusterConfig,
    *,
    timeout: float = DEFAULT_READY_TIMEOUT,
    progress: Progress = _ignore,
    command: NodeCommand | None = None,
    recover: bool = False,
) -> UpResult:
    """Start the broker and every node not already running: the first node, once it is ready
    the others together (their joins queue at the leader). Nodes resuming from their data
    directories are started without waiting for the first to be ready.

    ``recover``: every node whose sealed state is lost starts in recovery mode
    (:func:`mark_for_recovery`); such a node counts as up once it waits for shares.
    ``timeout`` bounds each node's wait for readiness. On any failure (or Ctrl-C) the
    processes this call started are stopped again before the error propagates.
    ``command`` replaces :func:`node_command` (tests run stand-in nodes with it).
    """
    with exclusive(cfg):
        if recover:
            alive = running(cfg)
            for node in cfg.nodes:
                if node.name not in alive:
                    progress(node.name, mark_for_recovery(cfg, node.name))
        return _up(cfg, timeout, progress, command or node_command)


def node_data_dir(cfg: ClusterConfig, name: str) -> Path:
    return cfg.state_dir / NODES_DIR / name


def mark_for_recovery(cfg: ClusterConfig, name: str) -> str:
    """Ask node ``name`` to start in recovery mode if its sealed state is lost or does not
    open (write the recover marker into its data directory); what was done, as a line for the
    operator.
    Raises SupervisorError if the node has no Raft log to recover from."""
    data_dir = node_data_dir(cfg, name)
    raft_dir = data_dir / RAFT_DIR
    restoring = (data_dir / RESTORE_SNAPSHOT).is_file()
    if not restoring and (not raft_dir.is_dir() or not any(raft_dir.iterdir())):
        raise SupervisorError(
            f"{name}: no Raft log in {raft_dir}: nothing to recover from (restore a snapshot "
            "into it first: kmctl snapshot restore)"
        )
    (data_dir / RECOVER_MARKER).write_text("recover: rebuild the master secret from shares\n")
    if (data_dir / SEALED_STATE).is_file():
        # A new KM build cannot open the old build's sealed state: the node decides.
        return "resumes if its sealed state opens, else starts in recovery mode"
    return "sealed state lost: starting in recovery mode"


def with_identities(cfg: ClusterConfig, progress: Progress = _ignore) -> ClusterConfig:
    """``cfg`` itself when it lists identities; else the development profile: an admin key
    made in the state directory (once) is the cluster's only identity, kmctl signs with it by
    default (``kmnode.client.default_signer``), and chaos is enabled from genesis."""
    if cfg.identities:
        return cfg
    dev = ensure_dev_identity(cfg.state_dir)
    progress(
        "identity",
        f"development profile: no identities in the config, so {dev.name} "
        f"({', '.join(dev.roles)}) signs with {dev_key_path(cfg.state_dir)}; chaos is enabled",
    )
    governance = cfg.governance.model_copy(update={"chaos": True})
    return cfg.model_copy(update={"identities": [dev], "governance": governance})


def _up(cfg: ClusterConfig, timeout: float, progress: Progress, command: NodeCommand) -> UpResult:
    alive = running(cfg)
    if all(n.name in alive for n in cfg.nodes) and (cfg.mqtt.url or BROKER in alive):
        return UpResult(effective_config_path(cfg), [])
    _check_ports([n for n in cfg.nodes if n.name not in alive], progress)
    cfg = with_identities(cfg, progress)
    config_file = write_effective_config(cfg)
    started: dict[str, ProcessRecord] = {}
    broker: subprocess.Popen[bytes] | None = None
    try:
        if not cfg.mqtt.url and BROKER not in alive:
            where = f"{cfg.mqtt.embedded_host}:{cfg.mqtt.embedded_port}"
            progress(BROKER, f"starting MQTT broker on {where}")
            broker = _start_broker(cfg)
            progress(BROKER, f"running (pid {broker.pid})")
        # The first node alone (genesis, or the member the others join through), then every
        # other node at once: their joins queue at the leader, so their start-up (imports,
        # service enclave) overlaps instead of adding up.
        first, rest = cfg.nodes[0], list(cfg.nodes[1:])
        waits: list[tuple[NodeSpec, _Watched, int]] = []
        watched, offset = _start_node(cfg, first, alive, started, config_file, command, progress)
        not_started = {n.name for n in rest if n.name not in alive}
        if not _wait_ready(cfg, first, watched, offset, timeout, progress, not_started):
            waits.append((first, watched, offset))
        for node in rest:
            watched, offset = _start_node(cfg, node, alive, started, config_file, command, progress)
            waits.append((node, watched, offset))
        for node, watched, offset in waits:
            _wait_ready(cfg, node, watched, offset, timeout, progress, set())
    except BaseException:
        _rollback(cfg, started, broker)
        raise
    names = ([BROKER] if broker is not None else []) + list(started)
    return UpResult(config_file, names)


def _start_node(
    cfg: ClusterConfig,
    node: NodeSpec,
    alive: dict[str, ProcessRecord],
    started: dict[str, ProcessRecord],
    config_file: Path,
    command: NodeCommand,
    progress: Progress,
) -> tuple[_Watched, int]:
    """Start ``node`` unless it runs; returns what to watch for readiness and its log offset."""
    rotate_log(log_path(cfg, node.name))
    offset = _log_size(log_path(cfg, node.name))
    record = alive.get(node.name)
    if record is not None:
        progress(node.name, f"already running (pid {record.pid})")
        return record, offset
    progress(node.name, "starting" if node.netns is None else f"starting in netns {node.netns}")
    proc, started[node.name] = spawn(
        node.name,
        in_node_netns(node, command(config_file, node.name)),
        log_path(cfg, node.name),
        pid_path(cfg, node.name),
    )
    progress(node.name, f"started (pid {proc.pid})")
    return proc, offset


def down(cfg: ClusterConfig, *, grace: float = DEFAULT_STOP_GRACE) -> list[StopOutcome]:
    """Stop every process with a pid file (nodes first, then the broker) and remove the files.

    A pid file whose pid now runs something else is removed without signalling anything.
    """
    with exclusive(cfg):
        return _down(cfg, grace)


def _down(cfg: ClusterConfig, grace: float) -> list[StopOutcome]:
    records: dict[str, ProcessRecord] = {}
    broken: list[Path] = []
    if run_dir(cfg).is_dir():
        for path in sorted(run_dir(cfg).glob("*.pid")):
            record = read_pid_file(path)
            if record is None:
                broken.append(path)
            else:
                records[path.stem] = record
    nodes = {k: v for k, v in records.items() if k != BROKER}
    outcomes = stop_processes(nodes, grace)
    if BROKER in records:
        outcomes += stop_processes({BROKER: records[BROKER]}, grace)
    for name in records:
        pid_path(cfg, name).unlink(missing_ok=True)
    for path in broken:
        path.unlink(missing_ok=True)
    return outcomes


def _check_ports(nodes: Sequence[NodeSpec], progress: Progress = _ignore) -> None:
    """Fail before starting anything if another program already listens on a node's port.

    A node in a network namespace is checked inside it (its address exists only there, so a
    bind in this namespace would always fail): the namespace and its address must exist and
    nothing there may listen on the ports. Without ``ss`` that port check is skipped, and
    ``progress`` says so."""
    for node in nodes:
        if node.netns is not None:
            try:
                skipped = netns.check_node_namespace(node)
            except netns.NetnsError as exc:
                raise SupervisorError(str(exc)) from None
            if skipped:
                progress(node.name, skipped)
            continue
        for label, port in (("api_port", node.api_port), ("peer_port", node.peer_port)):
            try:
                family = socket.AF_INET6 if ":" in node.host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((node.host, port))
            except OSError as exc:
                raise SupervisorError(
                    f"cannot start {node.name}: {node.host}:{port} ({label}) is unavailable: "
                    f"{exc.strerror or exc} (another cluster or program is using it?)"
                ) from None


def _start_broker(cfg: ClusterConfig) -> subprocess.Popen[bytes]:
    rotate_log(log_path(cfg, BROKER))
    try:
        proc = start_embedded_broker(
            cfg.mqtt.embedded_port, log_path(cfg, BROKER), host=cfg.mqtt.embedded_host
        )
    except BrokerStartError as exc:
        raise SupervisorError(str(exc)) from None
    record = _settled_record(proc, [])
    if record is None:
        stop_broker(proc)
        raise SupervisorError(f"embedded MQTT broker (pid {proc.pid}) exited right after start")
    write_pid_file(pid_path(cfg, BROKER), record)
    return proc


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


#: What `_wait_ready` watches for an early exit: our child, or a process found running.
_Watched = subprocess.Popen[bytes] | ProcessRecord | None


def _wait_ready(
    cfg: ClusterConfig,
    node: NodeSpec,
    process: _Watched,
    log_offset: int,
    timeout: float,
    progress: Progress,
    not_started: set[str],
) -> bool:
    """Poll until ``node`` is ready (True), or until it shows it resumes a cluster whose
    quorum needs nodes in ``not_started`` (False: start those first, then wait again).

    Only a fresh cluster must grow one node at a time; a resumed one elects no leader until
    enough of its members run, so waiting for each in turn would never end.
    """
    client = NodeClient.for_node(node, _STATUS_TIMEOUT)
    deadline = time.monotonic() + timeout
    interval = _POLL_FIRST
    last = ""
    while True:
        code = _exit_code(process)
        if code is not None:
            raise SupervisorError(
                f"{node.name} exited with {code} before it was ready; "
                f"end of {log_path(cfg, node.name)}:\n"
                f"{log_tail(log_path(cfg, node.name), offset=log_offset)}"
            )
        try:
            status = client.get("/v1/status")
        except NodeUnreachable:
            phase = "starting: API not answering yet"
        except KmsimError as exc:
            phase = f"starting: {exc.message}"
        else:
            ready, phase = describe_readiness(status)
            if ready:
                progress(node.name, phase)
                return True
            needed = sorted(_known_members(status) & not_started)
            if needed:
                progress(node.name, f"resuming: needs {', '.join(needed)} for a quorum")
                return False
        if phase != last:
            progress(node.name, phase)
            last = phase
        if time.monotonic() >= deadline:
            raise SupervisorError(
                f"{node.name} was not ready after {timeout:g}s (last seen: {phase}); "
                f"end of {log_path(cfg, node.name)}:\n"
                f"{log_tail(log_path(cfg, node.name), offset=log_offset)}"
            )
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 2, _POLL_MAX)


def _known_members(status: Any) -> set[str]:
    """The cluster members a node knows of from its persisted state (members and voters)."""
    if not isinstance(status, dict):
        return set()
    names: set[str] = set()
    for field_name in ("members", "voters"):
        values = status.get(field_name)
        if isinstance(values, list):
            names |= {v for v in values if isinstance(v, str)}
    names.discard(str(status.get("node")))
    return names


def _exit_code(process: _Watched) -> str | None:
    """How the process ended ("code 4"), or None while it runs (or is not ours to watch)."""
    if isinstance(process, ProcessRecord):
        return None if is_ours(process) else "an unknown code"
    if process is not None and process.poll() is not None:
        return f"code {process.returncode}"
    return None


def describe_readiness(status: Any) -> tuple[bool, str]:
    """Whether a /v1/status answer means ready (ready and a leader known), and a phase text."""
    if not isinstance(status, dict):
        return False, "starting: unexpected /v1/status answer"
    peers = status.get("peers") or {}
    attested = sum(1 for p in peers.values() if isinstance(p, dict) and p.get("attested"))
    leader = status.get("leader")
    if status.get("recovering") is True:
        return True, "recovery mode: waiting for recovery shares (kmctl recovery submit)"
    if status.get("ready") is True and leader:
        return (
            True,
            f"joined: {status.get('role', '?')}, leader {leader}, term {status.get('term')}",
        )
    if attested:
        return False, f"attested {attested} peer(s), joining"
    if leader:
        return False, f"leader {leader} known, attesting"
    return False, "running, waiting for a leader"


def _rollback(
    cfg: ClusterConfig,
    started: dict[str, ProcessRecord],
    broker: subprocess.Popen[bytes] | None,
) -> None:
    stop_processes(started)
    for name in started:
        pid_path(cfg, name).unlink(missing_ok=True)
    if broker is not None:
        stop_broker(broker)
        pid_path(cfg, BROKER).unlink(missing_ok=True)
