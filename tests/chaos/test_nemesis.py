"""The nemesis's schedule and the fault kinds a cluster can take (no processes needed)."""

from __future__ import annotations

import itertools

import pytest

from kmnode.chaos.history import HistoryRecorder
from kmnode.chaos.nemesis import (
    FAULT_KINDS,
    NETNS_KINDS,
    OPT_IN_KINDS,
    Nemesis,
    available_kinds,
    in_namespaces,
    resolve_kinds,
)
from kmnode.config import ClusterConfig


def nemesis(seed: int, kinds: tuple[str, ...] = FAULT_KINDS) -> Nemesis:
    cfg = ClusterConfig.default(3)
    return Nemesis(cfg, seed, kinds, HistoryRecorder(), lambda _line: None, restart_timeout=1)


def test_each_round_of_the_schedule_is_every_kind_once() -> None:
    rounds = list(itertools.islice(nemesis(7).schedule(), 3 * len(FAULT_KINDS)))
    for i in range(3):
        chunk = rounds[i * len(FAULT_KINDS) : (i + 1) * len(FAULT_KINDS)]
        assert sorted(chunk) == sorted(FAULT_KINDS)


def test_the_schedule_is_fixed_by_the_seed_and_differs_between_seeds() -> None:
    def first(seed: int) -> list[str]:
        return list(itertools.islice(nemesis(seed).schedule(), 20))

    assert first(3) == first(3)
    assert first(3) != first(4)


def test_a_loopback_cluster_takes_every_kind_but_namespace_partitions() -> None:
    cfg = ClusterConfig.default(3)
    assert not in_namespaces(cfg)
    assert set(available_kinds(cfg)) == set(FAULT_KINDS) - set(NETNS_KINDS) - set(OPT_IN_KINDS)
    assert resolve_kinds(cfg, None) == available_kinds(cfg)
    assert resolve_kinds(cfg, ()) == ()  # a baseline run
    assert resolve_kinds(cfg, ("kill", "pause")) == ("kill", "pause")
    with pytest.raises(ValueError, match="own network namespace"):
        resolve_kinds(cfg, ("kill", "netns-partition"))
    with pytest.raises(ValueError, match="unknown fault kinds"):
        resolve_kinds(cfg, ("kill", "meteor"))


def test_a_cluster_in_namespaces_also_takes_namespace_partitions() -> None:
    data = ClusterConfig.default(3).model_dump(mode="json")
    data["mqtt"]["embedded_host"] = "10.77.9.1"
    for i, node in enumerate(data["nodes"]):
        node["host"], node["netns"] = f"10.77.9.{11 + i}", f"kmx-{node['name']}"
    cfg = ClusterConfig.model_validate(data)
    assert in_namespaces(cfg)
    assert set(available_kinds(cfg)) == set(FAULT_KINDS) - set(OPT_IN_KINDS)
    assert resolve_kinds(cfg, ("netns-partition",)) == ("netns-partition",)
