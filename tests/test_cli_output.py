"""`-o table|plain|json` (issue 18, item 3): plain is tab-separated with no box characters and
no wrapping, and is what a pipe gets unless asked otherwise; json is --json everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.config import ClusterConfig

BOX = set("┏┃━│└┡╇")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(ClusterConfig.default().model_dump(mode="json")))
    return path


def run(config: Path, *args: str, output: str | None = None) -> str:
    env = {"KMSIM_OUTPUT": output} if output is not None else {"KMSIM_OUTPUT": ""}
    result = CliRunner().invoke(cli, ["-c", str(config), *args], env=env, terminal_width=60)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_pipe_gets_plain_rows_without_boxes_or_wrapping(config: Path) -> None:
    out = run(config, "config", "check")  # CliRunner's stdout is no terminal: auto -> plain
    lines = out.splitlines()
    assert lines[0].split("\t") == ["node", "host", "peer port", "api port", "platform", "TCB"]
    assert lines[1].split("\t") == ["km1", "127.0.0.1", "7101", "7201", "platform-1", "up_to_date"]
    assert len(lines) == 4 and not BOX & set(out)


def test_table_and_plain_can_be_asked_for(config: Path) -> None:
    assert BOX & set(run(config, "-o", "table", "config", "check"))
    assert not BOX & set(run(config, "-o", "plain", "config", "check"))
    assert BOX & set(run(config, "config", "check", output="table"))  # KMSIM_OUTPUT


def test_json_is_the_same_as_each_commands_json_flag(config: Path) -> None:
    asked = run(config, "-o", "json", "config", "check")
    flag = run(config, "config", "check", "--json")
    assert json.loads(asked) == json.loads(flag)
    assert json.loads(asked)["cluster"] == "demo"


def test_an_unknown_output_mode_is_a_usage_error(config: Path) -> None:
    result = CliRunner().invoke(cli, ["-o", "yaml", "config", "check"])
    assert result.exit_code == 2 and "yaml" in result.stderr
