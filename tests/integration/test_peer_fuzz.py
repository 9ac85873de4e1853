"""The peer port under fire, at the socket level: random bytes, a real handshake transcript
with bytes flipped, cut and added, oversize length prefixes with floods behind them, mutated
channel frames on an attested link, and hundreds of half-open connections at once.

Afterwards the node must be unharmed: a legitimate member still handshakes and its messages
still arrive, nothing the fuzzer sent reached Raft, the enclave's state (applied index and hash
chain) is what it was, and the memory Python holds stayed within a stated bound while it ran.
Seeded, with a bounded number of cases, so a failure replays exactly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from kmnode.km.peer_wire import PeerLimits
from tests.host import eventually
from tests.km.peer_links import Links

from .peer_fuzzing import HALF_OPEN, POISON, Fuzzer

pytestmark = pytest.mark.timeout(120)

SEED = 13
#: Cases of each kind; the whole run takes well under a minute.
CASES = 150
#: Floods at once, every tenth round: each announces a huge frame and pushes 8 MiB behind it
#: (buffering them, as the node once did, would take 32 MiB).
FLOODS = 4
#: Bounds on what Python may hold because of the fuzzer: while it runs, and after it.
PEAK_BOUND = 16 * 1024 * 1024
LEFT_BOUND = 4 * 1024 * 1024
LIMITS = PeerLimits(handshake_timeout=1.0)


async def test_the_peer_port_survives_fuzzing_unchanged() -> None:
    links = Links(["a", "b"], limits=LIMITS)
    await links.start()
    try:
        a = links.transports["a"]
        state = links.enclaves["a"].state
        await eventually(lambda: links.linked("b", "a"), "b's link to a")
        links.send("b", "a", 1)
        await eventually(lambda: links.got("a", "b") == [1], "b's first message at a")
        before = (state.applied_index, state.chain_hash)
        fuzz = Fuzzer(a.port, "a", links.enclaves["b"], random.Random(SEED))
        kinds: list[Callable[[], Awaitable[None]]] = [
            fuzz.random_bytes,
            fuzz.mutated_hello,
            fuzz.mutated_finish,
            fuzz.mutated_channel_frames,
        ]
        # The refusals' log records would be kept by pytest's log capture, not by the node.
        quiet = logging.getLogger("kmnode.km.peer_transport")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            started = time.monotonic()
            for round_ in range(CASES):
                # Four cases at once, one of each kind, and a flood now and then.
                batch = [kind() for kind in kinds]
                if round_ % 10 == 0:
                    batch += [fuzz.oversize_flood() for _ in range(FLOODS)]
                await asyncio.gather(*batch)
            await fuzz.half_open_crowd()
            elapsed = time.monotonic() - started
            gc.collect()
            await asyncio.sleep(LIMITS.handshake_timeout + 0.5)  # what was left half-open ends
            gc.collect()
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            quiet.setLevel(level)
        print(
            f"fuzz: {CASES * len(kinds) + CASES // 10 * FLOODS + HALF_OPEN} connections in "
            f"{elapsed:.1f}s; Python memory peak +{(peak - baseline) / 2**20:.1f} MiB, "
            f"left +{(current - baseline) / 2**20:.2f} MiB; stats {a.stats}"
        )
        assert peak - baseline < PEAK_BOUND
        assert current - baseline < LEFT_BOUND
        # Every kind of refusal happened, and the crowd met the handshake limit.
        assert a.stats.refused >= CASES and a.stats.refused_oversize >= CASES // 10
        assert a.stats.refused_busy > 0
        assert a._handshakes_open == 0
        # Nothing the fuzzer sent reached Raft but genuine frames ahead of the garbage (those
        # may or may not, as the garbage behind them arrives with them or later); the state
        # is untouched.
        assert links.got("a", "b").count(POISON) <= fuzz.genuine_poison
        assert (state.applied_index, state.chain_hash) == before
        # The node still serves its legitimate peer, on the link it had or a new one.
        for i in range(2, 12):
            links.send("b", "a", i)
        await eventually(lambda: links.got("a", "b")[-10:] == list(range(2, 12)), "b at a")
        b_session_count = len(links.enclaves["a"]._sessions)
        assert b_session_count < 16  # refused handshakes left no sessions behind
    finally:
        await links.stop()
