"""`kmctl attest ...`: make and check quotes without a running cluster.

These commands play the simulated hardware of a configured node directly, so an operator can
see what a node's quote contains and why the policy in cluster.yaml accepts or refuses it,
before starting anything.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.quote import REPORT_DATA_SIZE, CheckLog, Quote, QuoteVerifier, VerifiedIdentity
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import (
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    KmctlGroup,
    print_json,
    print_table,
)
from kmnode.config import ClusterConfig
from kmnode.enclave_code import current_identity, current_measurements
from kmnode.simhw import HardwareStore

_ROLE = click.Choice([r.value for r in EnclaveRole])


def _report_data(hex_value: str | None) -> bytes:
    if hex_value is None:
        return bytes(REPORT_DATA_SIZE)
    try:
        value = bytes.fromhex(hex_value)
    except ValueError:
        raise CliError("--report-data must be hexadecimal") from None
    if len(value) > REPORT_DATA_SIZE:
        raise CliError(f"--report-data is {len(value)} bytes; at most {REPORT_DATA_SIZE}")
    return value.ljust(REPORT_DATA_SIZE, b"\0")


_REPORT_DATA_HELP = "Report data to bind, hex, zero-padded to 64 bytes. Default: all zeros."


def hardware_store(cfg: ClusterConfig) -> HardwareStore:
    """The simulated hardware (vendor root, platforms) of the cluster in ``cfg``."""
    return HardwareStore(cfg.state_dir / "hardware")


def _make_quote(cfg: ClusterConfig, node_name: str, role: EnclaveRole, report_data: bytes) -> bytes:
    try:
        node = cfg.node(node_name)
    except KeyError as exc:
        raise CliError(str(exc.args[0])) from None
    platform = hardware_store(cfg).platform(node.platform.id, node.platform.tcb)
    return platform.enclave(current_identity(role)).quote(report_data, time.time())


@click.group(cls=KmctlGroup)
def attest() -> None:
    """Enclave measurements, quotes and their verification against the cluster policy."""


@attest.command("measure")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def measure(as_json: bool) -> None:
    """Show this installation's enclave identities (what '@current' means in a policy).

    \b
    Example: kmctl attest measure --json
    """
    rows = []
    for role in EnclaveRole:
        ident = current_identity(role)
        rows.append(
            {
                "role": role.value,
                "measurement": ident.measurement.hex(),
                "signer": ident.signer.hex(),
                "product_id": ident.product_id,
                "svn": ident.svn,
            }
        )
    if as_json:
        print_json(rows)
        return
    print_table(
        "enclave identities of this build",
        ["role", "measurement", "product", "svn"],
        [(r["role"], r["measurement"], r["product_id"], r["svn"]) for r in rows],
    )


@attest.command("quote")
@click.argument("node")
@click.option("--role", type=_ROLE, default="km", show_default=True)
@click.option("--report-data", metavar="HEX", help=_REPORT_DATA_HELP)
@click.option(
    "-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="Write raw bytes here."
)
@pass_context
def quote(ctx: CliContext, node: str, role: str, report_data: str | None, out: Path | None) -> None:
    """Produce a quote from NODE's simulated platform (hex on stdout, or raw bytes to --out).

    \b
    Example: kmctl attest quote km2 -o km2.quote
    """
    cfg = ctx.config()
    encoded = _make_quote(cfg, node, EnclaveRole(role), _report_data(report_data))
    if out is None:
        click.echo(encoded.hex())
    else:
        out.write_bytes(encoded)
        click.echo(f"wrote {len(encoded)}-byte {role} quote of {node} to {out}", err=True)


def _read_quote(source: str) -> bytes:
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read quote {source}: {exc.strerror}") from None
    stripped = raw.strip()
    try:
        return bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return raw


def _identity_json(verified: VerifiedIdentity) -> dict[str, Any]:
    return {
        "role": verified.role.value,
        "platform_id": verified.platform_id,
        "tcb_status": verified.tcb_status.value,
        "measurement": verified.identity.measurement.hex(),
        "signer": verified.identity.signer.hex(),
        "product_id": verified.identity.product_id,
        "svn": verified.identity.svn,
        "timestamp_ms": verified.timestamp_ms,
    }


@attest.command("verify")
@click.argument("quote_file", required=False, metavar="[QUOTE|-]")
@click.option("--node", help="Verify a fresh quote from this node instead of a file.")
@click.option("--role", type=_ROLE, default="km", show_default=True, help="Role to check for.")
@click.option("--report-data", metavar="HEX", help=_REPORT_DATA_HELP)
@click.option("--now", type=float, help="Verify as of this Unix time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def verify(
    ctx: CliContext,
    quote_file: str | None,
    node: str | None,
    role: str,
    report_data: str | None,
    now: float | None,
    as_json: bool,
) -> None:
    """Verify a quote (file, hex or raw, or '-' for stdin) against the policy in cluster.yaml.

    Prints every check performed; exits 1 if the quote is refused, naming the failed check.

    \b
    Example: kmctl attest verify km2.quote --json
    Example: kmctl attest verify --node km3 --role service
    """
    if (quote_file is None) == (node is None):
        raise CliError("give exactly one of QUOTE or --node", EXIT_USAGE)
    cfg = ctx.config()
    expected = _report_data(report_data)
    enclave_role = EnclaveRole(role)
    encoded = (
        _make_quote(cfg, node, enclave_role, expected)
        if node is not None
        else _read_quote(quote_file or "-")
    )
    policy = cfg.policy.resolve(current_measurements())
    verifier = QuoteVerifier(hardware_store(cfg).vendor_public_key())
    log = CheckLog()
    error: AttestationError | None = None
    verified: VerifiedIdentity | None = None
    try:
        verified = verifier.verify(
            encoded,
            policy,
            expected,
            role=enclave_role,
            now=time.time() if now is None else now,
            log=log,
        )
    except AttestationError as exc:
        error = exc
    _report(log, verified, error, encoded, as_json)
    if error is not None:
        raise click.exceptions.Exit(EXIT_REFUSED)


def _report(
    log: CheckLog,
    verified: VerifiedIdentity | None,
    error: AttestationError | None,
    encoded: bytes,
    as_json: bool,
) -> None:
    checks = [{"check": name, "ok": True, "detail": detail} for name, detail in log.passed]
    if error is not None:
        checks.append({"check": type(error).__name__, "ok": False, "detail": str(error)})
    if as_json:
        print_json(
            {
                "verdict": "refused" if error else "accepted",
                "checks": checks,
                "identity": _identity_json(verified) if verified else None,
                "error": {"type": type(error).__name__, "message": str(error)} if error else None,
            }
        )
        return
    print_table(
        f"quote ({len(encoded)} bytes): {'REFUSED' if error else 'accepted'}",
        ["check", "result", "detail"],
        [(c["check"], "ok" if c["ok"] else "FAILED", c["detail"]) for c in checks],
    )
    if verified is not None:
        body = Quote.decode(encoded).body
        click.echo(
            f"platform {verified.platform_id} ({verified.tcb_status.value}), "
            f"{verified.role.value} measurement {body.identity.measurement.hex()}, "
            f"svn {body.identity.svn}"
        )
    if error is not None:
        click.echo(f"kmctl: refused: {type(error).__name__}: {error}", err=True)
