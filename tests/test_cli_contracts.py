"""kmctl contracts, the parts that need no cluster: how arguments become bytes, how a contract
file becomes WebAssembly, and the clear errors for what cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.cli.contracts_cmds import encode_args, wasm_of
from kmnode.cli.output import CliError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "contracts"


def test_arguments_join_in_order() -> None:
    assert encode_args(("u64:5", "bob")) == (5).to_bytes(8, "little") + b"bob"
    assert encode_args(("hex:00ff", "str:u64:x", "plain")) == b"\x00\xffu64:xplain"
    assert encode_args(("u64:0x10",)) == (16).to_bytes(8, "little")
    assert encode_args(()) == b""


@pytest.mark.parametrize("bad", ["u64:-1", "u64:18446744073709551616", "u64:ten", "hex:xyz"])
def test_a_malformed_argument_is_named(bad: str) -> None:
    with pytest.raises(CliError, match="argument"):
        encode_args((bad,))


def test_a_wat_file_is_compiled_and_a_wasm_file_taken_as_is(tmp_path: Path) -> None:
    binary = wasm_of(EXAMPLES / "token.wat")
    assert binary.startswith(b"\0asm")
    copy = tmp_path / "token.wasm"
    copy.write_bytes(binary)
    assert wasm_of(copy) == binary


def test_a_file_that_is_no_contract_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wat"
    junk.write_text("(module (func $f (bogus)))")
    result = CliRunner().invoke(cli, ["contracts", "deploy", "token", str(junk)])
    assert result.exit_code == 2
    assert "neither WebAssembly nor valid .wat" in result.output
    missing = CliRunner().invoke(cli, ["contracts", "deploy", "token", str(tmp_path / "nope")])
    assert missing.exit_code == 2
