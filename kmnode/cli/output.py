"""How kmctl talks to people and scripts: tables on a terminal, JSON with --json, one-line errors.

Exit codes mean something, so scripts can branch on them without parsing text:
0 success, 1 the cluster or a check refused (e.g. a quote failed verification),
2 bad usage or configuration, 3 an internal or environment failure.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_FAILURE = 3


class CliError(click.ClickException):
    """An error reported to the user in one line, with a meaningful exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        # Per error, not per class: Click reads ``exit_code`` from the instance, though from
        # 8.2 on it types the attribute as a ClassVar (which a plain assignment would violate).
        object.__setattr__(self, "exit_code", exit_code)

    def show(self, file: Any = None) -> None:
        click.echo(f"kmctl: error: {self.format_message()}", err=True)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console().print(table)
