"""`kmctl recovery ...`: the holders' side of disaster recovery (issue 16).

The ledger keeps a k-of-n split of the master secret, each share boxed to a recovery holder's
X25519 key. A holder opens its own share locally (`share show`); when every node has lost its
sealed state and runs in recovery mode (`kmctl up --recover`), each holder submits it
(`submit`): kmctl verifies every recovering node's quoted recovery key, boxes the share to each,
and the leader's enclave checks it against its commitment before it is committed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from attest.quote import QuoteVerifier
from kmnode.cli.attest_cmds import hardware_store
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
from kmnode.client import ClusterClient, NodeClient, NodeUnreachable
from kmnode.config import ClusterConfig
from kmnode.enclave_code import current_measurements
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys
from kmnode.recovery.boxing import RecoveryKey, RecoveryKeyRefused, box_share, verify_recovery_key
from kmnode.recovery.shares import (
    RecoveryError,
    RecoverySet,
    Share,
    check_share,
    open_share,
)
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


def _split(answer: Any) -> RecoverySet:
    raw = answer.get("recovery_set") if isinstance(answer, dict) else None
    if raw is None:
        problem = answer.get("problem") if isinstance(answer, dict) else None
        raise CliError(
            f"the ledger holds no recovery split{f': {problem}' if problem else ''}", EXIT_REFUSED
        )
    try:
        return RecoverySet.from_json(json.dumps(raw))
    except RecoveryError as exc:
        raise CliError(f"the node sent an unusable recovery split: {exc}", EXIT_REFUSED) from None


@recovery.command("status")
@_api_node
@_as_json
@pass_context
def recovery_status(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """The ledger's split (generation, threshold, holders), the shares submitted in a
    recovery, and each node's mode.

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

    Example: kmctl recovery share show --as carol
    """
    client = ctx.client(api_node, as_identity)
    signer = _signer(client)
    split = _split(client.get("/v1/recovery"))
    try:
        share = open_share(split, signer.name, signer.box_secret)
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


def _recovery_keys(
    cfg: ClusterConfig, members: list[dict[str, Any]], signer: IdentityKeys
) -> tuple[dict[str, RecoveryKey], list[str]]:
    """Every reachable member's recovery key, its quote verified against cluster.yaml's policy
    and the member's platform; and a line for each member left out."""
    verifier = QuoteVerifier(hardware_store(cfg).vendor_public_key())
    policy = cfg.policy.resolve(current_measurements())
    keys: dict[str, RecoveryKey] = {}
    left_out: list[str] = []
    for member in members:
        name, host, port = member.get("name"), member.get("host"), member.get("api_port")
        if not isinstance(name, str) or not isinstance(host, str) or not isinstance(port, int):
            continue
        node = NodeClient(name, f"http://{host}:{port}", KEY_TIMEOUT_S, signer)
        try:
            answer = node.get("/v1/recovery/key")
            keys[name] = verify_recovery_key(
                name, str(member.get("platform_id")), answer, verifier, policy, time.time()
            )
        except NodeUnreachable:
            left_out.append(f"{name}: not reachable at {host}:{port}")
        except KmsimError as exc:
            left_out.append(f"{name}: {exc.message}")
        except RecoveryKeyRefused as exc:
            left_out.append(str(exc))
    return keys, left_out


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

    Example: kmctl recovery submit --as carol
    """
    client = ctx.client(api_node, as_identity)
    signer = _signer(client)
    answer = client.get("/v1/recovery")
    split = _split(answer)
    try:
        if share_file is not None:
            entry = split.entry(signer.name)
            share = Share.from_b64(signer.name, entry.index, share_file.read_text().strip())
            check_share(split, signer.name, share)
        else:
            share = open_share(split, signer.name, signer.box_secret)
    except RecoveryError as exc:
        raise CliError(f"{exc}; nothing was sent", EXIT_REFUSED) from None
    cfg = effective_config(ctx.config())
    keys, left_out = _recovery_keys(cfg, list(answer.get("members") or []), signer)
    for line in left_out:
        click.echo(f"warning: no share for {line}", err=True)
    if not keys:
        raise CliError("no recovering node offered a verifiable recovery key", EXIT_REFUSED)
    accepted = client.post(
        "/v1/recovery/shares", {"generation": split.generation, "boxes": box_share(share, keys)}
    )
    if as_json:
        print_json({**accepted, "boxed_to": sorted(keys), "left_out": left_out})
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

    Example: kmctl recovery threshold 2
    """
    body = {"actions": [{"op": "recovery.threshold", "threshold": count}]}
    governed(ctx, api_node, "/v1/proposals", body, f"recovery threshold set to {count}", as_json)
