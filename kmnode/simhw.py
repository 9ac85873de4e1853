"""The store of simulated fused secrets: vendor root and per-platform seeds.

Real TEE keys live in the CPU, out of reach of the host and of the node's files. The simulation
keeps their seeds in a store of their own (``<state_dir>/hardware``), never inside a node's data
directory, and only the code that plays the hardware (this module, and the enclave side that
loads a platform) reads it. Files are created with mode 0600 and written atomically, so a crash
never leaves half a seed that would silently give a machine a new identity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nacl.utils

from attest.certs import TcbStatus
from attest.hardware import SEED_SIZE, Platform, VendorRoot
from consensus.fileio import atomic_write

#: The vendor root's seed in the store, and the kind of its export document.
VENDOR_SEED = "vendor-root.seed"
VENDOR_EXPORT_KIND = "kmsim-vendor-root"


class HardwareStoreError(Exception):
    """The simulated hardware store is unreadable or damaged."""


class HardwareStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _seed(self, relative: str) -> bytes:
        path = self.root / relative
        try:
            seed = path.read_bytes()
        except FileNotFoundError:
            return self._create(path)
        except OSError as exc:
            raise HardwareStoreError(f"cannot read {path}: {exc.strerror}") from None
        if len(seed) != SEED_SIZE:
            raise HardwareStoreError(
                f"{path} holds {len(seed)} bytes, expected {SEED_SIZE}: the simulated hardware "
                "store is damaged (delete the cluster's state directory to start over)"
            )
        return seed

    def _create(self, path: Path) -> bytes:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        seed = nacl.utils.random(SEED_SIZE)
        temp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            os.unlink(temp)
            return self._seed(path.relative_to(self.root).as_posix())
        os.unlink(temp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return seed

    def vendor(self) -> VendorRoot:
        return VendorRoot(self._seed(VENDOR_SEED))

    def vendor_public_key(self) -> bytes:
        """The trust anchor every verifier needs; public, unlike everything else here."""
        return self.vendor().public_key

    def export_vendor(self) -> bytes:
        """The simulated vendor's root, to import on another machine so platforms there are
        certified by the same "vendor" (a document holding the root's signing seed: on real
        hardware the vendor certifies every CPU; here each machine plays the vendor for its
        own platforms, which must share one root). Platform seeds never leave."""
        seed = self._seed(VENDOR_SEED)
        return (
            json.dumps(
                {
                    "kind": VENDOR_EXPORT_KIND,
                    "seed": seed.hex(),
                    "public_key": VendorRoot(seed).public_key.hex(),
                },
                indent=1,
            )
            + "\n"
        ).encode()

    def import_vendor(self, document: bytes, *, replace: bool = False) -> str:
        """Take the vendor root exported on another machine; what was done, as a line.
        Refuses another root over an existing one unless ``replace`` (platforms certified by
        the old root would no longer be recognised by clusters that trust it)."""
        try:
            raw = json.loads(document)
            if raw.get("kind") != VENDOR_EXPORT_KIND:
                raise ValueError("not a kmsim vendor root export")
            seed = bytes.fromhex(raw["seed"])
            if len(seed) != SEED_SIZE or VendorRoot(seed).public_key.hex() != raw["public_key"]:
                raise ValueError("the seed does not match its public key")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HardwareStoreError(f"not a usable vendor root export: {exc}") from None
        path = self.root / VENDOR_SEED
        if path.exists():
            current = self._seed(VENDOR_SEED)
            if current == seed:
                return "this machine already trusts that vendor root"
            if not replace:
                raise HardwareStoreError(
                    f"{path} holds another vendor root: importing would change every local "
                    "platform's certificate (use --replace if nothing here depends on it)"
                )
            path.unlink()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, seed)
        return f"imported vendor root {raw['public_key'][:16]}…"

    def platform(self, platform_id: str, tcb_status: TcbStatus) -> Platform:
        return Platform(
            platform_id, tcb_status, self._seed(f"platforms/{platform_id}.seed"), self.vendor()
        )
