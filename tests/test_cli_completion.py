"""`kmctl completion bash|zsh|fish` prints a script for each shell, and node names complete
from the cluster file the command line names (issue 18, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.config import ClusterConfig

REPO = Path(__file__).resolve().parent.parent


SCRIPTS = [
    ("bash", "complete -o"),
    ("zsh", "#compdef kmctl"),
    ("fish", "complete --no-files --command kmctl"),
]


@pytest.mark.parametrize(("shell", "marker"), SCRIPTS)
def test_each_shell_gets_its_script(shell: str, marker: str) -> None:
    result = CliRunner().invoke(cli, ["completion", shell])
    assert result.exit_code == 0 and marker in result.stdout, result.stdout
    assert "_KMCTL_COMPLETE" in result.stdout


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["completion", "tcsh"])
    assert result.exit_code == 2 and "tcsh" in result.stderr


def complete(words: str, config: Path) -> list[str]:
    """What bash would offer for the last word of ``words``, through click's protocol."""
    env = {
        **os.environ,
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        "_KMCTL_COMPLETE": "bash_complete",
        "KMSIM_CONFIG": str(config),
    }
    out = subprocess.run(
        [sys.executable, "-c", "from kmnode.cli import main; main()"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return [line.split(",", 1)[1] for line in out.splitlines() if "," in line]


def test_node_names_complete_from_the_cluster_file(tmp_path: Path) -> None:
    data = ClusterConfig.default().model_dump(mode="json")
    for node, name in zip(data["nodes"], ("alpha", "beta", "alder"), strict=True):
        node["name"] = name
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    assert complete("kmctl keys release db --to al", path) == ["alpha", "alder"]
    assert complete("kmctl keys list --node b", path) == ["beta"]
    assert complete("kmctl chaos kill ", path) == ["alpha", "beta", "alder"]
    assert complete("kmctl members transfer-leader be", path) == ["beta"]
