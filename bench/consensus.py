"""Benchmark kmsim's Raft against PySyncObj: 3-process clusters on 127.0.0.1, same run.

For each configuration (kmsim with fsync on and off; PySyncObj with ``appendEntriesUseBatch``
off and on, password set) it starts three node processes (``bench/consensus_node.py``), then
measures on the leader: sequential commits/s (one proposal at a time), commits/s with 1,000
proposals in flight, and fail-over time (SIGKILL the leader; time until a survivor is leader and
has committed an entry; restart the killed node from its data directory and let it catch up
before the next kill). Throughput figures are medians of several runs because the machine is
noisy; fail-over reports the median and maximum over the kills. Ratios are ours / PySyncObj's
best, measured in this same run.

    python bench/consensus.py            # full run, a few minutes
    python bench/consensus.py --quick    # smoke run
    python bench/consensus.py --md bench/results/consensus.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.machine import cpu_model
from bench.ports import free_ports

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("n1", "n2", "n3")


class NodeProc:
    """One node process, driven over line-delimited JSON on its stdin/stdout."""

    def __init__(self, name: str, argv: list[str], stderr_path: Path) -> None:
        self.name = name
        self.stderr_path = stderr_path
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(stderr_path, "a") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                cwd=ROOT,
            )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.noise: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        first = self.replies.get(timeout=30)
        assert first.get("ready"), first

    def _read(self, out: IO[str]) -> None:
        for line in out:
            try:
                obj = json.loads(line)
            except ValueError:
                # PySyncObj prints warnings on stdout; keep them for the report.
                self.noise.append(line.strip())
                continue
            (self.events if "event" in obj else self.replies).put(obj)

    def request(self, cmd: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(queue.Empty):
                return self.replies.get(timeout=0.05)
            if not self.alive:
                raise RuntimeError(f"node {self.name} exited ({self.proc.returncode}) on {cmd}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name}: no reply to {cmd} within {timeout}s")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close()

    def quit(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


@dataclass
class Config:
    label: str
    impl: str
    flags: list[str]


@dataclass
class Result:
    label: str
    seq: list[float] = field(default_factory=list)
    conc: list[float] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Cluster:
    def __init__(self, cfg: Config, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        self.ports = dict(zip(NAMES, free_ports(len(NAMES)), strict=True))
        self.nodes: dict[str, NodeProc] = {}
        self.every: list[NodeProc] = []
        for name in NAMES:
            self.start(name)

    def start(self, name: str) -> None:
        peers = ",".join(f"{n}={p}" for n, p in self.ports.items())
        argv = [
            sys.executable, "-m", "bench.consensus_node",
            "--impl", self.cfg.impl, "--name", name, "--peers", peers,
            "--data-dir", str(self.root / name), *self.cfg.flags,
        ]  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes[name] = NodeProc(name, argv, self.root / f"{name}.stderr")
        self.every.append(self.nodes[name])

    def leader(self, timeout: float = 30) -> str:
        """The node that says it leads, twice in a row, with the others alive."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            leaders = [
                n
                for n, p in self.nodes.items()
                if p.alive and p.request({"cmd": "status"}).get("leader")
            ]
            if len(leaders) == 1 and leaders[0] == last:
                return last
            last = leaders[0] if len(leaders) == 1 else ""
            time.sleep(0.05)
        raise RuntimeError(f"{self.cfg.label}: no stable leader within {timeout}s")

    def wait_caught_up(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = {n: p.request({"cmd": "status"}) for n, p in self.nodes.items()}
            top = max(s["applied"] for s in st.values())
            if st[name]["applied"] >= top and st[name].get("leader_id"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.cfg.label}: {name} did not catch up within {timeout}s")

    def close(self) -> None:
        for p in self.nodes.values():
            p.quit()


def measure(cfg: Config, args: argparse.Namespace, work: Path) -> Result:
    res = Result(cfg.label)
    root = work / cfg.label.replace(" ", "_").replace("=", "-")
    cluster = Cluster(cfg, root)
    try:
        lead = cluster.nodes[cluster.leader()]
        lead.request({"cmd": "seq", "n": 100, "limit": 5})  # warm up connections and code paths
        for _ in range(args.runs):
            r = lead.request({"cmd": "seq", "n": args.seq, "limit": args.seq_limit})
            res.seq.append(r["n"] / r["secs"])
            r = lead.request({"cmd": "conc", "n": args.conc, "inflight": args.inflight})
            if r.get("errors") or r.get("lost"):
                res.notes.append(
                    f"concurrent run: {r.get('errors', 0)} failed proposals, "
                    f"{r.get('lost', 0)} never answered (run cut at 120 s)"
                )
            res.conc.append(r["n"] / r["secs"])
            print(
                f"  {cfg.label}: seq {res.seq[-1]:8.0f}/s  conc {res.conc[-1]:8.0f}/s", flush=True
            )
        for k in range(args.kills):
            name = cluster.leader()
            survivors = [p for n, p in cluster.nodes.items() if n != name]
            for p in survivors:
                p.request({"cmd": "watch"})
            t_kill = time.monotonic()
            cluster.nodes[name].kill()
            won = None
            deadline = time.monotonic() + 20
            while won is None and time.monotonic() < deadline:
                for p in survivors:
                    with contextlib.suppress(queue.Empty):
                        won = p.events.get(timeout=0.001)
                        break
            for p in survivors:
                p.request({"cmd": "unwatch"})
                with contextlib.suppress(queue.Empty):
                    p.events.get_nowait()
            if won is None:
                res.notes.append(f"kill {k + 1}: no new leader committed within 20 s")
                res.failover.append(20.0)
            else:
                res.failover.append(won["t"] - t_kill)
            print(f"  {cfg.label}: kill {k + 1}: fail-over {res.failover[-1]:.3f}s", flush=True)
            cluster.start(name)
            cluster.wait_caught_up(name)
            time.sleep(0.3)
    finally:
        cluster.close()
        noise = [line for p in cluster.every for line in p.noise]
        for name in NAMES:
            with contextlib.suppress(OSError):
                noise += (root / f"{name}.stderr").read_text().splitlines()
        kinds = collections.Counter(re.sub(r"\d+", "N", line)[:110] for line in noise)
        for kind, count in kinds.most_common(4):
            res.notes.append(f"nodes printed {count}x: {kind}")
    return res


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    cpu = cpu_model()
    system = f"{platform.system()} {platform.release()}"
    return f"nproc={os.cpu_count()}, CPU {cpu}, Python {platform.python_version()}, {system}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    by = {r.label: r for r in results}
    ours = [r for r in results if r.label.startswith("kmsim")]
    theirs = [r for r in results if r.label.startswith("pysyncobj")]
    best_seq = max(med(r.seq) for r in theirs)
    best_conc = max(med(r.conc) for r in theirs)
    lines = [
        f"Machine: {machine()}",
        f"Command: python bench/consensus.py {' '.join(args.argv)}".rstrip(),
        f"Runs per figure: {args.runs} (median); sequential n={args.seq} (at most "
        f"{args.seq_limit:g} s); concurrent n={args.conc} "
        f"with {args.inflight} in flight; fail-over: {args.kills} SIGKILLs of the leader",
        "",
        "| configuration | sequential commits/s | concurrent commits/s | fail-over median s "
        "| fail-over max s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        fo_max = max(r.failover) if r.failover else float("nan")
        lines.append(
            f"| {r.label} | {med(r.seq):,.0f} | {med(r.conc):,.0f} | "
            f"{med(r.failover):.3f} | {fo_max:.3f} |"
        )
    lines += [
        "",
        "Ratios against PySyncObj's best configuration in this run "
        f"(sequential {best_seq:,.0f}/s, concurrent {best_conc:,.0f}/s):",
        "",
    ]
    for r in ours:
        seq_ratio = med(r.seq) / best_seq
        conc_ratio = med(r.conc) / best_conc
        fo_max = max(r.failover) if r.failover else float("nan")
        lines.append(
            f"- {r.label}: sequential x{seq_ratio:.2f} (goal >= 1: "
            f"{'met' if seq_ratio >= 1 else 'MISSED'}), concurrent x{conc_ratio:.2f} "
            f"(goal >= 2: {'met' if conc_ratio >= 2 else 'MISSED'}), fail-over median "
            f"{med(r.failover):.3f}s (goal <= 0.5: {'met' if med(r.failover) <= 0.5 else 'MISSED'})"
            f", max {fo_max:.3f}s (goal <= 1.5: {'met' if fo_max <= 1.5 else 'MISSED'})"
        )
    for label, r in by.items():
        for note in r.notes:
            lines.append(f"- note ({label}): {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seq", type=int, default=2000)
    p.add_argument("--seq-limit", type=float, default=3.0, help="seconds per sequential run")
    p.add_argument("--conc", type=int, default=30000)
    p.add_argument("--inflight", type=int, default=1000)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated configuration labels")
    p.add_argument("--md", default="", help="also write the report to this file")
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    args.argv = raw
    if args.quick:
        args.runs, args.seq, args.conc, args.kills = 1, 200, 3000, 2
    configs = [
        Config("kmsim fsync=on", "kmsim", ["--fsync"]),
        Config("kmsim fsync=off", "kmsim", ["--no-fsync"]),
        Config("pysyncobj batch=off", "pysyncobj", ["--no-batch"]),
        Config("pysyncobj batch=on (default)", "pysyncobj", ["--batch"]),
    ]
    if importlib.util.find_spec("uvloop") is not None:
        # Optional: the same code on uvloop's event loop, to show how much is asyncio overhead.
        configs.insert(2, Config("kmsim fsync=off uvloop", "kmsim", ["--no-fsync", "--uvloop"]))
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c.label in wanted]
    work = Path(tempfile.mkdtemp(prefix="kmsim-bench-"))
    try:
        results = [measure(c, args, work) for c in configs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (
        report(results, args)
        if any(r.label.startswith("pysyncobj") for r in results)
        and any(r.label.startswith("kmsim") for r in results)
        else "\n".join(
            f"{r.label}: seq {med(r.seq):,.0f}/s conc {med(r.conc):,.0f}/s fail-over median "
            f"{med(r.failover):.3f}s max {max(r.failover, default=float('nan')):.3f}s"
            for r in results
        )
    )
    print()
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
