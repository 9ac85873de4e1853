"""Options several kmctl commands share, defined once so they read and behave the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def api_node(f: F) -> F:
    """``--node NAME``: whose API to use."""
    return click.option(
        "--node",
        "api_node",
        metavar="NAME",
        envvar="KMSIM_NODE",
        help="Node whose API to use. Default: the first reachable node.",
    )(f)


def as_json(f: F) -> F:
    """``--json``: machine-readable output."""
    return click.option(
        "--json", "as_json", is_flag=True, envvar="KMSIM_JSON", help="Machine-readable output."
    )(f)


def as_identity(f: F) -> F:
    """``--as NAME|FILE`` after the command: the identity that signs (as ``kmctl --as``)."""
    return click.option(
        "--as",
        "as_identity",
        metavar="NAME|FILE",
        envvar="KMSIM_IDENTITY",
        help="The identity to act as. Default: the global --as, else the development key.",
    )(f)


def _measurements(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> tuple[bytes, ...]:
    """``--trust-km`` values as bytes; a usage error names one that is not 64 hex digits."""
    found = []
    for value in values:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
            raise click.BadParameter(f"{value!r} is not 64 hex digits")
        found.append(bytes.fromhex(value))
    return tuple(found)


def trust_km_option(f: F) -> F:
    """``--trust-km HEX`` (repeatable): a KM build trusted to have signed a snapshot."""
    return click.option(
        "--trust-km",
        "trust_km",
        multiple=True,
        metavar="HEX",
        callback=_measurements,
        help="A KM measurement (64 hex digits) trusted to have signed a snapshot, besides "
        "cluster.yaml's policy.km_measurements (say, a build that an upgrade allowed by "
        "proposal). Repeatable.",
    )(f)
