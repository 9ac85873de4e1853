"""The secrets the host must never hold, and everything the host side does hold, for the
chaos run's plaintext scan.

Knowing the secrets is possible only because the TEE is simulated: like the test suite, the
oracle loads a node's KM enclave on its simulated platform (the hardware store under
``state_dir``), unseals the node's sealed state and derives every key generation the cluster
reports. A real deployment has no such oracle; the run uses it to prove that no plaintext key
byte reached a data directory, a log or an MQTT message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from kmnode.config import ClusterConfig
from kmnode.datadir import SEALED_STATE
from kmnode.km.enclave import derive_key
from kmnode.km.loader import load_km_enclave


class OracleError(Exception):
    """No node's sealed state could be opened, so there is nothing to search for."""


def master_secret(cfg: ClusterConfig) -> bytes:
    """The cluster's master secret, unsealed from the first node whose sealed state opens."""
    problems = []
    for node in cfg.nodes:
        path = cfg.state_dir / "nodes" / node.name / SEALED_STATE
        if not path.is_file():
            problems.append(f"{node.name}: no {SEALED_STATE}")
            continue
        enclave = load_km_enclave(cfg, node.name)
        try:
            enclave.restore_sealed_state(path.read_bytes())
        except Exception as exc:  # any failure to unseal: try the next node
            problems.append(f"{node.name}: {type(exc).__name__}")
            continue
        secret = enclave._master_secret  # the oracle's privilege; see the module docstring
        if secret is not None:
            return secret
        problems.append(f"{node.name}: sealed state without a master secret")
    raise OracleError("cannot unseal any node's state: " + "; ".join(problems))


def secret_needles(cfg: ClusterConfig, generations: Mapping[str, int]) -> list[bytes]:
    """The master secret and every key generation ``1..n`` of each key (name -> n)."""
    master = master_secret(cfg)
    return [master] + [
        derive_key(master, key, g) for key, count in sorted(generations.items())
        for g in range(1, count + 1)
    ]  # fmt: skip


def host_files(roots: Iterable[Path]) -> list[tuple[str, bytes]]:
    """Every regular file under ``roots`` (data directories, replaced ones, logs, pid files,
    saved histories) as (path, contents)."""
    found: list[tuple[str, bytes]] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                try:
                    found.append((str(path), path.read_bytes()))
                except OSError:  # removed meanwhile (a temp file renamed into place)
                    continue
    return found
