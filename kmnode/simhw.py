"""The store of simulated fused secrets: vendor root and per-platform seeds.

Real TEE keys live in the CPU, out of reach of the host and of the node's files. The simulation
keeps their seeds in a store of their own (``<state_dir>/hardware``), never inside a node's data
directory, and only the code that plays the hardware (this module, and the enclave side that
loads a platform) reads it. Files are created with mode 0600 and written atomically, so a crash
never leaves half a seed that would silently give a machine a new identity.
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.utils

from attest.certs import TcbStatus
from attest.hardware import SEED_SIZE, Platform, VendorRoot


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
        return VendorRoot(self._seed("vendor-root.seed"))

    def vendor_public_key(self) -> bytes:
        """The trust anchor every verifier needs; public, unlike everything else here."""
        return self.vendor().public_key

    def platform(self, platform_id: str, tcb_status: TcbStatus) -> Platform:
        return Platform(
            platform_id, tcb_status, self._seed(f"platforms/{platform_id}.seed"), self.vendor()
        )
