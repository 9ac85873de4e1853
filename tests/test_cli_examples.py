"""Every kmctl command shows an example in its --help, and the example is one kmctl accepts
(issue 18, item 6): a newcomer copies the example, so a renamed option, a wrong argument order
or a missing required option in it is a bug a user would hit at once.

How an example is checked without running anything: its words (shell syntax: quotes, and the
first `>`, `|`, `&&` or `;` ends the kmctl command) are parsed by click exactly as kmctl parses
them (the root's `-c` hoisting included), group by group down to the leaf, with
``make_context``; a usage error, a bad value or a missing required option fails the test. The
callbacks are never called. Files that click requires to exist (``click.Path(exists=True)``)
are created empty, under the names the example gives, in a fresh temporary directory that is
the working directory during the check; the examples therefore name relative paths only.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kmnode.cli import cli

#: Shell operators that end the kmctl part of an example (`kmctl completion bash > FILE`).
_SHELL_OPERATORS = frozenset({">", ">>", "<", "|", "||", "&&", ";", "&"})
_PREFIX = "Example: "


def _leaves(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command that is not a group, with its path below kmctl."""
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            yield from _leaves(command.commands[name], (*path, name))
    else:
        yield path, command


LEAVES = dict(_leaves(cli))


def _help(path: tuple[str, ...]) -> str:
    """``kmctl PATH --help`` as a user sees it on an 80-column terminal."""
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="kmctl", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _examples(help_text: str) -> list[str]:
    """The command lines of the help's ``Example:`` lines, as shown (one per line)."""
    lines = (line.strip() for line in help_text.splitlines())
    return [line.removeprefix(_PREFIX) for line in lines if line.startswith(_PREFIX)]


def _words(example: str) -> list[str]:
    """The example's kmctl command line as the shell would pass it, up to a shell operator."""
    lexer = shlex.shlex(example, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for word in lexer:
        if word in _SHELL_OPERATORS:
            break
        words.append(word)
    return words


def _create_required_files(
    command: click.Command, name: str, args: list[str], parent: click.Context
) -> None:
    """Create (empty) each file the example names for a parameter that must exist."""
    probe = click.Context(command, info_name=name, parent=parent)
    values, _, _ = command.make_parser(probe).parse_args(list(args))
    for param in command.params:
        if not (isinstance(param.type, click.Path) and param.type.exists):
            continue
        given = values.get(param.name)
        for value in given if isinstance(given, list | tuple) else [given]:
            if isinstance(value, str) and value != "-":
                path = Path(value)
                assert not path.is_absolute() and ".." not in path.parts, value
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()


def _parse(args: list[str]) -> click.Context:
    """Parse ``kmctl ARGS`` down to the leaf command's context, as kmctl would before running
    it; raises click's UsageError (BadParameter, MissingParameter, NoSuchOption...) if kmctl
    would refuse the line."""
    ctx = cli.make_context("kmctl", list(args))
    command: click.Command = cli
    while isinstance(command, click.Group):
        # What the group left unparsed: the subcommand's name, then its arguments.
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, sub_args = command.resolve_command(ctx, rest)
        assert name is not None and sub is not None
        if not isinstance(sub, click.Group):
            _create_required_files(sub, name, sub_args, ctx)
        ctx = sub.make_context(name, sub_args, parent=ctx)
        command = sub
    return ctx


def test_the_walk_reaches_every_level() -> None:
    """A guard for the two tests below: they cover the nested groups' leaves too."""
    assert len(LEAVES) > 80
    for path in [("up",), ("keys", "release"), ("recovery", "share", "show"), ("completion",)]:
        assert path in LEAVES


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_command_ends_its_help_with_an_example_of_itself(path: tuple[str, ...]) -> None:
    shown = _help(path)
    assert f"{_PREFIX}kmctl {' '.join(path)}" in shown
    examples = _examples(shown)
    assert 1 <= len(examples) <= 2, examples
    # The examples close the help text (the options' list follows them).
    body = shown.split("\nOptions:")[0].rstrip().splitlines()
    assert [line.strip().removeprefix(_PREFIX) for line in body[-len(examples) :]] == examples


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_every_example_is_a_command_line_kmctl_accepts(
    path: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for example in _examples(_help(path)):
        words = _words(example)
        assert words[0] == "kmctl", example
        ctx = _parse(words[1:])
        assert ctx.command_path == f"kmctl {' '.join(path)}", example


@pytest.mark.parametrize(
    "line",
    [
        "kmctl keys release payments --target km2",  # no such option
        "kmctl keys list -o json",  # a global option typed after the command (only -c moves)
        "kmctl prove payments --challenge 00ff",  # a required option left out
        "kmctl recovery threshold two",  # not a number
        "kmctl members transfer-leader",  # a missing argument
        "kmctl chaos heal km1 km2 km3",  # one argument too many
        "kmctl keys relase payments --to km2",  # no such command
    ],
)
def test_the_check_refuses_what_kmctl_refuses(line: str) -> None:
    """The parse above is the one kmctl runs: a broken example would fail the test."""
    with pytest.raises(click.UsageError):
        _parse(_words(line)[1:])


def test_files_an_example_names_are_checked_in_an_empty_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths click requires to exist are made for the check, and only those."""
    monkeypatch.chdir(tmp_path)
    _parse(["recovery", "submit", "--as", "carol", "--share-file", "shares/carol.share"])
    _parse(["snapshot", "save", "backup.snap"])  # written by the command: need not exist
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "shares",
        "shares/carol.share",
    ]
