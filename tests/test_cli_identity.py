"""`kmctl identity` and the development profile, as a new operator meets them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode import supervisor
from kmnode.cli import cli
from kmnode.client import ClusterClient, default_signer
from kmnode.config import ClusterConfig, parse_config
from kmnode.errors import KmsimError
from kmnode.identity import DEV_IDENTITY, IdentityKeys, dev_key_path


@pytest.fixture
def key_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KMSIM_IDENTITY_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv("KMSIM_IDENTITY", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "keys"


def test_keygen_writes_a_private_key_file_and_prints_a_config_entry(key_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["identity", "keygen", "alice", "--role", "admin"])
    assert result.exit_code == 0, result.output
    path = key_dir / "alice.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = yaml.safe_load("\n".join(line for line in result.output.splitlines()))
    keys = IdentityKeys.load(path)
    assert entry == [keys.public(["admin"]).model_dump(mode="json")]
    # The entry is what cluster.yaml takes.
    cfg = parse_config({"identities": entry})
    assert cfg.identities[0].name == "alice"
    assert keys.signing_seed.hex() not in result.output


def test_keygen_never_overwrites_and_refuses_a_bad_name(key_dir: Path) -> None:
    assert CliRunner().invoke(cli, ["identity", "keygen", "bob"]).exit_code == 0
    before = (key_dir / "bob.key").read_bytes()
    again = CliRunner().invoke(cli, ["identity", "keygen", "bob"])
    assert again.exit_code == 2 and "not overwriting" in again.output
    assert (key_dir / "bob.key").read_bytes() == before
    bad = CliRunner().invoke(cli, ["identity", "keygen", "Bob!"])
    assert bad.exit_code == 2 and "not an identity name" in bad.output


def test_as_an_identity_without_a_key_file_says_where_it_looked(key_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["--as", "nobody", "identity", "show"])
    assert result.exit_code == 2
    assert "no key file for identity 'nobody'" in result.output and "keygen" in result.output


def test_config_refuses_duplicate_identities_and_a_cluster_nobody_governs() -> None:
    keys = IdentityKeys.generate("ann").public(["operator"]).model_dump(mode="json")
    with pytest.raises(Exception, match="nobody could govern"):
        parse_config({"identities": [keys]})
    admin = {**keys, "roles": ["admin"]}
    with pytest.raises(Exception, match="is also identities"):
        parse_config({"identities": [admin, admin]})
    with pytest.raises(Exception, match="roles"):
        parse_config({"identities": [{**admin, "roles": ["root"]}]})


def test_the_development_profile_makes_one_admin_and_kmctl_signs_with_it(tmp_path: Path) -> None:
    cfg = ClusterConfig.default().model_copy(update={"state_dir": tmp_path / "state"})
    assert default_signer(cfg) is None  # before `kmctl up`: nobody to sign as
    first = supervisor.with_identities(cfg)
    second = supervisor.with_identities(cfg)
    assert first.identities == second.identities  # made once, the same key on every `up`
    (dev,) = first.identities
    assert dev.name == DEV_IDENTITY and set(dev.roles) == {
        "admin",
        "operator",
        "auditor",
        "user",
        "owner",
        "recovery",  # the development profile's one recovery share (threshold 1)
    }
    path = dev_key_path(cfg.state_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer = default_signer(first)
    assert signer is not None and signer.public(dev.roles) == dev
    assert ClusterClient(first).signer == signer


def test_listed_identities_are_used_as_they_are(tmp_path: Path) -> None:
    listed = IdentityKeys.generate("ann").public(["admin"])
    cfg = ClusterConfig.default().model_copy(
        update={"state_dir": tmp_path / "state", "identities": [listed]}
    )
    assert supervisor.with_identities(cfg) is cfg
    assert not dev_key_path(cfg.state_dir).exists()
    assert default_signer(cfg) is None


def test_kmsim_identity_names_the_signer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = IdentityKeys.generate("carol")
    keys.save(tmp_path / "carol.key")
    monkeypatch.setenv("KMSIM_IDENTITY", str(tmp_path / "carol.key"))
    cfg = ClusterConfig.default().model_copy(update={"state_dir": tmp_path / "state"})
    assert default_signer(cfg) == keys
    monkeypatch.setenv("KMSIM_IDENTITY", str(tmp_path / "missing.key"))
    with pytest.raises(KmsimError, match="no key file"):
        default_signer(cfg)
