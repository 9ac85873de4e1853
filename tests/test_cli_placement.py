"""kmctl as operators type it (issue 18, item 1): `-c FILE` before or after the command, every
option's KMSIM_* variable in its help, a notice on stderr when the embedded defaults are used,
and a word about variables people mistype by analogy with etcdctl."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli, hoist_config
from kmnode.config import ClusterConfig


@pytest.mark.parametrize(
    ("typed", "parsed"),
    [
        (["node", "run", "km1", "-c", "f.yaml"], ["-c", "f.yaml", "node", "run", "km1"]),
        (["up", "--config=f.yaml", "-n", "2"], ["--config=f.yaml", "up", "-n", "2"]),
        (["-c", "a", "status", "--config", "b"], ["-c", "a", "--config", "b", "status"]),
        (["events", "--", "-c", "x"], ["events", "--", "-c", "x"]),  # after --: an argument
        (["status", "-c"], ["status", "-c"]),  # no value: left for click to refuse
    ],
)
def test_the_config_option_is_taken_wherever_it_is_typed(
    typed: list[str], parsed: list[str]
) -> None:
    assert hoist_config(typed) == parsed


def write(tmp_path: Path, cluster: str) -> Path:
    data = ClusterConfig.default().model_dump(mode="json")
    data["cluster"] = cluster
    path = tmp_path / f"{cluster}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_after_the_command_is_the_same_as_before_it(tmp_path: Path) -> None:
    path = write(tmp_path, "placed")
    before = CliRunner().invoke(cli, ["-c", str(path), "config", "check", "--json"])
    after = CliRunner().invoke(cli, ["config", "check", "--json", "-c", str(path)])
    assert before.exit_code == after.exit_code == 0, after.output
    assert before.stdout == after.stdout and '"cluster": "placed"' in after.stdout


def test_the_environment_names_the_config_and_a_mistyped_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "from-env")
    result = CliRunner().invoke(cli, ["config", "check", "--json"], env={"KMSIM_CONFIG": str(path)})
    assert result.exit_code == 0 and '"cluster": "from-env"' in result.stdout
    mistyped = CliRunner().invoke(
        cli, ["config", "check", "--json"], env={"KMCTL_CONFIG": "/nope.yaml"}
    )
    assert "KMCTL_CONFIG is not read: the variable is KMSIM_CONFIG" in mistyped.stderr
    assert "using the embedded defaults" in mistyped.stderr


def test_falling_back_to_the_embedded_defaults_is_said_once_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KMSIM_CONFIG", raising=False)
    result = CliRunner().invoke(cli, ["config", "check", "--json"])
    assert result.exit_code == 0
    assert result.stderr.count("using the embedded defaults") == 1
    assert "using the embedded defaults" not in result.stdout  # scripts read stdout
    (tmp_path / "cluster.yaml").write_text(
        yaml.safe_dump(ClusterConfig.default().model_dump(mode="json"))
    )
    quiet = CliRunner().invoke(cli, ["config", "check", "--json"])
    assert quiet.exit_code == 0 and "embedded defaults" not in quiet.stderr


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        (["keys", "create"], "KMSIM_NODE"),
        (["keys", "create"], "KMSIM_JSON"),
        (["data", "grant"], "KMSIM_IDENTITY"),
        (["up"], "KMSIM_UP_TIMEOUT"),
        (["chaos", "run"], "KMSIM_CHAOS_RUN_SEED"),
        ([], "KMSIM_CONFIG"),
    ],
)
def test_every_option_names_its_environment_variable(command: list[str], variable: str) -> None:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and variable in result.stdout, result.stdout


def test_an_option_can_be_set_from_its_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "json-from-env")
    result = CliRunner().invoke(cli, ["-c", str(path), "config", "check"], env={"KMSIM_JSON": "1"})
    assert result.exit_code == 0 and result.stdout.lstrip().startswith("{"), result.stdout
