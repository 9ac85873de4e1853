"""How kmctl talks to people and scripts: tables on a terminal, JSON with --json, one-line errors.

Exit codes mean something (see ``kmnode.errors``), so scripts can branch on them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from kmnode.errors import EXIT_FAILURE, EXIT_OK, EXIT_REFUSED, EXIT_USAGE, KmsimError


class CliError(KmsimError, click.ClickException):
    """An error of the CLI itself, reported in one line with a meaningful exit code (errors
    of the layers below are :class:`KmsimError` and are shown the same way)."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        KmsimError.__init__(self, message, exit_code)

    def show(self, file: Any = None) -> None:
        click.echo(f"kmctl: error: {self.format_message()}", err=True)


class KmctlGroup(click.Group):
    """Every kmctl command group: an error of the layers below the CLI (the API client, the
    supervisor, the chaos tools) is shown like the CLI's own, in one line with its exit code,
    however the group is invoked (as part of kmctl, or on its own in a test)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KmsimError as exc:
            if isinstance(exc, click.ClickException):
                raise
            raise CliError(exc.message, exc.exit_code) from exc


__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "CliError",
    "KmctlGroup",
    "KmsimError",
    "print_json",
    "print_table",
    "table_mode",
]


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


#: How tables are printed (``-o``/``KMSIM_OUTPUT``): ``table`` (boxes, for people),
#: ``plain`` (a header line, then tab-separated rows: no box characters, no wrapping), or
#: ``auto``: ``table`` on a terminal, ``plain`` into a pipe or a file. ``json`` is ``--json``.
OUTPUT_VARIABLE = "KMSIM_OUTPUT"
OUTPUT_MODES = ("auto", "table", "plain", "json")


def table_mode() -> str:
    """``table`` or ``plain``, as ``-o`` (or its variable) and stdout decide."""
    wanted = os.environ.get(OUTPUT_VARIABLE, "auto").strip().lower()
    if wanted in ("table", "plain"):
        return wanted
    return "table" if sys.stdout.isatty() else "plain"


def _plain(cell: Any) -> str:
    """A cell on one line: tabs and newlines would break the columns."""
    return " ".join(str(cell).split())


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if table_mode() == "plain":
        click.echo("\t".join(columns))
        for row in rows:
            click.echo("\t".join(_plain(cell) for cell in row))
        return
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)
