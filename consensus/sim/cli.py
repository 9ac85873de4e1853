"""``python -m consensus.sim``: sweep many seeds and summarize.

Each seed is an independent, reproducible run; a failing seed prints its violations and the
tail of its trace, and ``--start SEED --seeds 1 --verbose`` replays it exactly. Seeds are spread
over ``--jobs`` worker processes; results do not depend on the number of jobs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from consensus.sim.simulator import SimConfig, run_seed


@dataclass(frozen=True)
class SeedSummary:
    """What a worker sends back for one seed (small, picklable)."""

    seed: int
    ok: bool
    sim_seconds: float
    events: int
    committed: int
    elections: int
    reads: int
    recovery_s: float | None
    trace_hash: str
    report: str


def _run(args: tuple[int, SimConfig]) -> SeedSummary:
    seed, cfg = args
    r = run_seed(seed, cfg)
    return SeedSummary(
        seed=seed,
        ok=r.ok,
        sim_seconds=r.sim_seconds,
        events=r.events,
        committed=r.committed,
        elections=r.elections,
        reads=r.reads_checked,
        recovery_s=r.recovery_s,
        trace_hash=r.trace_hash,
        report="" if r.ok else r.report(),
    )


def sweep(seeds: Sequence[int], cfg: SimConfig, jobs: int) -> Iterator[SeedSummary]:
    """Run ``seeds`` (in parallel when ``jobs > 1``), yielding summaries as they finish."""
    work = [(s, cfg) for s in seeds]
    if jobs <= 1:
        for item in work:
            yield _run(item)
        return
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ctx.Pool(jobs) as pool:
        yield from pool.imap_unordered(_run, work, chunksize=4)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m consensus.sim", description=__doc__)
    p.add_argument("--seeds", type=int, default=100, help="number of seeds to run")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--nodes", type=int, default=5, help="initial cluster size")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--chaos-s", type=float, default=20.0, help="virtual seconds of faults")
    p.add_argument("--liveness-s", type=float, default=30.0, help="recovery bound after heal")
    p.add_argument("--no-faults", action="store_true", help="reliable network, no crashes")
    p.add_argument("--no-membership", action="store_true", help="no membership changes")
    p.add_argument("--verbose", action="store_true", help="one line per seed")
    args = p.parse_args(argv)

    cfg = SimConfig(
        nodes=args.nodes,
        chaos_s=args.chaos_s,
        liveness_s=args.liveness_s,
        faults=not args.no_faults,
        membership=not args.no_membership,
    )
    seeds = range(args.start, args.start + args.seeds)
    t0 = time.perf_counter()
    done = failed = 0
    sim_s = 0.0
    events = committed = elections = reads = 0
    worst_recovery = 0.0
    failures: list[int] = []
    for r in sweep(seeds, cfg, max(1, args.jobs)):
        done += 1
        sim_s += r.sim_seconds
        events += r.events
        committed += r.committed
        elections += r.elections
        reads += r.reads
        if r.recovery_s is not None:
            worst_recovery = max(worst_recovery, r.recovery_s)
        if not r.ok:
            failed += 1
            failures.append(r.seed)
            print(r.report, file=sys.stderr, flush=True)
        elif args.verbose:
            print(
                f"seed {r.seed}: ok sim {r.sim_seconds:.1f}s events {r.events} "
                f"committed {r.committed} elections {r.elections} trace {r.trace_hash}",
                flush=True,
            )
    wall = time.perf_counter() - t0
    print(
        f"seeds run: {done} (start {args.start}, nodes {args.nodes}, jobs {args.jobs})\n"
        f"violations: {failed} seed(s){' ' + str(sorted(failures)) if failures else ''}\n"
        f"simulated: {sim_s:.0f} cluster-seconds in {wall:.1f} wall-seconds "
        f"= {sim_s / wall if wall else 0.0:.0f} sim-s/wall-s\n"
        f"events: {events}, entries committed: {committed}, elections: {elections}, "
        f"reads checked: {reads}, worst recovery after heal: {worst_recovery:.2f}s"
    )
    return 1 if failed else 0
