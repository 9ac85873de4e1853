"""How fast the deterministic simulator runs: simulated cluster-seconds per wall-clock second.

A "cluster-second" is one second of virtual time for the whole cluster (all five nodes ticking
every 100 ms, heartbeats, client proposals every 50 ms, reads). Two workloads, each the median
of several runs with different seeds:

* ``steady``: no faults, a healthy 5-node cluster under client load (the cheapest case);
* ``chaos``: the full fault schedule the CI sweep uses (partitions, crashes with torn writes,
  lossy links, membership changes, compaction), then heal and the liveness check.

The target is at least 50 cluster-seconds per wall-second for a 5-node cluster. This script
only measures and prints; it asserts nothing.

    python bench/sim.py                 # 5 runs per workload
    python bench/sim.py --runs 9 --md bench/results/sim.md.part
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model
from consensus.sim.simulator import SimConfig, run_seed

TARGET = 50.0


def measure(cfg: SimConfig, seeds: list[int]) -> list[tuple[float, float, int]]:
    """(sim-seconds per wall-second, sim-seconds, events) for each seed."""
    out = []
    for seed in seeds:
        t0 = time.perf_counter()
        r = run_seed(seed, cfg)
        wall = time.perf_counter() - t0
        if not r.ok:
            print(r.report(), file=sys.stderr)
        out.append((r.sim_seconds / wall, r.sim_seconds, r.events))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per workload (median reported)")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--seconds", type=float, default=60.0, help="virtual seconds per run")
    p.add_argument("--md", type=Path, help="also write a markdown table here")
    args = p.parse_args()

    workloads = {
        "steady": SimConfig(nodes=args.nodes, chaos_s=args.seconds, faults=False),
        "chaos": SimConfig(nodes=args.nodes, chaos_s=args.seconds),
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}, Python {platform.python_version()}, "
        f"load average at start {load:.2f}"
    )
    print(header)
    rows = []
    for name, cfg in workloads.items():
        results = measure(cfg, list(range(100, 100 + args.runs)))
        rates = [r for r, _, _ in results]
        med = statistics.median(rates)
        events = statistics.median(e / s for _, s, e in results)
        verdict = "meets" if med >= TARGET else "BELOW"
        line = (
            f"{name:6s} {args.nodes} nodes: median {med:7.1f} sim-s/wall-s "
            f"(min {min(rates):.1f}, max {max(rates):.1f}, {len(rates)} runs of "
            f"~{args.seconds:.0f} sim-s; {events:.0f} events per sim-s) -> {verdict} the "
            f"{TARGET:.0f} sim-s/wall-s target"
        )
        print(line, flush=True)
        rows.append((name, med, min(rates), max(rates), events))
    if args.md:
        lines = [
            "| workload | nodes | median sim-s/wall-s | min | max | events/sim-s |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {args.nodes} | {m:.1f} | {lo:.1f} | {hi:.1f} | {ev:.0f} |"
            for n, m, lo, hi, ev in rows
        ]
        args.md.write_text(header + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
