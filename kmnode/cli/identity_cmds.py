"""`kmctl identity ...`: make an operator's keys and show the public part a cluster lists."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import click
import yaml

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import EXIT_USAGE, CliError, KmctlGroup, print_json
from kmnode.client import load_signer
from kmnode.identity import (
    ROLES,
    IdentityError,
    IdentityKeys,
    PublicIdentity,
    Role,
    default_key_dir,
)

_ROLE = click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLES),
    help="A role to list the identity with (repeat for several). Default: operator.",
)


@click.group(cls=KmctlGroup)
def identity() -> None:
    """Operator identities: an Ed25519 key that signs API requests and an X25519 key for what
    is sealed to the operator. cluster.yaml lists the genesis identities and their roles
    (admin, operator, auditor, user: calls contracts and computes on granted data, owner:
    registers datasets and grants their use)."""


def _roles(roles: tuple[str, ...]) -> list[Role]:
    """Click checked each against ``ROLES``."""
    return [cast(Role, r) for r in roles]


def _entry(public: PublicIdentity) -> str:
    """The cluster.yaml ``identities:`` entry of an identity."""
    return yaml.safe_dump([public.model_dump(mode="json")], sort_keys=False)


@identity.command("keygen")
@click.argument("name")
@_ROLE
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key file to write. Default: NAME.key in $KMSIM_IDENTITY_DIR (~/.kmsim/identities).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the public identity as JSON.")
def keygen(name: str, roles: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Make NAME's keys: write the key file (mode 0600; never overwritten) and print the
    public part, ready to paste under `identities:` in cluster.yaml.

    \b
    Example: kmctl identity keygen ann --role admin
    """
    path = out if out is not None else default_key_dir() / f"{name}.key"
    try:
        keys = IdentityKeys.generate(name)
        keys.save(path)
    except IdentityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    public = keys.public(_roles(roles) or ["operator"])
    if as_json:
        print_json({"key_file": str(path), **public.model_dump(mode="json")})
        return
    click.echo(f"# wrote {path} (mode 0600): keep it private; kmctl --as {name} signs with it")
    click.echo("# add to cluster.yaml under `identities:`")
    click.echo(_entry(public), nl=False)


@identity.command("show")
@click.argument("name_or_file", required=False)
@_ROLE
@click.option("--json", "as_json", is_flag=True, help="Print the public identity as JSON.")
@pass_context
def show(ctx: CliContext, name_or_file: str | None, roles: tuple[str, ...], as_json: bool) -> None:
    """Print the public part of an identity's key file (default: the one `--as` names, else
    the development profile's admin of this cluster).

    \b
    Example: kmctl identity show ann --json
    """
    cfg = ctx.config()
    chosen = name_or_file or ctx.identity
    keys = load_signer(cfg, chosen) if chosen else ctx.signer(cfg)
    if keys is None:
        raise CliError(
            "no identity to show: name one (kmctl identity show NAME), or run `kmctl up` for "
            "the development profile's admin",
            EXIT_USAGE,
        )
    listed = next((i for i in cfg.identities if i.name == keys.name), None)
    public = keys.public(_roles(roles) or (listed.roles if listed else ["operator"]))
    if as_json:
        print_json(public.model_dump(mode="json"))
        return
    click.echo(_entry(public), nl=False)
