"""kmctl ledger verify|mark on ledgers stored as a stopped node's raft directory, without a
cluster: the exit codes and messages an operator (or a script) sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from attest.quote import QuoteVerifier
from kmnode.cli import cli
from kmnode.config import ClusterConfig, load_config
from kmnode.km.enclave import KMEnclave
from kmnode.km.state import encode_command
from kmnode.simhw import HardwareStore
from tests.km.ledgers import Builder
from tests.km.test_ledger import KM, MEMBER, POLICY


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(ClusterConfig.default().model_dump(mode="json")))
    return path


def kmctl(config: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["-c", str(config), "ledger", *args])
    return result.exit_code, result.stdout, result.stderr


def signed_ledger(config: Path) -> tuple[Builder, Path]:
    """km1's ledger: genesis and four keys, signed by km1's enclave on its configured platform
    through index 6, then two commands nobody has signed yet."""
    cfg = load_config(config)
    spec = cfg.node("km1").platform
    store = HardwareStore(cfg.state_dir / "hardware")
    platform = store.platform(spec.id, spec.tcb)
    km1 = KMEnclave("km1", platform.enclave(KM), QuoteVerifier(store.vendor_public_key()))
    member = {**MEMBER, "platform_id": spec.id}
    built = Builder()
    built.command(
        encode_command("cluster.init", cluster="t", policy=POLICY.to_dict(), member=member)
    )
    built.commands([encode_command("key.create", name=n) for n in "abcde"])
    built.sign(km1)
    built.commands([encode_command("key.create", name=n) for n in "fg"])
    return built, cfg.state_dir / "nodes"


def test_unsigned_tail_exits_1_unless_allowed(config_file: Path) -> None:
    built, nodes = signed_ledger(config_file)
    built.store(nodes / "km1" / "raft")
    code, out, _ = kmctl(config_file, "verify", "km1", "--json")
    assert code == 1
    report = json.loads(out)
    assert not report["ok"] and report["unsigned_tail"] == 2
    assert "2 command(s) after index 6 are covered by no member's signature" in report["problem"]
    code, out, _ = kmctl(config_file, "verify", "km1", "--json", "--allow-unsigned-tail")
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = kmctl(config_file, "verify", "--help")
    assert "since the last signature" in " ".join(out.split())


def test_truncated_copy_against_a_mark_file_or_node_exits_1_naming_the_index(
    config_file: Path,
) -> None:
    built, nodes = signed_ledger(config_file)
    built.store(nodes / "km1" / "raft")
    built.store(nodes / "km2" / "raft", through=5)  # cut before the signature
    mark_file = config_file.parent / "km1.mark.json"
    code, _, err = kmctl(config_file, "mark", "km1", "-o", str(mark_file))
    assert code == 0 and "signed mark at index 6" in err
    assert json.loads(mark_file.read_text())["index"] == 6
    for reference in (str(mark_file), "km1"):
        code, out, _ = kmctl(
            config_file, "verify", "km2", "--against", reference, "--allow-unsigned-tail", "--json"
        )
        assert code == 1, out
        report = json.loads(out)
        assert report["problem"].startswith("truncated or rolled back: this ledger ends at index 5")
        assert report["first_bad_index"] == 6
    code, out, _ = kmctl(
        config_file, "verify", "km1", "--against", str(mark_file), "--allow-unsigned-tail"
    )
    assert code == 0 and "agrees with" in out


def test_bad_marks_are_refused_with_their_exit_codes(config_file: Path) -> None:
    built, nodes = signed_ledger(config_file)
    built.store(nodes / "km1" / "raft")
    code, _, err = kmctl(config_file, "verify", "km1", "--against", "nowhere.json")
    assert code == 2 and "neither a node of this cluster nor a file" in err
    not_a_mark = config_file.parent / "x.json"
    not_a_mark.write_text("{}")
    code, _, err = kmctl(config_file, "verify", "km1", "--against", str(not_a_mark))
    assert code == 2 and "is not a ledger mark" in err
    mark_file = config_file.parent / "m.json"
    assert kmctl(config_file, "mark", "km1", "-o", str(mark_file))[0] == 0
    mark = json.loads(mark_file.read_text())
    mark["index"] = 5  # claims another head than the one signed
    mark_file.write_text(json.dumps(mark))
    code, _, err = kmctl(config_file, "verify", "km1", "--against", str(mark_file))
    assert code == 1 and "is not genuine: signature does not verify" in err
    built.store(nodes / "km2" / "raft", through=5)  # nothing signed in it
    code, _, err = kmctl(config_file, "mark", "km2")
    assert code == 1 and "holds no member's signature yet" in err


def test_trust_km_takes_measurements_only(config_file: Path) -> None:
    built, nodes = signed_ledger(config_file)
    built.store(nodes / "km1" / "raft")
    code, _, err = kmctl(config_file, "verify", "km1", "--trust-km", "nothex")
    assert code == 2 and "'nothex' is not 64 hex digits" in err
    code, _, _ = kmctl(
        config_file, "verify", "km1", "--allow-unsigned-tail", "--trust-km", "ab" * 32
    )
    assert code == 0
