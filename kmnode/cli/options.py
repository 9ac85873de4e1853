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
