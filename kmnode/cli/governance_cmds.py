"""`kmctl proposals ...`: governance by voted proposals, and how a change an admin asks for
(`policy allow`, `members remove`, ...) reads when it is a proposal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)


def proposal_line(answer: dict[str, Any], what: str) -> str:
    """One line saying where a proposal to do ``what`` stands; raises if it failed."""
    proposal, state = answer.get("proposal"), answer.get("state")
    votes, needed = len(answer.get("votes_for") or []), answer.get("needed")
    if state == "accepted":
        return f"{what} (proposal {proposal} passed with {votes} of {needed} admin votes)"
    if state == "open":
        return (
            f"proposal {proposal} is open: {votes} of {needed} admin votes; other admins "
            f"vote with: kmctl proposals vote {proposal}"
        )
    if state == "failed":
        raise CliError(
            f"proposal {proposal} passed but was not applied: {answer.get('error')}", EXIT_REFUSED
        )
    return f"proposal {proposal} is {state}"


def governed(
    ctx: CliContext,
    api_node: str | None,
    path: str,
    body: dict[str, Any],
    what: str,
    as_json: bool,
) -> None:
    """Ask for a change that is governed: the API makes it a proposal with our vote."""
    answer = ctx.client(api_node).post(path, body)
    if as_json:
        print_json(answer)
        return
    click.echo(proposal_line(answer, what))


@click.group(cls=KmctlGroup)
def proposals() -> None:
    """Governance: changes to the policy, members, identities, the constitution and chaos are
    proposals that pass when enough admins voted for them (default: a majority)."""


@proposals.command("list")
@_api_node
@_as_json
@pass_context
def proposals_list(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """List proposals with their state and votes.

    \b
    Example: kmctl proposals list
    """
    answer = ctx.client(api_node).get("/v1/proposals")
    if as_json:
        print_json(answer)
        return
    rows = [
        (
            p.get("id"),
            p.get("state"),
            p.get("proposer"),
            ", ".join(a.get("op", "?") for a in p.get("actions", [])),
            ", ".join(n for n, b in (p.get("ballots") or {}).items() if b == "for"),
            p.get("needed"),
        )
        for p in answer.get("proposals", [])
    ]
    print_table(f"{len(rows)} proposal(s)", ["id", "state", "by", "actions", "for", "needed"], rows)


@proposals.command("show")
@click.argument("proposal")
@_api_node
@pass_context
def proposals_show(ctx: CliContext, proposal: str, api_node: str | None) -> None:
    """Show PROPOSAL: its actions, ballots and state (JSON).

    \b
    Example: kmctl proposals show p12
    """
    print_json(ctx.client(api_node).get(f"/v1/proposals/{proposal}"))


@proposals.command("vote")
@click.argument("proposal")
@click.option("--against", is_flag=True, help="Vote against it (default: for).")
@_api_node
@_as_json
@pass_context
def proposals_vote(
    ctx: CliContext, proposal: str, against: bool, api_node: str | None, as_json: bool
) -> None:
    """Vote for PROPOSAL (or --against) as the signing admin.

    \b
    Example: kmctl proposals vote p12
    Example: kmctl --as ben proposals vote p12 --against
    """
    body = {"ballot": "against" if against else "for"}
    done = "voted against it" if against else "voted for it: its actions are applied"
    governed(ctx, api_node, f"/v1/proposals/{proposal}/vote", body, done, as_json)


@proposals.command("withdraw")
@click.argument("proposal")
@_api_node
@_as_json
@pass_context
def proposals_withdraw(ctx: CliContext, proposal: str, api_node: str | None, as_json: bool) -> None:
    """Withdraw PROPOSAL (only its proposer may, while it is open).

    \b
    Example: kmctl proposals withdraw p12
    """
    governed(ctx, api_node, f"/v1/proposals/{proposal}/withdraw", {}, "withdrew it", as_json)


@proposals.command("create")
@click.argument("actions_file", type=click.Path(path_type=Path, allow_dash=True))
@_api_node
@_as_json
@pass_context
def proposals_create(
    ctx: CliContext, actions_file: Path, api_node: str | None, as_json: bool
) -> None:
    """Propose the actions in ACTIONS_FILE (JSON: a list of actions; - reads stdin), e.g.
    [{"op": "identity.set", "identity": {...}}], {"op": "identity.remove", "name": "bob"},
    {"op": "constitution.set", "threshold": 2}, {"op": "chaos.set", "enabled": true}, and the
    policy and member changes of `kmctl policy` and `kmctl members remove`.

    \b
    Example: kmctl proposals create actions.json
    """
    text = sys.stdin.read() if str(actions_file) == "-" else _read(actions_file)
    try:
        actions = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{actions_file}: not JSON ({exc})", EXIT_USAGE) from None
    if isinstance(actions, dict):
        actions = [actions]
    governed(ctx, api_node, "/v1/proposals", {"actions": actions}, "applied", as_json)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
