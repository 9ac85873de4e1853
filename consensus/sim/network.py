"""The simulated network: per-message delay, loss, duplication and reordering, and partitions.

A message's fate is decided when it is sent (using the run's RNG, so it is reproducible) and
checked again on arrival, so a partition that starts while a message is in flight still stops
it. Partitions are sets of blocked *directed* links, which gives one-way partitions for free.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from consensus.types import NodeId


@dataclass
class LinkModel:
    """How unreliable the network is right now (the chaos schedule changes these)."""

    min_delay_us: int = 500
    max_delay_us: int = 10_000
    drop: float = 0.0
    duplicate: float = 0.0
    #: probability that a message takes a long detour (arrives after later messages)
    reorder: float = 0.0
    reorder_delay_us: int = 200_000


class Network:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.model = LinkModel()
        self.blocked: set[tuple[NodeId, NodeId]] = set()

    def deliveries(self, frm: NodeId, to: NodeId) -> list[int]:
        """Delays (µs) of the copies of one message that will arrive; empty when it is lost."""
        if (frm, to) in self.blocked:
            return []
        rng = self.rng
        model = self.model
        if model.drop and rng.random() < model.drop:
            return []
        copies = 2 if model.duplicate and rng.random() < model.duplicate else 1
        out = []
        for _ in range(copies):
            delay = rng.randint(model.min_delay_us, model.max_delay_us)
            if model.reorder and rng.random() < model.reorder:
                delay += rng.randint(0, model.reorder_delay_us)
            out.append(delay)
        return out

    def can_deliver(self, frm: NodeId, to: NodeId) -> bool:
        return (frm, to) not in self.blocked

    def partition(self, groups: Iterable[Iterable[NodeId]]) -> None:
        """Block every link between different groups (symmetric)."""
        sets = [sorted(g) for g in groups]
        for i, a in enumerate(sets):
            for j, b in enumerate(sets):
                if i != j:
                    for x in a:
                        for y in b:
                            self.blocked.add((x, y))

    def cut(self, frm: NodeId, to: NodeId) -> None:
        """Block one direction only."""
        self.blocked.add((frm, to))

    def heal(self) -> None:
        self.blocked.clear()
