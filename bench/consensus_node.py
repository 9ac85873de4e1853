"""One benchmark cluster node in its own OS process: kmsim's Raft, or PySyncObj for comparison.

The harness (``bench/consensus.py``) talks to each node over stdin/stdout, one JSON object per
line. The load is generated inside the leader's process for both implementations, so neither
pays for a client protocol and the figures compare the replication paths themselves.

Commands: ``status``; ``seq n`` (n proposals one after another); ``conc n inflight`` (n
proposals with ``inflight`` outstanding at any time); ``watch`` (poll every 2 ms until this
node is leader, commit one entry, emit a ``won`` event with the monotonic time); ``unwatch``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

PAYLOAD = b"k" * 16


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_peers(spec: str) -> dict[str, int]:
    out = {}
    for item in spec.split(","):
        name, port = item.split("=")
        out[name] = int(port)
    return out


# --------------------------------------------------------------------------- kmsim


class CounterMachine:
    """Counts applied entries; enough state to make snapshots meaningful."""

    def __init__(self) -> None:
        self.count = 0

    def apply(self, entry: Any) -> object:
        self.count += 1
        return self.count

    def snapshot(self) -> bytes:
        return self.count.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.count = int.from_bytes(data, "big")


async def run_kmsim(args: argparse.Namespace) -> None:
    import random

    from consensus.driver import RaftDriver
    from consensus.raft import RaftConfig
    from consensus.storage import DurableLog
    from consensus.transport import TcpTransport
    from consensus.types import NotLeader, RaftError

    peers = parse_peers(args.peers)
    names = tuple(sorted(peers))
    transport = TcpTransport(
        args.name, {n: ("127.0.0.1", p) for n, p in peers.items()}, port=peers[args.name]
    )
    sm = CounterMachine()
    driver = RaftDriver(
        RaftConfig(id=args.name, peers=names, election_tick=args.election_tick),
        DurableLog.open(args.data_dir, fsync=args.fsync),
        transport,
        sm,
        tick_interval=args.tick,
        rng=random.Random(),
        snapshot_every=100_000,
    )
    await driver.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    watch: asyncio.Task[None] | None = None

    async def seq(n: int, limit: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        done = 0
        while done < n and time.perf_counter() - t0 < limit:
            await driver.propose(PAYLOAD, timeout=10)
            done += 1
        return {"secs": time.perf_counter() - t0, "n": done}

    async def conc(n: int, inflight: int) -> dict[str, Any]:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await driver.propose(PAYLOAD, timeout=30)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(inflight, n))))
        return {"secs": time.perf_counter() - t0, "n": n}

    async def watcher() -> None:
        for _ in range(10_000):
            if driver.is_leader:
                try:
                    await driver.propose(b"probe", timeout=2)
                except RaftError:
                    continue
                emit({"event": "won", "t": time.monotonic(), "name": args.name})
                return
            await asyncio.sleep(0.002)

    emit({"ready": True, "name": args.name})
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["cmd"]
        try:
            if op == "status":
                st = driver.status
                emit(
                    {
                        "leader": driver.is_leader,
                        "leader_id": st.leader,
                        "applied": sm.count,
                        "term": st.term,
                    }
                )
            elif op == "seq":
                emit(await seq(cmd["n"], cmd["limit"]))
            elif op == "conc":
                emit(await conc(cmd["n"], cmd["inflight"]))
            elif op == "watch":
                watch = asyncio.create_task(watcher())
                emit({"ok": True})
            elif op == "unwatch":
                if watch is not None:
                    watch.cancel()
                emit({"ok": True})
            elif op == "quit":
                break
        except NotLeader as exc:
            emit({"error": "not leader", "leader": exc.leader})
        except RaftError as exc:
            emit({"error": repr(exc)})
    if watch is not None:
        watch.cancel()
    await driver.stop()


# --------------------------------------------------------------------------- PySyncObj


def run_pysyncobj(args: argparse.Namespace) -> None:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    class Counter(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, others: list[str], conf: Any) -> None:
            super().__init__(me, others, conf)
            self.count = 0

        @replicated  # type: ignore[untyped-decorator]
        def add(self, value: bytes) -> int:
            self.count += 1
            return self.count

    peers = parse_peers(args.peers)
    me = f"127.0.0.1:{peers[args.name]}"
    others = [f"127.0.0.1:{p}" for n, p in peers.items() if n != args.name]
    conf = SyncObjConf(
        appendEntriesUseBatch=args.batch,
        password=args.password,
        dynamicMembershipChange=False,
    )
    obj = Counter(me, others, conf)
    stop_watch = threading.Event()

    def seq(n: int, limit: float) -> dict[str, Any]:
        """One proposal at a time, two ways; the faster is reported (the fairest to PySyncObj).

        ``sync=True`` hands each call between threads; chaining the next call from the commit
        callback runs on PySyncObj's own tick thread and avoids that hop. Each half stops at
        ``n / 2`` commits or ``limit / 2`` seconds.
        """
        t0 = time.perf_counter()
        n_sync = 0
        while n_sync < n // 2 and time.perf_counter() - t0 < limit / 2:
            obj.add(PAYLOAD, sync=True, timeout=10)
            n_sync += 1
        t_sync = time.perf_counter() - t0
        done = threading.Event()
        count = [0]
        t1 = time.perf_counter()

        def chain(result: Any, error: Any) -> None:
            count[0] += 1
            if count[0] >= n - n // 2 or time.perf_counter() - t1 > limit / 2:
                done.set()
            else:
                obj.add(PAYLOAD, callback=chain)

        obj.add(PAYLOAD, callback=chain)
        done.wait(limit + 30)
        t_chain = time.perf_counter() - t1
        best = max(n_sync / t_sync, count[0] / t_chain)
        return {
            "secs": 1.0,
            "n": best,
            "sync_per_s": n_sync / t_sync,
            "chain_per_s": count[0] / t_chain,
        }

    def conc(n: int, inflight: int) -> dict[str, Any]:
        sem = threading.Semaphore(inflight)
        done = threading.Event()
        state = {"left": n, "errors": 0}
        lock = threading.Lock()

        def cb(result: Any, error: Any) -> None:
            with lock:
                if error != FAIL_REASON.SUCCESS:
                    state["errors"] += 1
                state["left"] -= 1
                if state["left"] == 0:
                    done.set()
            sem.release()

        t0 = time.perf_counter()
        for _ in range(n):
            sem.acquire()
            obj.add(PAYLOAD, callback=cb)
        finished = done.wait(120)
        return {
            "secs": time.perf_counter() - t0,
            "n": n,
            "errors": state["errors"],
            "lost": 0 if finished else state["left"],
        }

    def watcher() -> None:
        for _ in range(10_000):
            if stop_watch.is_set():
                return
            if obj._isLeader():
                try:
                    obj.add(b"probe", sync=True, timeout=2)
                except Exception:  # SyncObjException on timeout / not leader
                    continue
                emit({"event": "won", "t": time.monotonic(), "name": args.name})
                return
            time.sleep(0.002)

    emit({"ready": True, "name": args.name})

    def handle(op: str, cmd: dict[str, Any]) -> bool:
        if op == "status":
            leader = obj._getLeader()
            emit(
                {
                    "leader": obj._isLeader(),
                    "leader_id": str(leader) if leader else "",
                    "applied": obj.count,
                    "ready": obj.isReady(),
                }
            )
        elif op == "seq":
            emit(seq(cmd["n"], cmd["limit"]) if obj._isLeader() else {"error": "not leader"})
        elif op == "conc":
            emit(conc(cmd["n"], cmd["inflight"]) if obj._isLeader() else {"error": "not leader"})
        elif op == "watch":
            stop_watch.clear()
            threading.Thread(target=watcher, daemon=True).start()
            emit({"ok": True})
        elif op == "unwatch":
            stop_watch.set()
            emit({"ok": True})
        elif op == "quit":
            return False
        return True

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        try:
            if not handle(op, cmd):
                break
        except Exception as exc:  # report, keep serving: the harness decides what it means
            emit({"error": repr(exc)})
    obj.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--impl", choices=["kmsim", "pysyncobj"], required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--peers", required=True, help="name=port,name=port,...")
    p.add_argument("--data-dir", default="")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--tick", type=float, default=0.025)
    p.add_argument("--election-tick", type=int, default=10)
    p.add_argument("--uvloop", action="store_true", help="run kmsim on uvloop if installed")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--password", default="bench-password")
    args = p.parse_args()
    import os

    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    if args.impl == "kmsim" and args.uvloop:
        import uvloop

        uvloop.run(run_kmsim(args))
    elif args.impl == "kmsim":
        asyncio.run(run_kmsim(args))
    else:
        run_pysyncobj(args)


if __name__ == "__main__":
    main()
