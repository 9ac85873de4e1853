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
        help="Node whose API to use. Default: the first reachable node.",
    )(f)


def as_json(f: F) -> F:
    """``--json``: machine-readable output."""
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def as_identity(f: F) -> F:
    """``--as NAME|FILE`` after the command: the identity that signs (as ``kmctl --as``)."""
    return click.option(
        "--as",
        "as_identity",
        metavar="NAME|FILE",
        help="The identity to act as. Default: the global --as, else the development key.",
    )(f)
