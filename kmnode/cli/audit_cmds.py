"""`kmctl audit export`: the audit trail of a running cluster, as JSON lines.

The records come from the replicated state (``kmnode.km.audit``): every release, requested and
then provisioned or refused, and every proposal, made and then closed, each with the ledger
index where it happened. They are the same on every node that has applied as far; the MQTT
audit stream (`kmctl events`) carries the same facts live, this reads them back afterwards.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

import click

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.output import EXIT_REFUSED, EXIT_USAGE, CliError, KmctlGroup

#: Records asked for per request, and the most requests one export makes.
PAGE = 1000
MAX_PAGES = 100_000


@click.group(cls=KmctlGroup)
def audit() -> None:
    """The cluster's audit trail (releases and proposals, in ledger order)."""


@audit.command("export")
@click.option("--since", type=click.IntRange(min=0), default=0, show_default=True,
              help="Only records at ledger indexes above this one.")  # fmt: skip
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file (mode 0600, not overwritten). Default: standard output.",
)
@_api_node
@pass_context
def export(ctx: CliContext, since: int, output: Path | None, api_node: str | None) -> None:
    """Export the audit trail as JSON lines, oldest first: one object per record with its
    ledger `index` and `kind` (release.requested, release.provisioned, release.refused,
    proposal.created, proposal.accepted, ...).

    \b
    Example: kmctl audit export --since 1200 -o audit.jsonl
    """
    client = ctx.client(api_node)
    if output is not None and output.exists():
        raise CliError(f"{output} exists: not overwriting it", EXIT_USAGE)
    out: IO[str]
    if output is None:
        out = sys.stdout
    else:
        out = os.fdopen(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w")
    written = 0
    try:
        cursor: int | None = since
        for _ in range(MAX_PAGES):
            if cursor is None:
                break
            answer = client.get("/v1/audit", {"since": str(cursor), "limit": str(PAGE)})
            for record in answer.get("records") or []:
                out.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
                written += 1
            following = answer.get("next")
            if following is not None and (not isinstance(following, int) or following <= cursor):
                raise CliError(f"the node's paging went backwards at {cursor}", EXIT_REFUSED)
            cursor = following
    finally:
        if output is not None:
            out.close()
    if output is not None:
        click.echo(f"wrote {written} audit records to {output}", err=True)
