"""The host's side of confidential contracts: the store the service enclave reaches, and its
host-only routes.

The store (``kmnode.host.contract_store``: SQLite in the node's data directory, an external
cache in front) answers the service enclave over a unix socket: an abstract address this
process binds (no file to clean up, nothing for another machine to reach), handed to the KM
enclave process, which passes it to every service enclave it starts. Each service instance
connects afresh, so a service that died mid-request leaves no half-read frame behind.

Routes, all host-only (the records are sealed; nothing here is secret, and nothing here is
trusted by the enclave, which verifies every record against its own versions or a committed
checkpoint):

    GET  /v1/node/contracts/store              -> {"checkpoints": [seq], "records", "cache"}
    GET  /v1/node/contracts/store/checkpoint[?seq=N] -> {"seq", "records": [[contract,
                                                   hidden hex, record base64]]} (that kept
                                                   copy, or the newest)
    PUT  /v1/node/contracts/store/checkpoint   same body: kept as that checkpoint (a resync)
    POST /v1/chaos/tamper-state {"mode", "contract"?, "seed"?} (a chaos route: authorized
                                                   like the others) -> {"tampered": what}
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import random
import socket
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from kmnode.host.contract_store import ContractStore

log = logging.getLogger(__name__)
#: Most records one resync body may carry.
MAX_RESYNC_RECORDS = 1_000_000
MAX_RESYNC_BYTES = 512 << 20
TAMPER_MODES = ("flip", "swap", "rollback", "drop")


class ContractHost:
    """The store and its listening socket (``address``: what the service enclave dials)."""

    def __init__(self, data_dir: Path, fsync: bool) -> None:
        self.store = ContractStore.in_data_dir(data_dir, fsync=fsync)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("")  # autobind: a fresh abstract address
        self._listener.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="contract-store", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The abstract socket address, hex (a command-line argument of the enclaves)."""
        name = self._listener.getsockname()
        return (name if isinstance(name, bytes) else name.encode()).hex()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.store.serve(conn)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.store.close()

    # --- routes ---------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/v1/node/contracts/store", self._summary)
        app.router.add_get("/v1/node/contracts/store/checkpoint", self._export)
        app.router.add_put("/v1/node/contracts/store/checkpoint", self._import)

    async def _summary(self, request: web.Request) -> web.Response:
        stats = self.store.stats()
        return web.json_response(
            {
                "checkpoints": self.store.checkpoints(),
                "records": sum(1 for _ in self.store.records()),
                "cache": {k: getattr(stats, k) for k in stats.__dataclass_fields__},
            }
        )

    async def _export(self, request: web.Request) -> web.Response:
        kept = self.store.checkpoints()
        asked = request.query.get("seq")
        if asked is not None and not (asked.isdigit() and int(asked) in kept):
            return _error(404, "not_found", f"this node's store keeps no checkpoint {asked}")
        if not kept:
            return _error(404, "not_found", "this node's store keeps no checkpoint yet")
        seq = int(asked) if asked is not None else max(kept)
        records = [
            [contract, hidden.hex(), base64.b64encode(record).decode()]
            for contract, hidden, record in self.store.export_checkpoint(seq)
        ]
        return web.json_response({"seq": seq, "records": records})

    async def _import(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await read_bounded(request, MAX_RESYNC_BYTES))
            seq, rows = body["seq"], body["records"]
            if type(seq) is not int or not 0 < seq < 2**63:
                raise ValueError("'seq' must be a positive integer")
            if not isinstance(rows, list) or len(rows) > MAX_RESYNC_RECORDS:
                raise ValueError(f"'records' must be a list of at most {MAX_RESYNC_RECORDS}")
            records = [
                (str(c), bytes.fromhex(h), base64.b64decode(r, validate=True)) for c, h, r in rows
            ]
            self.store.import_checkpoint(seq, records)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            return _error(400, "bad_request", f"not a checkpoint: {exc}")
        return web.json_response({"seq": seq, "records": len(records)})

    def tamper(self, body: dict[str, Any]) -> dict[str, Any]:
        """Chaos: change the stored state as a hostile host would (``ContractStore.tamper``);
        ``ValueError`` naming the field if the body is wrong or there is nothing to tamper."""
        mode, contract, seed = body.get("mode"), body.get("contract"), body.get("seed", 0)
        if mode not in TAMPER_MODES:
            raise ValueError(f"mode: one of {', '.join(TAMPER_MODES)}, not {mode!r}")
        if contract is not None and not isinstance(contract, str):
            raise ValueError("contract: a contract name")
        if type(seed) is not int:
            raise ValueError("seed: an integer")
        return {"tampered": self.store.tamper(mode, contract, random.Random(seed))}


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The body, up to ``limit`` bytes (a checkpoint is larger than an operator request, the
    app's own limit); ``ValueError`` past it."""
    chunks, size = [], 0
    while chunk := await request.content.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"a checkpoint body is at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


__all__ = ["TAMPER_MODES", "ContractHost", "read_bounded"]
