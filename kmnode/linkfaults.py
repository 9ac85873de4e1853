"""Injected faults on a node's outbound peer links (chaos testing): pure, seeded rules.

Chaos runs need faults that are reproducible. :class:`FaultRules` is pure (no I/O, no clock)
and seeded: each peer link draws from its own generator, seeded from ``(seed, peer)``, so the
decisions for messages to one peer do not depend on how sends to other peers interleave with
them. Given the seed and the sequence of sends on a link, its drops, delays and duplicates are
the same on every run.

Rules apply on the SENDING side (the transport asks :meth:`FaultRules.decide` before it queues
an outbound Raft message), so a one-way partition A→B is a rule on node A for peer B, and a
two-way partition is that plus a rule on B for peer A.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

#: Upper bound on an injected delay (and its jitter): a larger value is a typo, not a test.
MAX_DELAY_MS = 60_000.0


class FaultRuleError(ValueError):
    """A link rule value is out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field!r} {message}")
        self.field = field

    @classmethod
    def restored(cls, field: str, text: str) -> FaultRuleError:
        """The error again from its field and full text (as it crossed the circuit)."""
        error = cls(field, "")
        error.args = (text,)
        return error


def _probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultRuleError(name, f"must be a number between 0 and 1, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise FaultRuleError(name, f"must be a probability between 0 and 1, not {value!r}")
    return number


def _millis(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultRuleError(name, f"must be a number of milliseconds, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= MAX_DELAY_MS:
        raise FaultRuleError(name, f"must be between 0 and {MAX_DELAY_MS:g} ms, not {value!r}")
    return number


@dataclass(frozen=True)
class LinkRule:
    """What happens to messages this node sends to one peer.

    ``drop`` and ``duplicate`` are probabilities per message; ``delay_ms`` holds each message
    back, ``jitter_ms`` varies that uniformly by up to ± itself (never below zero, so messages
    may overtake each other, as on a real network); ``partition`` drops everything.
    """

    drop: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    duplicate: float = 0.0
    partition: bool = False

    def __post_init__(self) -> None:
        # Normalised through object.__setattr__ so ints given by JSON become floats.
        object.__setattr__(self, "drop", _probability("drop", self.drop))
        object.__setattr__(self, "duplicate", _probability("duplicate", self.duplicate))
        object.__setattr__(self, "delay_ms", _millis("delay_ms", self.delay_ms))
        object.__setattr__(self, "jitter_ms", _millis("jitter_ms", self.jitter_ms))
        if not isinstance(self.partition, bool):
            raise FaultRuleError("partition", f"must be true or false, not {self.partition!r}")

    @property
    def is_noop(self) -> bool:
        """True when the rule changes nothing (it is then not kept: see FaultRules.set)."""
        return self == LinkRule()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> LinkRule:
        """This rule with ``changes`` applied; unknown fields raise FaultRuleError."""
        names = {f.name for f in fields(self)}
        for name in changes:
            if name not in names:
                raise FaultRuleError(name, f"is not a rule field (expected one of {sorted(names)})")
        return LinkRule(**{**self.to_dict(), **changes})


@dataclass(frozen=True)
class Decision:
    """The fate of one outbound message: drop it, or send it after ``delay`` seconds, twice
    if ``duplicate``."""

    drop: bool = False
    delay: float = 0.0
    duplicate: bool = False


PASS = Decision()
DROP = Decision(drop=True)


@dataclass
class LinkStats:
    dropped: int = 0
    delayed: int = 0
    duplicated: int = 0


class FaultRules:
    """The link rules of one node, keyed by peer name. Not thread-safe: used on the event loop.

    With ``seed=None`` the generators are seeded from the OS (a run that need not replay).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rules: dict[str, LinkRule] = {}
        self._rngs: dict[str, random.Random] = {}
        self.stats: dict[str, LinkStats] = {}

    def set(self, peer: str, rule: LinkRule) -> None:
        """Install ``rule`` for messages to ``peer`` (a no-op rule removes the peer's rule)."""
        if rule.is_noop:
            self._rules.pop(peer, None)
        else:
            self._rules[peer] = rule

    def clear(self, peer: str | None = None) -> None:
        """Remove the rule for ``peer``, or every rule. Statistics are kept: they describe
        what already happened."""
        if peer is None:
            self._rules.clear()
        else:
            self._rules.pop(peer, None)

    def rules(self) -> dict[str, LinkRule]:
        return dict(self._rules)

    def get(self, peer: str) -> LinkRule:
        return self._rules.get(peer, LinkRule())

    def _rng(self, peer: str) -> random.Random:
        rng = self._rngs.get(peer)
        if rng is None:
            # str seeds are hashed with SHA-512 by random.Random: stable across runs and
            # processes (unlike hash()), and distinct per peer.
            rng = random.Random(None if self.seed is None else f"{self.seed}/{peer}")
            self._rngs[peer] = rng
        return rng

    def decide(self, peer: str) -> Decision:
        """Decide the fate of the next message to ``peer``. Without a rule no random number
        is drawn, so installing a rule on one link never shifts the draws of another."""
        rule = self._rules.get(peer)
        if rule is None:
            return PASS
        stats = self.stats.setdefault(peer, LinkStats())
        if rule.partition:
            stats.dropped += 1
            return DROP
        rng = self._rng(peer)
        if rule.drop and rng.random() < rule.drop:
            stats.dropped += 1
            return DROP
        delay_ms = rule.delay_ms
        if rule.jitter_ms:
            delay_ms = max(0.0, delay_ms + rng.uniform(-rule.jitter_ms, rule.jitter_ms))
        duplicate = bool(rule.duplicate) and rng.random() < rule.duplicate
        if delay_ms > 0:
            stats.delayed += 1
        if duplicate:
            stats.duplicated += 1
        return Decision(False, delay_ms / 1000.0, duplicate)

    def stats_dict(self) -> dict[str, dict[str, int]]:
        return {peer: asdict(s) for peer, s in sorted(self.stats.items())}


class LocalLinkRules:
    """The chaos API's view of a node's link rules, on the rules themselves: what the KM
    enclave process answers the host's link requests with (and what tests mount directly).
    The host reaches the same operations through the circuit."""

    def __init__(self, rules: FaultRules) -> None:
        self.rules = rules

    async def view(self) -> dict[str, Any]:
        rules = self.rules
        return {
            "rules": {p: r.to_dict() for p, r in sorted(rules.rules().items())},
            "stats": rules.stats_dict(),
            "seed": rules.seed,
        }

    async def update(self, peer: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change some fields of ``peer``'s rule; ``FaultRuleError`` names a bad one."""
        rule = self.rules.get(peer).updated(changes)
        self.rules.set(peer, rule)
        return rule.to_dict()

    async def heal(self, peer: str | None) -> list[str]:
        """Drop ``peer``'s rule (every rule if None); the peers healed."""
        healed = sorted(self.rules.rules()) if peer is None else [peer]
        self.rules.clear(peer)
        return healed
