"""Deterministic Raft simulation: a hand-driven harness, a seeded simulator and a checker."""
