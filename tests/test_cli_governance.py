"""What kmctl says of a governed change: passed, open (and how the others vote), or failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.cli.governance_cmds import proposal_line
from kmnode.cli.output import CliError

BASE = {"proposal": "p7", "votes_against": [], "error": ""}


def test_a_passed_proposal_reads_as_the_change_done() -> None:
    answer = {**BASE, "state": "accepted", "votes_for": ["ann", "ben"], "needed": 2}
    assert proposal_line(answer, "allowed service ab") == (
        "allowed service ab (proposal p7 passed with 2 of 2 admin votes)"
    )


def test_an_open_proposal_says_how_the_others_vote() -> None:
    answer = {**BASE, "state": "open", "votes_for": ["ann"], "needed": 2}
    line = proposal_line(answer, "allowed service ab")
    assert line == (
        "proposal p7 is open: 1 of 2 admin votes; other admins vote with: kmctl proposals vote p7"
    )


def test_a_failed_proposal_is_a_refusal_with_its_reason() -> None:
    answer = {**BASE, "state": "failed", "votes_for": ["ann"], "needed": 1, "error": "no admin"}
    with pytest.raises(CliError, match="not applied: no admin") as caught:
        proposal_line(answer, "removed identity ann")
    assert caught.value.exit_code == 1


def test_proposals_create_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    actions = tmp_path / "actions.json"
    actions.write_text("{not json")
    result = CliRunner().invoke(cli, ["proposals", "create", str(actions)])
    assert result.exit_code == 2 and "not JSON" in result.output
    missing = CliRunner().invoke(cli, ["proposals", "create", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
