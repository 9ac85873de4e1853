"""`kmctl data`: register encrypted datasets, grant their use, and compute on them so that only
the data user sees the result (issue 15, S5).

What stays on this machine: a dataset is encrypted here under a fresh data key, which is
wrapped here to the cluster's data-wrap key; the blob goes to the nodes' hosts as ciphertext,
the ledger gets digests and the wrapped key. A computation's parameters are sealed here to the
cluster's input key; its result comes back sealed to the user's own key and is opened here,
after its hash is checked against the one the platform committed with the token.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.contracts_cmds import wasm_of
from kmnode.cli.options import api_node as _api_node
from kmnode.cli.options import as_identity as _as
from kmnode.cli.options import as_json as _as_json
from kmnode.cli.output import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.client import ClusterClient, NodeUnreachable, upload_blob
from kmnode.dataauth.blob import MAX_BLOB_BYTES, new_dek, seal_dataset
from kmnode.dataauth.client_side import (
    ResultHashMismatch,
    ResultUnopened,
    checked_params,
    compute_body,
    open_result,
    registration_body,
)
from kmnode.dataauth.ops import OpRefused
from kmnode.dataauth.table import TableError, parse_table
from kmnode.errors import KmsimError
from kmnode.identity import IdentityKeys

F = TypeVar("F", bound=Callable[..., Any])


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _signer(client: ClusterClient) -> IdentityKeys:
    if client.signer is None:
        raise CliError("no identity to act as: give --as NAME", EXIT_USAGE)
    return client.signer


def _ops(value: str) -> list[str]:
    """The operations named (the cluster checks they exist: built-in or registered)."""
    ops = [op.strip() for op in value.split(",") if op.strip()]
    bad = [op for op in ops if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", op)]
    if not ops or bad:
        raise CliError(f"--ops: {bad[0] if bad else '(none)'} is not an operation name", 2)
    return ops


def _show(answer: Any, as_json: bool, title: str) -> None:
    if as_json:
        print_json(answer)
        return
    rows = [(k, v) for k, v in answer.items() if not isinstance(v, list | dict)]
    print_table(title, ["field", "value"], rows)


@click.group(cls=KmctlGroup)
def data() -> None:
    """Data authorization: owners register encrypted datasets and grant operations on them;
    users compute, and only they can open the result."""


@data.command("ops")
@_api_node
@_as_json
@pass_context
def data_ops(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """List the operations a dataset may allow: the built-ins and those registered in
    WebAssembly (name, version, checksum: what a token binds).

    \b
    Example: kmctl data ops --json
    """
    answer = ctx.client(api_node).get("/v1/data/ops")
    if as_json:
        print_json(answer)
        return
    rows = [
        (
            o["name"],
            o["version"],
            o["kind"],
            "wasm" if o["wasm"] else "built-in",
            o["checksum"][:16],
        )
        for o in answer.get("ops", [])
    ]
    print_table("operations", ["op", "version", "kind", "code", "checksum"], rows)


@data.command("op-register")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--version",
    "version",
    type=click.IntRange(1, 1_000_000),
    default=1,
    show_default=True,
    help="The operation's version (part of its results).",
)
@_api_node
@_as_json
@pass_context
def data_op_register(
    ctx: CliContext, name: str, file: Path, version: int, api_node: str | None, as_json: bool
) -> None:
    """Register FILE (.wasm, or .wat compiled here) as data operation NAME (an operator's
    act): it reads one numeric column and returns one number (see examples/dataops/). Owners
    then allow it by name; every token for it binds its checksum.

    \b
    Example: kmctl data op-register variance examples/dataops/variance.wat
    """
    code = wasm_of(file)
    body = {"name": name, "version": version, "code": base64.b64encode(code).decode()}
    answer = ctx.client(api_node).post("/v1/data/ops", body)
    if as_json:
        print_json(answer)
        return
    click.echo(f"registered operation {name} v{version} (checksum {answer['checksum'][:16]}...)")


@data.command("register")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--privacy",
    type=click.Choice(["low", "high"]),
    default="high",
    show_default=True,
    help="high: never raw rows (no export), only aggregates.",
)
@click.option("--ops", "ops", required=True, help="Operations it allows, comma-separated.")
@click.option(
    "--min-group",
    type=click.IntRange(2, 1_000_000),
    default=5,
    show_default=True,
    help="Aggregates over fewer rows are refused; smaller histogram bins hidden.",
)
@_as
@_api_node
@_as_json
@pass_context
def data_register(
    ctx: CliContext,
    name: str,
    file: Path,
    privacy: str,
    ops: str,
    min_group: int,
    as_identity: str | None,
    api_node: str | None,
    as_json: bool,
) -> None:
    """Encrypt FILE (CSV with a header row) here and register it as dataset NAME (an owner's
    act): the blob goes to every node's host, the ledger gets its digests and its data key
    wrapped to the cluster.

    \b
    Example: kmctl data register salaries salaries.csv --as alice --privacy high --ops mean,count
    """
    allowed = _ops(ops)
    plaintext = file.read_bytes()
    try:
        parse_table(plaintext)
    except TableError as exc:
        raise CliError(f"{file} is not a dataset: {exc}", EXIT_USAGE) from None
    client = ctx.client(api_node, as_identity)
    _signer(client)
    keys = client.get("/v1/data/keys")
    dek = new_dek()
    sealed = seal_dataset(name, plaintext, dek)
    if len(sealed.ciphertext) > MAX_BLOB_BYTES:
        raise CliError(f"{file} is too large: a blob is at most {MAX_BLOB_BYTES} bytes", 2)
    cfg = supervisor.effective_config(ctx.config())
    stored = []
    for node in cfg.nodes:
        try:
            upload_blob(node, sealed.digest_ct, sealed.ciphertext)
            stored.append(node.name)
        except NodeUnreachable:
            click.echo(f"warning: {node.name} is unreachable; it has no copy of the blob", err=True)
    if not stored:
        raise KmsimError("no node took the blob", EXIT_FAILURE)
    body = registration_body(
        name, sealed, dek, keys["wrap_key"], privacy=privacy, ops=allowed, min_group_size=min_group
    )
    answer = client.post("/v1/datasets", body)
    if as_json:
        print_json({**answer, "digest_ct": sealed.digest_ct, "blob_on": stored})
        return
    click.echo(
        f"registered dataset {name} ({sealed.size} bytes, {privacy} privacy, ops "
        f"{', '.join(allowed)}); blob {sealed.digest_ct[:16]}... on {', '.join(stored)}"
    )


@data.command("list")
@_api_node
@_as_json
@pass_context
def data_list(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """List the registered datasets.

    \b
    Example: kmctl data list
    """
    answer = ctx.client(api_node).get("/v1/datasets")
    if as_json:
        print_json(answer)
        return
    rows = [
        (d["name"], d["owner"], d["privacy"], ",".join(d["ops"]), d["size"], d["digest_ct"][:16])
        for d in answer.get("datasets", [])
    ]
    headers = ["dataset", "owner", "privacy", "ops", "bytes", "blob"]
    print_table(f"{len(rows)} dataset(s)", headers, rows)


@data.command("show")
@click.argument("name")
@_api_node
@_as_json
@pass_context
def data_show(ctx: CliContext, name: str, api_node: str | None, as_json: bool) -> None:
    """Show dataset NAME and its grants. Exits 2 if there is no such dataset.

    \b
    Example: kmctl data show salaries
    """
    answer = ctx.client(api_node).get(f"/v1/datasets/{_q(name)}")
    if as_json:
        print_json(answer)
        return
    _show(answer, False, f"dataset {name}")
    _grants_table(answer.get("grants", []))


def _grants_table(grants: list[dict[str, Any]]) -> None:
    rows = [
        (g["id"], g["dataset"], g["user"], ",".join(g["ops"]), f"{g['uses_left']}/{g['uses']}",
         g["expires_at"], "revoked" if g["revoked_index"] else "active")
        for g in grants
    ]  # fmt: skip
    headers = ["grant", "dataset", "user", "ops", "uses left", "expires (unix)", "state"]
    print_table(f"{len(rows)} grant(s)", headers, rows)


def _TERMS(f: F) -> F:
    """``--ops``, ``--uses``, ``--ttl``: a grant's terms (direct, or requested)."""
    ttl = click.option(
        "--ttl",
        type=click.IntRange(1, 366 * 86400),
        default=3600,
        show_default=True,
        help="Seconds until the grant expires.",
    )
    uses = click.option(
        "--uses",
        type=click.IntRange(1, 1_000_000),
        default=1,
        show_default=True,
        help="How many computations.",
    )
    ops = click.option("--ops", "ops", required=True, help="Operations, comma-separated.")
    return ops(uses(ttl(f)))


@data.command("grant")
@click.argument("name")
@click.option("--to", "user", required=True, metavar="USER", help="The data user.")
@_TERMS
@_as
@_api_node
@_as_json
@pass_context
def data_grant(
    ctx: CliContext, name: str, user: str, ops: str, uses: int, ttl: int,
    as_identity: str | None, api_node: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Grant USER operations on dataset NAME (its owner's act).

    \b
    Example: kmctl data grant salaries --to bob --ops mean --uses 3 --ttl 600 --as alice
    """
    body = {"user": user, "ops": _ops(ops), "uses": uses, "ttl": ttl}
    answer = ctx.client(api_node, as_identity).post(f"/v1/datasets/{_q(name)}/grants", body)
    if as_json:
        print_json(answer)
        return
    click.echo(f"granted {answer['grant']}: {user} may {ops} on {name}, {uses} use(s), {ttl}s")


@data.command("request")
@click.argument("name")
@_TERMS
@_as
@_api_node
@_as_json
@pass_context
def data_request(
    ctx: CliContext, name: str, ops: str, uses: int, ttl: int, as_identity: str | None,
    api_node: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Ask the owner of dataset NAME for a grant (published on the owner's MQTT topic).

    \b
    Example: kmctl data request salaries --ops mean --as bob
    """
    body = {"ops": _ops(ops), "uses": uses, "ttl": ttl}
    answer = ctx.client(api_node, as_identity).post(f"/v1/datasets/{_q(name)}/requests", body)
    if as_json:
        print_json(answer)
        return
    click.echo(f"request {answer['request']} sent to {answer['owner']} (approve: kmctl data "
               f"approve {answer['request']} --as {answer['owner']})")  # fmt: skip


@data.command("requests")
@click.option("--state", type=click.Choice(["open", "approved", "denied"]), help="Only these.")
@_api_node
@_as_json
@pass_context
def data_requests(ctx: CliContext, state: str | None, api_node: str | None, as_json: bool) -> None:
    """List users' requests for grants.

    \b
    Example: kmctl data requests --state open
    """
    answer = ctx.client(api_node).get("/v1/data/requests", {"state": state} if state else None)
    if as_json:
        print_json(answer)
        return
    rows = [
        (r["id"], r["dataset"], r["user"], r["owner"], ",".join(r["ops"]), r["uses"], r["state"],
         r["grant"] or "-")
        for r in answer.get("requests", [])
    ]  # fmt: skip
    headers = ["request", "dataset", "user", "owner", "ops", "uses", "state", "grant"]
    print_table(f"{len(rows)} request(s)", headers, rows)


def _decide(verb: str) -> None:
    help_text = (
        f"{verb.capitalize()} a user's REQUEST (the dataset owner's act).\n\n"
        f"\b\nExample: kmctl data {verb} q42 --as alice"
    )

    @data.command(verb, help=help_text)
    @click.argument("request")
    @_as
    @_api_node
    @_as_json
    @pass_context
    def decide(
        ctx: CliContext, request: str, as_identity: str | None, api_node: str | None,
        as_json: bool,
    ) -> None:  # fmt: skip
        client = ctx.client(api_node, as_identity)
        answer = client.post(f"/v1/data/requests/{_q(request)}/{verb}", {})
        if as_json:
            print_json(answer)
        elif verb == "approve":
            click.echo(f"approved {request}: grant {answer['grant']}")
        else:
            click.echo(f"denied {request}")


_decide("approve")
_decide("deny")


@data.command("revoke")
@click.argument("grant")
@_as
@_api_node
@_as_json
@pass_context
def data_revoke(
    ctx: CliContext, grant: str, as_identity: str | None, api_node: str | None, as_json: bool
) -> None:
    """Revoke GRANT (its owner's act): no new token at once; an issued token is refused once
    its platform's service enclave has seen the revocation.

    \b
    Example: kmctl data revoke g17 --as alice
    """
    answer = ctx.client(api_node, as_identity).post(f"/v1/data/grants/{_q(grant)}/revoke", {})
    if as_json:
        print_json(answer)
        return
    click.echo(f"revoked {grant} ({answer['uses_left']} use(s) left unused)")


@data.command("compute")
@click.argument("name")
@click.option("--op", "operation", required=True, help="The operation (kmctl data ops).")
@click.option("--params", default="{}", show_default=True, help="Its parameters, JSON.")
@click.option(
    "--node",
    "platform",
    metavar="NAME",
    help="The platform node whose service enclave computes. Default: the leader.",
)
@click.option(
    "--wait",
    type=click.FloatRange(0.1, 60.0),
    default=15.0,
    show_default=True,
    help="Seconds to wait for the result.",
)
@_as
@_as_json
@pass_context
def data_compute(
    ctx: CliContext, name: str, operation: str, params: str, platform: str | None, wait: float,
    as_identity: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Compute OP on dataset NAME as a data user; print the result only you can open.
    Exits 1 if the computation was refused (the reason is printed).

    \b
    Example: kmctl data compute salaries --op mean --params '{"column": "salary"}' --as bob
    """
    try:
        checked = checked_params(operation, json.loads(params))
    except (ValueError, OpRefused) as exc:
        raise CliError(f"--params: {exc}", EXIT_USAGE) from None
    client = ctx.client(None, as_identity)
    signer = _signer(client)
    input_key = bytes.fromhex(client.get("/v1/data/keys")["input_key"])
    body = {**compute_body(input_key, signer.name, operation, checked), "timeout": wait}
    if platform:
        body["node"] = platform
    answer = client.post(f"/v1/datasets/{_q(name)}/computations", body, timeout=wait + 5)
    if answer.get("state") == "issued":
        raise KmsimError(
            f"token {answer['id']} issued for {answer['node']}, no result within {wait:g}s: "
            f"kmctl data result {answer['id']} --as {signer.name}",
            EXIT_FAILURE,
        )
    _finish(ctx, answer, signer, as_json)


@data.command("result")
@click.argument("token")
@_as
@_as_json
@pass_context
def data_result(ctx: CliContext, token: str, as_identity: str | None, as_json: bool) -> None:
    """Fetch TOKEN's sealed result from its platform node, check its hash against the one
    committed with the token, and open it with your key.

    \b
    Example: kmctl data result t1042 --as bob
    """
    client = ctx.client(None, as_identity)
    signer = _signer(client)
    record = client.get(f"/v1/data/tokens/{_q(token)}")
    _finish(ctx, record, signer, as_json)


def _finish(ctx: CliContext, token: dict[str, Any], signer: IdentityKeys, as_json: bool) -> None:
    """Print how ``token`` ended; for a consumed one, fetch (if needed), check and open the
    result."""
    if token.get("state") == "refused":
        if as_json:
            print_json(token)
        else:
            click.echo(f"refused ({token['id']}): {token.get('reason')}", err=True)
        raise SystemExit(EXIT_REFUSED)
    if token.get("state") != "consumed":
        raise KmsimError(f"token {token.get('id')} is {token.get('state')}", EXIT_FAILURE)
    sealed_b64 = token.get("sealed")
    if not sealed_b64:
        cfg = supervisor.effective_config(ctx.config())
        platform = ClusterClient(cfg, token["node"], signer=signer)
        sealed_b64 = platform.get(f"/v1/data/tokens/{_q(token['id'])}/result")["sealed"]
    try:
        result = open_result(str(sealed_b64), str(token.get("result_hash")), signer.box_secret)
    except ResultHashMismatch:
        raise KmsimError(
            f"the result of {token['id']} does not match the hash committed with the token",
            EXIT_FAILURE,
        ) from None
    except ResultUnopened:
        raise KmsimError(
            f"the result of {token['id']} does not open with {signer.name}'s key", EXIT_FAILURE
        ) from None
    if as_json:
        print_json({"token": token["id"], "result_hash": token["result_hash"], **result})
        return
    click.echo(json.dumps(result.get("value"), indent=None))


@data.command("tokens")
@click.option("--grant", help="Only this grant's.")
@click.option("--state", type=click.Choice(["issued", "consumed", "refused"]), help="Only these.")
@click.option("--user", help="Only this user's.")
@_api_node
@_as_json
@pass_context
def data_tokens(
    ctx: CliContext, grant: str | None, state: str | None, user: str | None,
    api_node: str | None, as_json: bool,
) -> None:  # fmt: skip
    """List tokens (committed authentication transactions) and how each ended.

    \b
    Example: kmctl data tokens --grant g17 --state consumed
    """
    query = {k: v for k, v in (("grant", grant), ("state", state), ("user", user)) if v}
    answer = ctx.client(api_node).get("/v1/data/tokens", query or None)
    if as_json:
        print_json(answer)
        return
    rows = [
        (t["id"], t["grant"], t["dataset"], t["user"], t["op"], t["node"], t["state"],
         (t["reason"] or t["result_hash"][:16]) or "-")
        for t in answer.get("tokens", [])
    ]  # fmt: skip
    headers = ["token", "grant", "dataset", "user", "op", "platform", "state", "result / reason"]
    print_table(f"{len(rows)} token(s)", headers, rows)


@data.command("status")
@click.option("--node", "nodes", multiple=True, metavar="NAME", help="Only these nodes.")
@_as_json
@pass_context
def data_status(ctx: CliContext, nodes: tuple[str, ...], as_json: bool) -> None:
    """Each node as a platform: its committed service measurement, the jobs it ran, tokens
    still pending, and how long its service enclave took to see revocations (lag).

    \b
    Example: kmctl data status --node km2
    """
    cfg = supervisor.effective_config(ctx.config())
    views: list[dict[str, Any]] = []
    for name in nodes or tuple(n.name for n in cfg.nodes):
        try:
            views.append(ctx.client(name).get("/v1/node/data"))
        except NodeUnreachable:
            views.append({"node": name, "error": "unreachable"})
    if as_json:
        print_json(views)
        return
    rows = []
    for v in views:
        if "error" in v:
            rows.append((v["node"], "-", "-", "-", "-", v["error"]))
            continue
        lag = v["revocation_lag"]
        jobs = f"{v['jobs'].get('consumed', 0)} consumed, {v['jobs'].get('refused', 0)} refused"
        seen = f"{lag['count']} seen, p50 {lag['p50_ms']} ms, max {lag['max_ms']} ms"
        service = (v["measurement"] or "-")[:16]
        rows.append((v["node"], service, jobs, v["tokens_pending"], seen, ""))
    headers = ["node", "service", "jobs", "pending", "revocations", "error"]
    print_table("data platforms", headers, rows)


__all__ = ["data"]
