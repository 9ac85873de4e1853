"""`kmctl recovery ...`: the holders' side of disaster recovery (issue 16).

The ledger keeps a k-of-n split of the master secret, each share boxed to a recovery holder's
X25519 key. A holder opens its own share locally (`share show`); when every node has lost its
sealed state and runs in recovery mode (`kmctl up --recover`), each holder submits it
(`submit`): kmctl verifies every recovering node's quoted recovery key, boxes the share to each,
and the leader's enclave checks it against its commitment before it is committed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.governance_cmds import governed
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.options import as_identity as _as
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.client import ClusterClient, NodeClient
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys
from kmnode.recovery.shares import (
    RecoveryError,
)
from kmnode.recovery_client import holder_share, split_of, submit_share
from kmnode.supervisor import effective_config

#: How long kmctl waits for each node's recovery key.
KEY_TIMEOUT_S = 10.0


@click.group(cls=KmctlGroup)
def recovery() -> None:
    """Disaster recovery: the k-of-n split of the master secret held by the recovery
    identities, and the ceremony that reopens a cluster whose nodes all lost their sealed
    state (start it with `kmctl up --recover`)."""


def _signer(client: ClusterClient) -> IdentityKeys:
    if client.signer is None:
        raise CliError("no identity to act as: give --as NAME (a recovery holder)", EXIT_USAGE)
    return client.signer


@recovery.command("status")
@_api_node
@_as_json
@pass_context
def recovery_status(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """The ledger's split (generation, threshold, holders), the shares submitted in a
    recovery, and each node's mode.

    \b
    Example: kmctl recovery status
    """
    client = ctx.client(api_node)
    answer = client.get("/v1/recovery")
    nodes = [_node_mode(ctx, n.name) for n in effective_config(ctx.config()).nodes]
    if as_json:
        print_json({**answer, "nodes": nodes})
        return
    if answer.get("generation") is None:
        click.echo(f"no recovery split on the ledger: {answer.get('problem') or 'none made yet'}")
    else:
        holders = ", ".join(answer.get("holders") or [])
        click.echo(
            f"split {answer['generation']}: {answer['threshold']} of "
            f"{len(answer.get('holders') or [])} shares rebuild the secret (holders: {holders})"
        )
    if answer.get("problem"):
        click.echo(f"warning: {answer['problem']}")
    submitted = answer.get("submitted") or []
    if submitted or any(n["recovering"] for n in nodes):
        click.echo(
            f"recovery: {len(submitted)} of {answer.get('threshold')} shares submitted"
            + (f" ({', '.join(submitted)})" if submitted else "")
        )
    print_table(
        "nodes",
        ["node", "mode", "recovering", "problem"],
        [(n["node"], n["mode"], n["recovering"], n["error"] or "") for n in nodes],
    )


def _node_mode(ctx: CliContext, name: str) -> dict[str, Any]:
    cfg = effective_config(ctx.config())
    try:
        status = NodeClient.for_node(cfg.node(name), 3.0).get("/v1/status")
    except KmsimError as exc:
        return {"node": name, "mode": "down", "recovering": None, "error": exc.message}
    return {
        "node": name,
        "mode": status.get("mode") or "?",
        "recovering": bool(status.get("recovering")),
        "error": None,
    }


@recovery.group("share")
def share_group() -> None:
    """A holder's own share."""


@share_group.command("show")
@_api_node
@_as
@_as_json
@pass_context
def share_show(
    ctx: CliContext, api_node: str | None, as_identity: str | None, as_json: bool
) -> None:
    """Open your share of the ledger's split with your key file, here, and check it against
    its commitment. Prints the share: keep it as secret as the key file.

    \b
    Example: kmctl recovery share show --as carol
    """
    client = ctx.client(api_node, as_identity)
    signer = _signer(client)
    split = split_of(client.get("/v1/recovery"))
    try:
        share = holder_share(split, signer)
    except RecoveryError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None
    view = {
        "holder": share.name,
        "generation": split.generation,
        "index": share.index,
        "threshold": split.threshold,
        "share": share.to_b64(),
        "commitment": "matches",
    }
    if as_json:
        print_json(view)
        return
    click.echo(
        f"{share.name}: share {share.index} of split {split.generation} "
        f"({split.threshold} of {len(split.shares)} rebuild the secret); it matches its "
        f"commitment\n{share.to_b64()}"
    )


@recovery.command("submit")
@_api_node
@_as
@click.option(
    "--share-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The share as `recovery share show` printed it. Default: open it with your key file.",
)
@_as_json
@pass_context
def submit(
    ctx: CliContext,
    api_node: str | None,
    as_identity: str | None,
    share_file: Path | None,
    as_json: bool,
) -> None:
    """Submit your share to a cluster in recovery mode.

    Verifies each recovering node's quoted recovery key, boxes your share to every one of
    them, and sends it to the leader, whose enclave checks it against its commitment at once:
    a bogus share is refused, naming you, and nothing is recorded. Once the threshold is
    reached every node rebuilds the master secret and the cluster opens.

    \b
    Example: kmctl recovery submit --as carol
    Example: kmctl recovery submit --as carol --share-file carol.share
    """
    client = ctx.client(api_node, as_identity)
    signer = _signer(client)
    given = share_file.read_text() if share_file is not None else None
    done = submit_share(client, given)
    for line in done.left_out:
        click.echo(f"warning: no share for {line}", err=True)
    accepted = done.answer
    if as_json:
        print_json({**accepted, "boxed_to": done.boxed_to, "left_out": done.left_out})
        return
    have, need = accepted.get("have"), accepted.get("need")
    if accepted.get("complete"):
        click.echo(f"share of {signer.name} accepted ({have} of {need}): the cluster reopens")
    else:
        click.echo(f"share of {signer.name} accepted ({have} of {need}): waiting for more shares")


@recovery.command("threshold")
@click.argument("count", type=click.IntRange(0, 64))
@_api_node
@_as_json
@pass_context
def threshold(ctx: CliContext, count: int, api_node: str | None, as_json: bool) -> None:
    """Propose how many shares rebuild the master secret (0: a majority of the holders).

    Passed, it makes the leader issue a fresh split to the holders.

    \b
    Example: kmctl recovery threshold 2
    """
    body = {"actions": [{"op": "recovery.threshold", "threshold": count}]}
    governed(ctx, api_node, "/v1/proposals", body, f"recovery threshold set to {count}", as_json)
