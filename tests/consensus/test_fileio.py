"""The one implementation of crash-safe writes every part of the project uses: a replaced file
is whole (old or new), a new file never overwrites an existing one, both owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from consensus.fileio import atomic_write, write_new


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.yaml"
    target.write_bytes(b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.yaml"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_new_creates_owner_only_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "ann.key"
    write_new(key, b"secret")
    assert key.read_bytes() == b"secret" and stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_new(key, b"other")
    assert key.read_bytes() == b"secret"
