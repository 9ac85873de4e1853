"""What every kmctl command needs: the validated cluster config, loaded once per invocation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from kmnode.cli.output import EXIT_USAGE, CliError
from kmnode.config import ClusterConfig, ConfigError, find_config


@dataclass
class CliContext:
    config_path: Path | None

    def config(self) -> ClusterConfig:
        try:
            return find_config(self.config_path)
        except ConfigError as exc:
            lines = "\n  ".join(exc.problems)
            raise CliError(f"invalid configuration {exc.source}:\n  {lines}", EXIT_USAGE) from None


pass_context = click.make_pass_decorator(CliContext)
