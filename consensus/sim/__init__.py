"""Deterministic Raft simulation: a hand-driven harness, a seeded simulator and a checker.

* ``harness.Harness``: a few cores whose messages move only when a test delivers them, for
  readable scenario tests (elections, Figure 8, membership, snapshots, reads, transfers).
* ``simulator.Simulation``: many cores over a simulated network with a virtual clock, one seed
  per run, faults (loss, duplication, reordering, partitions, crashes with torn writes),
  membership changes, compaction and client load; the same seed replays the same run.
* ``checker.Checker``: election safety, log matching, leader completeness, state-machine safety
  and read linearizability over the whole run; the simulator adds liveness after healing.
* ``python -m consensus.sim --seeds 10000 --nodes 5 --jobs 2``: sweep seeds, print a summary.
"""
