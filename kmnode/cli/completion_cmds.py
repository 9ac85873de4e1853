"""`kmctl completion bash|zsh|fish`: the shell completion script, and node names completed
from the cluster file wherever a command takes a node (``--node``, ``--to``, a NODE argument).

Install, for bash: ``kmctl completion bash > ~/.local/share/bash-completion/completions/kmctl``
(zsh: a file named ``_kmctl`` on ``$fpath``; fish: ``~/.config/fish/completions/kmctl.fish``).
"""

from __future__ import annotations

from pathlib import Path

import click
from click.shell_completion import CompletionItem, get_completion_class

from kmnode.config import ConfigError, find_config

#: The variable click's completion protocol uses for kmctl.
COMPLETE_VARIABLE = "_KMCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


def complete_node(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The cluster file's node names starting with what was typed (the file the command line
    names with -c, else $KMSIM_CONFIG or ./cluster.yaml, else the defaults)."""
    root = ctx.find_root()
    given = root.params.get("config_path")
    try:
        config = find_config(Path(given) if given else None)
    except (ConfigError, OSError):
        return []
    return [CompletionItem(n.name) for n in config.nodes if n.name.startswith(incomplete)]


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL: commands, options and node names complete.

    \b
    Example: kmctl completion bash > ~/.local/share/bash-completion/completions/kmctl
    """
    from kmnode.cli import cli  # the whole command tree (this module is part of it)

    completer = get_completion_class(shell)
    assert completer is not None  # every name in SHELLS is one of click's
    click.echo(completer(cli, {}, "kmctl", COMPLETE_VARIABLE).source())
