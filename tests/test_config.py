"""cluster.yaml validation: good files load, bad ones name every bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attest.identity import EnclaveRole
from kmnode.config import ClusterConfig, ConfigError, config_to_yaml, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def defaults_as_data() -> dict:  # type: ignore[type-arg]
    return ClusterConfig.default().model_dump(mode="json")


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_repository_cluster_yaml_is_the_embedded_default() -> None:
    loaded = load_config(REPO / "cluster.yaml")
    assert loaded.state_dir == REPO / ".kmsim"
    assert loaded.model_copy(update={"state_dir": ClusterConfig().state_dir}) == (
        ClusterConfig.default()
    )


def test_repository_cluster_yaml_spells_out_every_default_field() -> None:
    """`kmctl config defaults` and cluster.yaml must not drift: a new field with a default
    belongs in the documented file too (only an unset ``netns`` is left out of both)."""
    written = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert written == yaml.safe_load(config_to_yaml(ClusterConfig.default()))


def test_wrong_port_type_and_range_name_the_field() -> None:
    data = defaults_as_data()
    data["nodes"][2]["peer_port"] = 70000
    data["nodes"][1]["api_port"] = "eighty"
    problems = problems_of(data)
    assert any(p.startswith("nodes[2].peer_port: ") for p in problems), problems
    assert any(p.startswith("nodes[1].api_port: ") for p in problems), problems
    assert len(problems) == 2


def test_unknown_key_is_an_error_not_ignored() -> None:
    data = defaults_as_data()
    data["raft"]["tick_msec"] = 10
    assert problems_of(data) == ["raft.tick_msec: Extra inputs are not permitted"]


def test_duplicate_names_ports_and_platforms_are_reported_once_each() -> None:
    data = defaults_as_data()
    data["nodes"][1]["name"] = "km1"
    data["nodes"][2]["peer_port"] = data["nodes"][0]["peer_port"]
    data["nodes"][2]["platform"]["id"] = "platform-1"
    problems = problems_of(data)
    assert sorted(p.split(":")[0] for p in problems) == [
        "nodes[1].name",
        "nodes[2].peer_port",
        "nodes[2].platform.id",
    ]


def test_bad_measurement_and_tcb_are_rejected_with_paths() -> None:
    data = defaults_as_data()
    data["policy"]["km_measurements"] = ["not-hex"]
    data["policy"]["accepted_tcb"] = ["great"]
    paths = sorted(p.split(":")[0] for p in problems_of(data))
    assert paths == ["policy.accepted_tcb[0]", "policy.km_measurements"]


def test_missing_required_node_fields() -> None:
    problems = problems_of({"nodes": [{"name": "km1"}]})
    assert sorted(p.split(":")[0] for p in problems) == [
        "nodes[0].api_port",
        "nodes[0].peer_port",
        "nodes[0].platform",
    ]


def test_heartbeat_must_be_shorter_than_election() -> None:
    data = defaults_as_data()
    data["raft"]["heartbeat_ticks"] = 10
    assert problems_of(data)[0].startswith("raft.heartbeat_ticks:")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster: demo\nnodes: [\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(bad)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    assert problems_of([1, 2]) == ["(top level): expected a mapping, got list"]


def test_policy_resolves_current_and_pinned_measurements() -> None:
    pinned = "ab" * 32
    data = defaults_as_data()
    data["policy"]["service_measurements"] = ["@current", pinned]
    config = parse_config(data)
    current = {EnclaveRole.KM: b"\x01" * 32, EnclaveRole.SERVICE: b"\x02" * 32}
    policy = config.policy.resolve(current)
    assert policy.km_measurements == {b"\x01" * 32}
    assert policy.service_measurements == {b"\x02" * 32, bytes.fromhex(pinned)}


def test_relative_state_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"cluster": "x", "state_dir": "state"}))
    assert load_config(path).state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("host", "advertise", "problem"),
    [
        ("0.0.0.0", None, "listens on every interface: set advertise"),
        ("::", None, "listens on every interface: set advertise"),
        ("not a host!", None, "neither an IP address nor a valid host name"),
        ("-bad-.example", None, "neither an IP address nor a valid host name"),
        ("999.1.1.1", None, "neither an IP address nor a valid host name"),
        ("0.0.0.0", "0.0.0.0", "the unspecified address: nobody can reach a node there"),
        ("127.0.0.1", "a b", "neither an IP address nor a valid host name"),
    ],
)
def test_listen_and_advertised_addresses_are_checked(
    host: str, advertise: str | None, problem: str
) -> None:
    data = defaults_as_data()
    data["nodes"][1]["host"], data["nodes"][1]["advertise"] = host, advertise
    (found,) = problems_of(data)
    assert found.startswith("nodes[1]") and problem in found, found


def test_a_node_listening_everywhere_is_reached_at_its_advertised_address() -> None:
    data = defaults_as_data()
    data["nodes"][0].update(host="0.0.0.0", advertise="km1.example.org")
    data["nodes"][1].update(host="127.0.0.3")
    config = parse_config(data)
    first, second = config.nodes[0], config.nodes[1]
    assert first.address == "km1.example.org" and first.member_record()["host"] == first.address
    assert second.address == "127.0.0.3" and second.member_record()["host"] == "127.0.0.3"
