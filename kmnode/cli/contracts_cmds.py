"""`kmctl contracts`: deploy confidential contracts, call them, and watch every node run them.

A call's arguments are sealed on this machine to the cluster's contract-input key (only
service enclaves open them), together with the caller's name and a fresh nonce; the result
comes back sealed to the caller's own key and is opened here. Nothing in between (hosts,
MQTT, logs) sees either in clear.

Arguments of `contracts call` are joined into one byte string: `u64:N` (8 bytes, little
endian), `hex:...`, `str:TEXT`, or plain text.
"""

from __future__ import annotations

import base64
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import click
import wasmtime

from kmnode import supervisor
from kmnode.chaos import contract_repair
from kmnode.cli.context import CliContext, pass_context
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
from kmnode.contracts import envelope
from kmnode.errors import KmsimError

#: How long a resync waits for the node to execute again.
RESYNC_WAIT_S = 10.0
#: The most fuel a call may ask for (``kmnode.contracts.vm.MAX_FUEL``).
MAX_FUEL = 100_000_000


@click.group(cls=KmctlGroup)
def contracts() -> None:
    """Confidential contracts: WebAssembly every node's service enclave executes in log order,
    over state the host stores encrypted."""


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def wasm_of(path: Path) -> bytes:
    """The WebAssembly binary of a .wasm or .wat file (a .wat is compiled here)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    if data.startswith(b"\0asm"):
        return data
    try:
        return bytes(wasmtime.wat2wasm(data.decode("utf-8")))
    except (wasmtime.WasmtimeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(
            f"{path} is neither WebAssembly nor valid .wat: {first}", EXIT_USAGE
        ) from None


def encode_args(args: tuple[str, ...]) -> bytes:
    """The call's argument bytes (see the module docstring)."""
    out = b""
    for arg in args:
        kind, _, value = arg.partition(":")
        try:
            if kind == "u64" and value:
                out += int(value, 0).to_bytes(8, "little")
            elif kind == "hex" and _:
                out += bytes.fromhex(value)
            elif kind == "str" and _:
                out += value.encode()
            else:
                out += arg.encode()
        except (ValueError, OverflowError):
            raise CliError(f"argument {arg!r}: not a {kind} value", EXIT_USAGE) from None
    return out


def open_result(box_secret: bytes, sealed_b64: str, reply_key: bytes | None) -> dict[str, Any]:
    """``envelope.open_result``, its failure a CLI error."""
    try:
        return envelope.open_result(box_secret, sealed_b64, reply_key)
    except envelope.EnvelopeError as exc:
        raise CliError(f"the result does not open with this identity's key: {exc}") from None


@contracts.command("deploy")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_api_node
@_as_json
@pass_context
def contracts_deploy(
    ctx: CliContext, name: str, file: Path, api_node: str | None, as_json: bool
) -> None:
    """Deploy FILE (.wasm, or .wat compiled here) as contract NAME (an operator's act).

    \b
    Example: kmctl contracts deploy token examples/contracts/token.wat
    """
    code = wasm_of(file)
    body = {"name": name, "code": base64.b64encode(code).decode()}
    answer = ctx.client(api_node).post("/v1/contracts", body)
    if as_json:
        print_json(answer)
        return
    click.echo(
        f"deployed contract {name} as operation {answer.get('seq')} "
        f"(code {str(answer.get('code_id'))[:16]}..., {answer.get('status')})"
    )


@contracts.command("list")
@_api_node
@_as_json
@pass_context
def contracts_list(ctx: CliContext, api_node: str | None, as_json: bool) -> None:
    """List the deployed contracts.

    \b
    Example: kmctl contracts list --json
    """
    answer = ctx.client(api_node).get("/v1/contracts")
    if as_json:
        print_json(answer)
        return
    rows = [
        (c["name"], c["code_id"][:16], c["deployed_seq"], c["calls"], c["deployed_by"] or "-")
        for c in answer.get("contracts", [])
    ]
    print_table(
        f"{len(rows)} contract(s)", ["contract", "code", "deployed at", "calls", "by"], rows
    )


@contracts.command("show")
@click.argument("name")
@_api_node
@_as_json
@pass_context
def contracts_show(ctx: CliContext, name: str, api_node: str | None, as_json: bool) -> None:
    """Show contract NAME and its committed state roots. Exits 2 if there is no such
    contract.

    \b
    Example: kmctl contracts show token
    """
    answer = ctx.client(api_node).get(f"/v1/contracts/{_quoted(name)}")
    if as_json:
        print_json(answer)
        return
    rows: list[tuple[str, Any]] = [(k, v) for k, v in answer.items() if k != "checkpoints"]
    rows += [(f"root after op {c['seq']}", c["root"]) for c in answer.get("checkpoints", [])]
    print_table(f"contract {name}", ["field", "value"], rows)


@contracts.command("call")
@click.argument("name")
@click.argument("function")
@click.argument("args", nargs=-1)
@_as
@click.option(
    "--fuel",
    type=click.IntRange(1, MAX_FUEL),
    default=10_000_000,
    show_default=True,
    help="Most fuel the call may use (it traps when it runs out, the same way on every node).",
)
@click.option(
    "--wait",
    type=click.FloatRange(0.1, 60.0),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the node's service enclave to execute the committed call.",
)
@_api_node
@_as_json
@pass_context
def contracts_call(
    ctx: CliContext,
    name: str,
    function: str,
    args: tuple[str, ...],
    as_identity: str | None,
    fuel: int,
    wait: float,
    api_node: str | None,
    as_json: bool,
) -> None:
    """Call FUNCTION of contract NAME with ARGS, as a user; print the result only you can open.

    ARGS: u64:N (8 bytes little endian), hex:..., str:TEXT or plain text, joined.
    Exits 1 if the call reverted, trapped or was refused.

    \b
    Example: kmctl contracts call token transfer u64:5 bob --as alice
    """
    client = ctx.client(api_node, as_identity)
    signer = client.signer
    if signer is None:
        raise CliError("no identity to call as: give --as NAME", EXIT_USAGE)
    input_key = bytes.fromhex(client.get("/v1/contract-input-key")["input_key"])
    nonce, reply_key = secrets.token_hex(16), secrets.token_bytes(envelope.REPLY_KEY_BYTES)
    body = {
        "function": function,
        "args": envelope.seal_call(input_key, signer.name, nonce, encode_args(args), reply_key),
        "nonce": nonce,
        "fuel": fuel,
        "timeout": wait,
    }
    answer = client.post(f"/v1/contracts/{_quoted(name)}/calls", body, timeout=wait + 5)
    if answer.get("status") == "pending":
        halted = answer.get("halted")
        why = f": contract execution stopped on this node: {halted}" if halted else ""
        raise KmsimError(
            f"call committed as operation {answer['seq']}, not executed within {wait:g}s{why}",
            EXIT_FAILURE,
        )
    opened = open_result(signer.box_secret, answer["sealed"], reply_key)
    if as_json:
        print_json({**opened, "digest": answer.get("digest")})
    else:
        _print_result(opened)
    if opened.get("status") != "ok":
        raise SystemExit(EXIT_REFUSED)


def _print_result(opened: dict[str, Any]) -> None:
    result = base64.b64decode(opened.get("result") or "")
    shown = result.hex() or "(none)"
    if len(result) == 8:
        shown += f" (u64 {int.from_bytes(result, 'little')})"
    elif result and result.isascii() and result.decode().isprintable():
        shown += f" ({result.decode()!r})"
    rows: list[tuple[str, Any]] = [
        ("operation", opened.get("seq")),
        ("status", opened.get("status")),
        ("result", shown),
        ("fuel used", opened.get("fuel_used", "-")),
    ]
    if opened.get("code"):
        rows.append(("revert code", opened["code"]))
    if opened.get("error"):
        rows.append(("error", opened["error"]))
    for i, event in enumerate(opened.get("events") or []):
        rows.append((f"event {i}", base64.b64decode(event).decode("utf-8", "replace")))
    print_table(f"{opened.get('contract')}.{opened.get('function')}", ["field", "value"], rows)


def _node_views(ctx: CliContext, nodes: tuple[str, ...]) -> list[tuple[str, Any]]:
    cfg = supervisor.effective_config(ctx.config())
    names = list(nodes) or [n.name for n in cfg.nodes]
    views = []
    for name in names:
        try:
            views.append((name, ctx.client(name).get("/v1/node/contracts")))
        except KmsimError as exc:
            views.append((name, {"error": str(exc)}))
    return views


@contracts.command("roots")
@click.option("--node", "nodes", multiple=True, metavar="NAME", help="Only these nodes.")
@_as_json
@pass_context
def contracts_roots(ctx: CliContext, nodes: tuple[str, ...], as_json: bool) -> None:
    """Each node's state roots at the checkpoints it computed, against the committed ones.

    Exits 1 if a node's roots differ from a committed checkpoint or a node stopped executing.

    \b
    Example: kmctl contracts roots
    """
    views = _node_views(ctx, nodes)
    if as_json:
        print_json({name: view for name, view in views})
    rows, bad = [], False
    for name, view in views:
        if "error" in view:
            rows.append((name, "-", "-", "unreachable", view["error"]))
            continue
        committed = {c["seq"]: c["roots"] for c in view.get("checkpoints", [])}
        service = view.get("service") or {}
        ours = {c["seq"]: c["roots"] for c in service.get("checkpoints", [])}
        for seq in sorted(committed):
            if seq not in ours:
                rows.append((name, seq, "-", "not computed here", ""))
                continue
            same = ours[seq] == committed[seq]
            bad |= not same
            for contract, root in sorted(ours[seq].items()):
                rows.append((name, seq, contract, root[:16], "match" if same else "DIFFERS"))
        if view.get("halted"):
            bad = True
            rows.append((name, view.get("position"), "-", "halted", view["halted"]))
    if not as_json and not rows:
        positions = ", ".join(f"{n} at {v.get('position', '?')}" for n, v in views)
        click.echo(
            "no checkpoint committed yet (the leader commits one every contracts.checkpoint_every "
            f"operations); executed: {positions}"
        )
    elif not as_json:
        print_table("contract state roots", ["node", "after op", "contract", "root", ""], rows)
    if bad:
        raise SystemExit(EXIT_REFUSED)


@contracts.command("cache")
@click.option("--node", "nodes", multiple=True, metavar="NAME", help="Only these nodes.")
@_as_json
@pass_context
def contracts_cache(ctx: CliContext, nodes: tuple[str, ...], as_json: bool) -> None:
    """Each node's execution and its service enclave's internal cache: position, hits,
    misses, evictions, bytes, modelled enclave page swaps.

    \b
    Example: kmctl contracts cache --node km1 --node km2
    """
    views = _node_views(ctx, nodes)
    if as_json:
        print_json({name: view for name, view in views})
        return
    rows = []
    for name, view in views:
        cache = (view.get("service") or {}).get("cache") or {}
        rows.append(
            (
                name,
                view.get("position", "-"),
                view.get("halted") or view.get("error", "-"),
                cache.get("entries", "-"),
                cache.get("bytes", "-"),
                cache.get("hits", "-"),
                cache.get("misses", "-"),
                cache.get("hit_ratio", "-"),
                cache.get("evictions", "-"),
                cache.get("modelled_swap_cycles", "-"),
            )
        )
    columns = ["node", "position", "halted", "entries", "bytes", "hits", "misses", "hit ratio"]
    print_table("contract execution", [*columns, "evictions", "swap cycles"], rows)


@contracts.command("resync")
@click.argument("node")
@click.option("--from", "source", metavar="NAME", help="The peer to copy from. Default: another.")
@_as_json
@pass_context
def contracts_resync(ctx: CliContext, node: str, source: str | None, as_json: bool) -> None:
    """Repair NODE's contract state from a peer's store: copy the peer's newest kept
    checkpoint into NODE's store, then have NODE's service enclave restore from it. The
    enclave takes it only if its roots equal a committed checkpoint; it then replays the
    operations since. Exits 1 if NODE still cannot execute afterwards.

    \b
    Example: kmctl contracts resync km2 --from km1
    """
    cfg = supervisor.effective_config(ctx.config())
    names = {n.name for n in cfg.nodes}
    for given in (node, source):
        if given is not None and given not in names:
            raise CliError(f"no node named {given!r}", EXIT_USAGE)
    done = contract_repair.resync(cfg, node, ctx.signer(cfg), RESYNC_WAIT_S, source)
    if as_json:
        print_json({"node": node, **done})
    else:
        state = f"halted: {done['halted']}" if done["halted"] else "executing"
        click.echo(
            f"{node}: copied checkpoint {done['seq']} from {done['copied_from']} "
            f"({done['records']} records); now at operation {done['position']}, {state}"
        )
    if done["halted"]:
        raise SystemExit(EXIT_REFUSED)
