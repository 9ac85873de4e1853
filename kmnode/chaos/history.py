"""The operation history of a chaos run, recorded the way Jepsen records it.

Every client operation is an ``invoke`` event followed, later, by exactly one completion:

* ``ok``   — it happened, and ``value`` is what the cluster answered;
* ``fail`` — it definitely did not happen (409 refused, 400, 421 before proposing);
* ``info`` — unknown (timeout, connection lost): it may or may not take effect, even after the
  client gave up, so the checker treats its effect window as open until the end of time.

An operation still open when the history ends (``pending``) is judged like ``info``.
Nemesis fault events (``start``/``stop`` with a fault kind and target) share the same sequence,
so the checker can relate operations to faults and measure recovery after a heal.

Times come from a clock the recorder is given (monotonic in production, a counter in tests) and
are read under the recorder's lock together with the event's index, so index order and time
order never disagree. The checker leans on that: "completed before invoked" is a comparison of
two times from the same clock.

Argument and value conventions the checker relies on (all JSON):

* ``key.create`` / ``key.rotate``: ``args={"key": name}``, ok ``value={"generation": g}``;
* ``release``: ``args={"key", "node", "generation"?}``, ok ``value={"releases": [{"release",
  "node", "key", "generation", "status"}, ...]}`` as the operator API answers;
* ``read``: ``args={"key"}`` (``"linearizable": false`` for a plain read served from a node's
  applied state) with ``value={"generation": g | 0 if absent, "fingerprints"?: {"g": hex}}``,
  or ``args={"release": id}`` with ``value={"status": ...}``;
* ``prove``: ``args={"key", "generation"}``, ok ``value={"node", "key", "generation", "mac"}``;
* ``contract.deploy`` / ``contract.call``: the contract workload's operations
  (``kmnode.chaos.contract_calls``: ``args`` is a ``ContractCall``, an ok ``value`` a
  ``CallAnswer``). They name no ``key``, so the key checks pass them by.
* ``data.register`` / ``data.grant`` / ``data.revoke`` / ``data.compute``: the data workload's
  operations (``kmnode.chaos.data_calls``: each ``args`` and ok ``value`` is one of its typed
  records). They name no ``key`` either.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

OpKind = Literal[
    "key.create",
    "key.rotate",
    "release",
    "read",
    "prove",
    "contract.deploy",
    "contract.call",
    "data.register",
    "data.grant",
    "data.revoke",
    "data.compute",
]
Completion = Literal["ok", "fail", "info"]
Outcome = Literal["ok", "fail", "info", "pending"]
Phase = Literal["start", "stop"]

OP_KINDS: frozenset[str] = frozenset(get_args(OpKind))
_COMPLETIONS: frozenset[str] = frozenset(get_args(Completion))
_PHASES: frozenset[str] = frozenset(get_args(Phase))


T = TypeVar("T")


class HistoryError(ValueError):
    """A history that breaks the recording rules (the loader names the offending line)."""


@dataclass(frozen=True, slots=True)
class OpEvent:
    """One half of a client operation: its ``invoke`` or its completion."""

    index: int
    type: Literal["invoke", "ok", "fail", "info"]
    op: int  #: operation id, shared by the invoke and its completion
    process: str
    kind: OpKind
    node: str  #: the node contacted (a completion names the node that answered)
    time: float
    args: Mapping[str, Any] = field(default_factory=dict)  #: invoke only
    value: Any = None  #: ok only
    error: str = ""  #: fail / info only


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """The nemesis starting or stopping a fault (``fault`` kind, ``target`` node or link)."""

    index: int
    phase: Phase
    fault: str
    target: str
    time: float
    detail: Mapping[str, Any] = field(default_factory=dict)
    type: Literal["nemesis"] = "nemesis"


Event = OpEvent | FaultEvent


@dataclass(frozen=True, slots=True)
class Operation:
    """An invoke paired with its completion: the unit the checker reasons about."""

    id: int
    process: str
    kind: OpKind
    args: Mapping[str, Any]
    node: str
    outcome: Outcome
    invoke_index: int
    invoke_time: float
    complete_index: int | None  #: None while pending
    complete_time: float  #: ``math.inf`` while pending
    value: Any = None
    error: str = ""

    @property
    def key(self) -> str | None:
        key = self.args.get("key")
        return key if isinstance(key, str) else None

    @property
    def definite(self) -> bool:
        """Did the client learn the outcome (ok or fail), rather than info or nothing?"""
        return self.outcome in ("ok", "fail")

    @property
    def effect_deadline(self) -> float:
        """Latest time the operation can take effect: its completion if known, else never."""
        return self.complete_time if self.definite else math.inf

    @property
    def position(self) -> int:
        """Index of the event that settles this operation (completion, else invoke)."""
        return self.invoke_index if self.complete_index is None else self.complete_index

    def describe(self) -> str:
        args = json.dumps(dict(self.args), sort_keys=True)
        told = f" -> {json.dumps(self.value, sort_keys=True)}" if self.outcome == "ok" else ""
        if self.error:
            told = f" -> {self.error}"
        return f"op {self.id} [{self.process}@{self.node}] {self.kind} {args} {self.outcome}{told}"


@dataclass(frozen=True)
class History:
    """An immutable, validated sequence of events (indexes 0..n-1, time never decreasing)."""

    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        _validate(self.events)

    def operations(self) -> list[Operation]:
        """Every client operation in invoke order, paired with its completion if any."""
        invokes: dict[int, OpEvent] = {}
        done: dict[int, OpEvent] = {}
        for event in self.events:
            if isinstance(event, OpEvent):
                (invokes if event.type == "invoke" else done)[event.op] = event
        return [_pair(inv, done.get(op)) for op, inv in invokes.items()]

    def faults(self) -> list[FaultEvent]:
        return [e for e in self.events if isinstance(e, FaultEvent)]

    @property
    def end_time(self) -> float:
        return self.events[-1].time if self.events else 0.0

    # --- JSON Lines -------------------------------------------------------------------------

    def to_jsonl(self) -> str:
        return "".join(json.dumps(_event_json(e), sort_keys=True) + "\n" for e in self.events)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_jsonl(), encoding="utf-8")

    @classmethod
    def loads(cls, text: str) -> History:
        """Parse JSON Lines strictly: any malformed line raises ``HistoryError`` naming it."""
        events: list[Event] = []
        pairing = _Pairing()
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                event = _event_from_json(json.loads(line))
                pairing.add(event, len(events))
                events.append(event)
            except (json.JSONDecodeError, HistoryError, TypeError, ValueError) as exc:
                raise HistoryError(f"line {number}: {exc}") from None
        return cls(tuple(events))

    @classmethod
    def load(cls, path: Path | str) -> History:
        data = Path(path).read_bytes()
        try:
            return cls.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise HistoryError(f"{path}: line {line}: not UTF-8 at byte {exc.start}") from None
        except HistoryError as exc:
            raise HistoryError(f"{path}: {exc}") from None


def _pair(inv: OpEvent, done: OpEvent | None) -> Operation:
    # A completion's type is never "invoke" (the pairing rules guarantee it).
    outcome: Outcome = "pending" if done is None else done.type  # type: ignore[assignment]
    return Operation(
        id=inv.op,
        process=inv.process,
        kind=inv.kind,
        args=inv.args,
        node=(done or inv).node,
        outcome=outcome,
        invoke_index=inv.index,
        invoke_time=inv.time,
        complete_index=None if done is None else done.index,
        complete_time=math.inf if done is None else done.time,
        value=None if done is None else done.value,
        error="" if done is None else done.error,
    )


# --- validation (shared by the recorder, the constructor and the loader) -----------------------


def _validate(events: Iterable[Event]) -> None:
    pairing = _Pairing()
    for position, event in enumerate(events):
        pairing.add(event, position)


class _Pairing:
    """Invoke/completion bookkeeping so each event is validated in O(1)."""

    def __init__(self) -> None:
        self.open: dict[int, OpEvent] = {}  # op id -> invoke
        self.closed: set[int] = set()
        self.busy: dict[str, int] = {}  # process -> open op id
        self.last_time = -math.inf

    def add(self, event: Event, position: int) -> None:
        if event.index != position:
            raise HistoryError(f"event index {event.index} out of sequence (expected {position})")
        if not math.isfinite(event.time):
            raise HistoryError(f"time {event.time} is not a finite number")
        if event.time < self.last_time:
            raise HistoryError(f"time {event.time} goes backwards (last {self.last_time})")
        self.last_time = event.time
        if isinstance(event, FaultEvent):
            return
        if event.type == "invoke":
            if event.op in self.open or event.op in self.closed:
                raise HistoryError(f"op {event.op} invoked twice")
            if event.process in self.busy:
                raise HistoryError(
                    f"process {event.process!r} invokes op {event.op} while op "
                    f"{self.busy[event.process]} is still open"
                )
            self.open[event.op] = event
            self.busy[event.process] = event.op
            return
        invoke = self.open.pop(event.op, None)
        if invoke is None:
            state = "completed twice" if event.op in self.closed else "never invoked"
            raise HistoryError(f"completion of op {event.op}, which was {state}")
        if (invoke.process, invoke.kind) != (event.process, event.kind):
            raise HistoryError(
                f"completion of op {event.op} by {event.process!r}/{event.kind} does not match "
                f"its invoke by {invoke.process!r}/{invoke.kind}"
            )
        self.closed.add(event.op)
        del self.busy[event.process]


# --- JSON encoding ------------------------------------------------------------------------------


def _event_json(event: Event) -> dict[str, Any]:
    if isinstance(event, FaultEvent):
        return {
            "index": event.index,
            "type": "nemesis",
            "phase": event.phase,
            "fault": event.fault,
            "target": event.target,
            "time": event.time,
            "detail": dict(event.detail),
        }
    data: dict[str, Any] = {
        "index": event.index,
        "type": event.type,
        "op": event.op,
        "process": event.process,
        "kind": event.kind,
        "node": event.node,
        "time": event.time,
    }
    if event.type == "invoke":
        data["args"] = dict(event.args)
    elif event.type == "ok":
        data["value"] = event.value
    else:
        data["error"] = event.error
    return data


_OP_FIELDS = {"index", "type", "op", "process", "kind", "node", "time"}
_EXTRA_FIELD = {"invoke": "args", "ok": "value", "fail": "error", "info": "error"}
_FAULT_FIELDS = {"index", "type", "phase", "fault", "target", "time", "detail"}


def _event_from_json(data: Any) -> Event:
    if not isinstance(data, dict):
        raise HistoryError("an event must be a JSON object")
    kind_of_event = data.get("type")
    if kind_of_event == "nemesis":
        _exact_fields(data, _FAULT_FIELDS)
        phase = _field(data, "phase", str)
        if phase not in _PHASES:
            raise HistoryError(f"phase must be start or stop, not {phase!r}")
        return FaultEvent(
            index=_field(data, "index", int),
            phase=phase,  # type: ignore[arg-type]
            fault=_field(data, "fault", str),
            target=_field(data, "target", str),
            time=_time(data),
            detail=_field(data, "detail", dict),
        )
    if kind_of_event not in _EXTRA_FIELD:
        raise HistoryError(f"type must be invoke, ok, fail, info or nemesis, not {kind_of_event!r}")
    extra = _EXTRA_FIELD[kind_of_event]
    _exact_fields(data, _OP_FIELDS | {extra})
    kind = _field(data, "kind", str)
    if kind not in OP_KINDS:
        raise HistoryError(f"kind must be one of {sorted(OP_KINDS)}, not {kind!r}")
    return OpEvent(
        index=_field(data, "index", int),
        type=kind_of_event,
        op=_field(data, "op", int),
        process=_field(data, "process", str),
        kind=kind,  # type: ignore[arg-type]
        node=_field(data, "node", str),
        time=_time(data),
        args=_field(data, "args", dict) if extra == "args" else {},
        value=data["value"] if extra == "value" else None,
        error=_field(data, "error", str) if extra == "error" else "",
    )


def _exact_fields(data: dict[str, Any], expected: set[str]) -> None:
    missing, unknown = expected - data.keys(), data.keys() - expected
    if missing or unknown:
        raise HistoryError(
            f"{data.get('type')} event: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )


def _field(data: dict[str, Any], name: str, kind: type[T]) -> T:
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HistoryError(f"{name!r} must be {kind.__name__}, not {value!r}")
    return value


def _time(data: dict[str, Any]) -> float:
    value = data["time"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HistoryError(f"'time' must be a number, not {value!r}")
    return float(value)


# --- recording ----------------------------------------------------------------------------------


def _json_copy(value: Any, what: str) -> Any:
    """A deep, JSON-only copy: later mutation by the caller cannot rewrite history."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise HistoryError(f"{what} is not JSON-serialisable: {exc}") from None


class HistoryRecorder:
    """Records concurrent clients' operations and the nemesis's faults, thread-safely."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._pairing = _Pairing()
        self._next_op = 0

    def _append(self, make: Callable[[int, float], Event]) -> Event:
        with self._lock:
            event = make(len(self._events), self._clock())
            self._pairing.add(event, len(self._events))
            self._events.append(event)
            return event

    def invoke(
        self, process: str, kind: OpKind, args: Mapping[str, Any] | None = None, node: str = ""
    ) -> OpHandle:
        """Record that ``process`` is about to send ``kind`` to ``node``; complete the handle."""
        if kind not in OP_KINDS:
            raise HistoryError(f"kind must be one of {sorted(OP_KINDS)}, not {kind!r}")
        copied = _json_copy(dict(args or {}), "args")
        with self._lock:
            op = self._next_op
            self._next_op += 1
        self._append(lambda i, t: OpEvent(i, "invoke", op, process, kind, node, t, args=copied))
        return OpHandle(self, op, process, kind, node)

    def _complete(
        self, handle: OpHandle, type_: Completion, node: str, value: Any, error: str
    ) -> None:
        copied = _json_copy(value, "value")
        self._append(
            lambda i, t: OpEvent(
                i, type_, handle.op, handle.process, handle.kind, node, t, value=copied, error=error
            )
        )

    def fault_start(self, fault: str, target: str, **detail: Any) -> None:
        self._fault("start", fault, target, detail)

    def fault_stop(self, fault: str, target: str, **detail: Any) -> None:
        self._fault("stop", fault, target, detail)

    def _fault(self, phase: Phase, fault: str, target: str, detail: dict[str, Any]) -> None:
        copied = _json_copy(detail, "detail")
        self._append(lambda i, t: FaultEvent(i, phase, fault, target, t, copied))

    def history(self) -> History:
        """A snapshot of everything recorded so far (open operations stay pending)."""
        with self._lock:
            return History(tuple(self._events))

    def save(self, path: Path | str) -> None:
        self.history().save(path)


class OpHandle:
    """An invoked operation awaiting its single completion.

    As a context manager it guarantees a completion: leaving the block without one records
    ``info`` with the escaping exception, because the client cannot know whether the request
    reached the cluster.
    """

    def __init__(
        self, recorder: HistoryRecorder, op: int, process: str, kind: OpKind, node: str
    ) -> None:
        self._recorder = recorder
        self.op, self.process, self.kind, self.node = op, process, kind, node
        self._done = False
        self._done_lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done

    def _finish(self, type_: Completion, node: str | None, value: Any, error: str) -> None:
        with self._done_lock:
            if self._done:
                raise HistoryError(f"op {self.op} ({self.kind}) is already complete")
            self._done = True
        self._recorder._complete(self, type_, self.node if node is None else node, value, error)

    def ok(self, value: Any = None, *, node: str | None = None) -> None:
        self._finish("ok", node, value, "")

    def fail(self, error: str, *, node: str | None = None) -> None:
        self._finish("fail", node, None, error)

    def info(self, error: str, *, node: str | None = None) -> None:
        self._finish("info", node, None, error)

    def __enter__(self) -> OpHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.info(f"{type(exc).__name__}: {exc}" if exc else "not completed by the client")
