"""bench/contracts_cluster.py in a tiny configuration, on a real 3-node cluster: every figure
comes out well-formed and against its goal (never how fast anything is), every call's result
opens for its caller, the balances equal the model of the transfers, and nothing is left
running after.

It takes 10-15 s on the 2-core benchmark machine (a cluster start, two windows of 1 s), so
it runs with the normal suite; the timeout only bounds a cluster that stops answering."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
from pathlib import Path

import pytest

from bench import contracts_cluster as bench
from kmnode.config import ClusterConfig
from kmnode.identity import IdentityKeys

pytestmark = pytest.mark.timeout(180)

TINY = bench.Settings(seconds=1.0, inflights=(1, 4), rounds=1, users=2, warmup_s=0.2)


def test_every_figure_is_reported_against_its_goal(tmp_path: Path) -> None:
    report = bench.run(TINY, tmp_path)
    text = "\n".join(report.lines)
    assert "goal >= 1,500/s" in text and "goal <= 10 ms" in text and "goal <= 40 ms" in text
    assert text.count("x goal") >= 3
    results = json.loads(json.dumps(report.results, default=str))

    windows = results["windows"]
    assert sorted(w["inflight"] for w in windows) == [1, 4]
    for w in windows:
        assert set(w["executed_per_s"]) == {"km1", "km2", "km3"}
        assert w["slowest_per_s"] == min(w["executed_per_s"].values()) > 0
        assert w["ok"] > 0 and w["not_ok"] == {} and not w["ran_out"]
        assert 0 < w["p50_ms"] <= w["p99_ms"]
        assert w["results_opened"] >= w["ok"] and w["results_wrong"] == 0
        # CPU of the client and of each node's three processes and the broker, in cores.
        assert 0 <= w["cpu"]["client"] < 2
        assert set(w["cpu"]["processes"]) == {"km1", "km2", "km3", "broker"}
        assert all(set(p) == {"host", "km", "service"} for n, p in w["cpu"]["processes"].items()
                   if n != "broker")  # fmt: skip
    assert [r["inflight"] for r in results["summary"]] == [1, 4]
    assert all(math.isfinite(r["p99_ms"]) for r in results["summary"])

    checks = results["checks"]
    assert checks["balances_match"] is True and checks["unknown_outcomes"] == 0
    assert checks["roots_match"] in (True, None)  # None: no checkpoint committed yet
    assert len(set(checks["executed"].values())) == 1  # every node executed every call

    # Every process the run started is gone: each node's three, the broker, the workers.
    pids = [pid for roles in results["pids"].values() for pid in roles.values()]
    assert len(pids) == 3 * 3 + 1
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert multiprocessing.active_children() == []


def test_transfers_go_from_every_user_to_every_other_and_continue_where_they_left() -> None:
    pairs = bench.transfer_pairs(4, 24, 0)
    assert all(payer != payee for payer, payee in pairs)
    assert {payer for payer, _ in pairs} == set(range(4))
    assert {(p, q) for p, q in pairs} == {(p, q) for p in range(4) for q in range(4) if p != q}
    assert bench.transfer_pairs(4, 24, 0)[10:] == bench.transfer_pairs(4, 14, 10)


def test_the_ledger_counts_only_known_outcomes() -> None:
    call = bench.Prepared(b"", 0, 1, b"")
    answers = [
        bench.Answer(call, status, 1, "", 0.0, 0.0)
        for status in ("ok", "ok", "reverted", "http 409 refused", "pending", "TimeoutError")
    ]
    ledger = bench.Ledger([10, 10])
    ledger.apply(answers)
    assert ledger.balances == [8, 12]
    assert ledger.unknown == 2  # pending, and a call whose answer never came


def test_calls_prepared_for_a_deposed_leader_go_to_the_new_one_unchanged_but_for_host() -> None:
    old, new = (ClusterConfig.default(3).nodes[i] for i in (0, 2))
    user = IdentityKeys.generate("user0")
    raw = bench.http_request(old, "POST", bench.CALLS_PATH, b'{"a": 1}', user)
    [moved] = bench.retarget([bench.Prepared(raw, 0, 1, b"k")], old, new)
    assert bench.host_line(new) in moved.raw and bench.host_line(old) not in moved.raw
    assert moved.raw.replace(bench.host_line(new), bench.host_line(old)) == raw
    assert (moved.payer, moved.payee, moved.reply_key) == (0, 1, b"k")


async def test_the_client_refuses_an_answer_without_length_or_too_long() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (bench.MAX_ANSWER_BYTES + 1),
    ]
    for answer in answers:

        async def serve(
            _r: asyncio.StreamReader, w: asyncio.StreamWriter, a: bytes = answer
        ) -> None:
            w.write(a)
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        node = ClusterConfig.default(1).nodes[0].model_copy(update={"api_port": port})
        conn = await bench.Connection.open(node)
        try:
            with pytest.raises(ValueError):
                await asyncio.wait_for(conn.exchange(b"GET / HTTP/1.1\r\n\r\n"), 5)
        finally:
            conn.close()
            server.close()
            await server.wait_closed()
