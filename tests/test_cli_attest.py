"""kmctl attest and config commands, run as a user would, without a cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.config import ClusterConfig


@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(ClusterConfig.default().model_dump(mode="json")))
    return path


def kmctl(*args: str, input: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def test_fresh_quote_of_a_configured_node_is_accepted(cluster_file: Path) -> None:
    code, out, _ = kmctl("-c", str(cluster_file), "attest", "verify", "--node", "km2", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["verdict"] == "accepted"
    assert report["identity"]["platform_id"] == "platform-2"
    assert [c["check"] for c in report["checks"]][-1] == "report data"
    assert (
        cluster_file.parent / ".kmsim" / "hardware" / "vendor-root.seed"
    ).stat().st_mode & 0o77 == 0


def test_quote_file_round_trip_and_role_mismatch_is_refused(cluster_file: Path) -> None:
    quote_path = cluster_file.parent / "q.bin"
    code, _, err = kmctl(
        "-c",
        str(cluster_file),
        "attest",
        "quote",
        "km1",
        "--role",
        "service",
        "-o",
        str(quote_path),
    )
    assert code == 0 and "wrote" in err
    code, out, _ = kmctl(
        "-c", str(cluster_file), "attest", "verify", str(quote_path), "--role", "service", "--json"
    )
    assert code == 0 and json.loads(out)["identity"]["role"] == "service"
    code, out, err = kmctl("-c", str(cluster_file), "attest", "verify", str(quote_path), "--json")
    assert code == 1
    assert json.loads(out)["error"]["type"] == "UnknownMeasurement"


def test_hex_quote_on_stdin_with_wrong_report_data_is_refused(cluster_file: Path) -> None:
    code, hex_quote, _ = kmctl("-c", str(cluster_file), "attest", "quote", "km3")
    assert code == 0
    code, out, err = kmctl(
        "-c", str(cluster_file), "attest", "verify", "-", "--report-data", "ff",
        input=hex_quote.encode(),
    )  # fmt: skip
    assert code == 1
    assert "FAILED" in out and "ReportDataMismatch" in err


def test_stale_quote_is_refused_with_the_reason(cluster_file: Path) -> None:
    code, hex_quote, _ = kmctl("-c", str(cluster_file), "attest", "quote", "km1")
    code, out, _ = kmctl(
        "-c", str(cluster_file), "attest", "verify", "-", "--now", "4000000000", "--json",
        input=hex_quote.encode(),
    )  # fmt: skip
    assert code == 1
    assert json.loads(out)["error"]["type"] == "StaleQuote"


def test_revoked_platform_in_cluster_yaml_is_refused(cluster_file: Path) -> None:
    data = yaml.safe_load(cluster_file.read_text())
    data["policy"]["revoked_platforms"] = ["platform-2"]
    cluster_file.write_text(yaml.safe_dump(data))
    code, out, _ = kmctl("-c", str(cluster_file), "attest", "verify", "--node", "km2", "--json")
    assert code == 1 and json.loads(out)["error"]["type"] == "RevokedPlatform"


def test_unknown_node_and_bad_arguments_are_one_line_usage_errors(cluster_file: Path) -> None:
    code, _, err = kmctl("-c", str(cluster_file), "attest", "verify", "--node", "km9")
    assert code == 2 and err.startswith("kmctl: error: no node named 'km9'")
    code, _, err = kmctl("-c", str(cluster_file), "attest", "verify")
    assert code == 2 and "exactly one of" in err
    code, _, err = kmctl("-c", str(cluster_file), "attest", "quote", "km1", "--report-data", "zz")
    assert code == 2 and "hexadecimal" in err


def test_invalid_config_lists_each_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n- name: km1\n  peer_port: 0\n  api_port: 7201\n  platform: {id: p}\n")
    code, _, err = kmctl("-c", str(bad), "config", "check")
    assert code == 2
    assert "nodes[0].peer_port: Input should be greater than or equal to 1" in err


def test_measure_lists_both_roles_with_distinct_measurements() -> None:
    code, out, _ = kmctl("attest", "measure", "--json")
    assert code == 0
    rows = {r["role"]: r["measurement"] for r in json.loads(out)}
    assert set(rows) == {"km", "service"} and rows["km"] != rows["service"]


def test_installed_console_script_shows_help() -> None:
    assert shutil.which("kmctl"), "the kmctl console script is not installed: pip install -e ."
    result = subprocess.run(["kmctl", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "attest" in result.stdout and "Exit codes" in result.stdout
