"""The operation history: recording rules, thread safety, and a strict JSON Lines round trip."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from kmnode.chaos.history import FaultEvent, History, HistoryError, HistoryRecorder, OpEvent


class Tick:
    """A fake monotonic clock: each reading is one second after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def sample() -> History:
    rec = HistoryRecorder(Tick())
    create = rec.invoke("c1", "key.create", {"key": "k"}, node="km1")
    create.ok({"key": "k", "generation": 1})
    rec.fault_start("partition", "km3", peers=["km1", "km2"])
    rotate = rec.invoke("c1", "key.rotate", {"key": "k"}, node="km1")
    read = rec.invoke("c2", "read", {"key": "k"}, node="km2")
    rotate.info("timeout")
    read.fail("not the leader", node="km2")
    rec.fault_stop("partition", "km3")
    rec.invoke("c3", "prove", {"key": "k", "generation": 1}, node="km3")  # left pending
    return rec.history()


def test_operations_pair_invokes_with_completions() -> None:
    ops = {op.kind: op for op in sample().operations()}
    assert ops["key.create"].outcome == "ok"
    assert ops["key.create"].value == {"key": "k", "generation": 1}
    assert (ops["key.create"].invoke_time, ops["key.create"].complete_time) == (1.0, 2.0)
    assert ops["key.rotate"].outcome == "info" and ops["key.rotate"].error == "timeout"
    assert ops["key.rotate"].effect_deadline == math.inf  # may still take effect
    assert (
        ops["read"].outcome == "fail" and ops["read"].effect_deadline == ops["read"].complete_time
    )
    assert ops["prove"].outcome == "pending" and ops["prove"].complete_index is None
    assert ops["prove"].complete_time == math.inf and ops["prove"].key == "k"


def test_faults_are_events_in_the_same_sequence() -> None:
    history = sample()
    faults = history.faults()
    assert [(f.phase, f.fault, f.target) for f in faults] == [
        ("start", "partition", "km3"),
        ("stop", "partition", "km3"),
    ]
    assert faults[0].detail == {"peers": ["km1", "km2"]}
    assert [e.index for e in history.events] == list(range(len(history.events)))
    assert history.end_time == history.events[-1].time


def test_a_completion_is_recorded_exactly_once() -> None:
    rec = HistoryRecorder(Tick())
    handle = rec.invoke("c1", "read", {"key": "k"})
    handle.ok({"generation": 0})
    assert handle.done
    with pytest.raises(HistoryError, match="already complete"):
        handle.info("late timeout")
    assert len(rec.history().events) == 2


def test_a_process_is_sequential() -> None:
    rec = HistoryRecorder(Tick())
    rec.invoke("c1", "read", {"key": "k"})
    with pytest.raises(HistoryError, match="still open"):
        rec.invoke("c1", "read", {"key": "k"})


def test_arguments_are_validated_and_copied() -> None:
    rec = HistoryRecorder(Tick())
    with pytest.raises(HistoryError, match="kind must be one of"):
        rec.invoke("c1", "delete", {})  # type: ignore[arg-type]
    with pytest.raises(HistoryError, match="not JSON"):
        rec.invoke("c1", "read", {"key": object()})
    nested = [1]
    args = {"key": "k", "nested": nested}
    handle = rec.invoke("c1", "read", args)
    nested.append(2)
    value = {"generation": 1}
    handle.ok(value)
    value["generation"] = 99
    op = rec.history().operations()[0]
    assert op.args == {"key": "k", "nested": [1]} and op.value == {"generation": 1}


def test_context_manager_records_info_when_the_client_raises() -> None:
    rec = HistoryRecorder(Tick())
    with pytest.raises(ConnectionResetError), rec.invoke("c1", "key.rotate", {"key": "k"}):
        raise ConnectionResetError("peer went away")
    with rec.invoke("c2", "read", {"key": "k"}) as handle:
        handle.ok({"generation": 1})
    ops = rec.history().operations()
    assert ops[0].outcome == "info" and "ConnectionResetError: peer went away" in ops[0].error
    assert ops[1].outcome == "ok"


def test_concurrent_clients_record_a_consistent_history() -> None:
    rec = HistoryRecorder()  # the real monotonic clock, read under the lock

    def client(name: str) -> None:
        for i in range(200):
            handle = rec.invoke(name, "read", {"key": f"k{i % 3}"}, node="km1")
            if i % 3:
                handle.ok({"generation": i})
            else:
                handle.info("timeout")

    threads = [threading.Thread(target=client, args=(f"c{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    history = rec.history()  # the constructor re-validates pairing, order and time
    assert len(history.events) == 8 * 200 * 2
    times = [e.time for e in history.events]
    assert times == sorted(times)
    ops = history.operations()
    assert all(op.outcome in ("ok", "info") for op in ops)
    assert {op.process for op in ops} == {f"c{n}" for n in range(8)}


def test_jsonl_round_trip(tmp_path: Path) -> None:
    history = sample()
    path = tmp_path / "history.jsonl"
    history.save(path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(history.events)
    assert all(isinstance(json.loads(line), dict) for line in lines)
    loaded = History.load(path)
    assert loaded.events == history.events
    assert loaded.operations() == history.operations()
    assert isinstance(loaded.events[2], FaultEvent) and isinstance(loaded.events[0], OpEvent)


def _lines() -> list[dict[str, object]]:
    return [json.loads(line) for line in sample().to_jsonl().splitlines()]


def _mutate(number: int, **changes: object) -> str:
    lines = _lines()
    lines[number - 1].update(changes)
    return "".join(json.dumps(line) + "\n" for line in lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_mutate(4, kind="key.destroy"), "line 4: kind must be one of"),
        (_mutate(2, extra=1), r"line 2: .*unknown \['extra'\]"),
        (_mutate(5, time=0.5), "line 5: time 0.5 goes backwards"),
        (_mutate(4, index=7), "line 4: event index 7 out of sequence"),
        (_mutate(2, op=42), "line 2: completion of op 42, which was never invoked"),
        (_mutate(6, process="c9"), "line 6: completion of op 1 by 'c9'/key.rotate does not"),
        (_mutate(3, type="done"), "line 3: type must be"),
        (_mutate(3, phase="pause"), "line 3: phase must be start or stop"),
        (_mutate(1, time="soon"), "line 1: 'time' must be a number"),
        (_mutate(1, op=True), "line 1: 'op' must be int"),
        (_mutate(1, args=[]), "line 1: 'args' must be dict"),
    ],
    ids=[
        "kind",
        "unknown-field",
        "time-backwards",
        "index",
        "orphan-completion",
        "wrong-process",
        "type",
        "phase",
        "time-type",
        "bool-op",
        "args-type",
    ],
)
def test_loader_names_the_malformed_line(text: str, message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        History.loads(text)


def test_loader_rejects_broken_json_and_double_completions(tmp_path: Path) -> None:
    lines = sample().to_jsonl().splitlines()
    with pytest.raises(HistoryError, match="line 4: Unterminated string"):
        History.loads("\n".join([*lines[:3], lines[3][:-5], *lines[4:]]))
    with pytest.raises(HistoryError, match="line 2: an event must be a JSON object"):
        History.loads(lines[0] + "\n[1, 2]\n")
    doubled = json.loads(lines[1])
    doubled["index"] = len(lines)
    doubled["time"] = 100.0
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*lines, json.dumps(doubled)]) + "\n")
    with pytest.raises(HistoryError, match=rf"bad.jsonl: line {len(lines) + 1}: .*completed twice"):
        History.load(path)


def test_constructor_validates_events_too() -> None:
    event = OpEvent(0, "ok", 0, "c1", "read", "km1", 1.0, value={})
    with pytest.raises(HistoryError, match="never invoked"):
        History((event,))


def test_loader_rejects_non_utf8_and_non_finite_times(tmp_path: Path) -> None:
    lines = sample().to_jsonl().encode().splitlines(keepends=True)
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"".join([*lines[:2], b"\xff\xfe garbage\n", *lines[2:]]))
    with pytest.raises(HistoryError, match=r"binary\.jsonl: line 3: not UTF-8"):
        History.load(path)
    with pytest.raises(HistoryError, match="line 1: time nan is not a finite number"):
        History.loads(_mutate(1, time=float("nan")))
