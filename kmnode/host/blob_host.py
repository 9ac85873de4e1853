"""The host's dataset blobs on the node's API (issue 15): upload, list, and the chaos fault.

``PUT /v1/node/data/blobs/{digest}`` stores a ciphertext under its sha256 (``kmctl data
register`` uploads to every node); ``GET /v1/node/data/blobs`` lists what this node holds.
Like the contract store's routes these are the host's own and unsigned: the host is trusted
for nothing, a blob is ciphertext checked by digest in the enclave, and what the routes can
cost a node is bounded (one blob at most ``MAX_BLOB_BYTES``, all of them a quota).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from kmnode.dataauth.blob import MAX_BLOB_BYTES
from kmnode.host.blob_store import BlobStore, BlobStoreError
from kmnode.host.contract_host import read_bounded


class BlobHost:
    def __init__(self, data_dir: Path) -> None:
        self.store = BlobStore(data_dir)

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/v1/node/data/blobs", self._list)
        app.router.add_put("/v1/node/data/blobs/{digest}", self._put)

    async def _list(self, request: web.Request) -> web.Response:
        digests = await asyncio.to_thread(self.store.digests)
        return web.json_response({"blobs": digests})

    async def _put(self, request: web.Request) -> web.Response:
        try:
            data = await read_bounded(request, MAX_BLOB_BYTES)
            stored = await asyncio.to_thread(self.store.put, request.match_info["digest"], data)
        except (ValueError, BlobStoreError) as exc:
            status = 413 if "at most" in str(exc) else 400
            return web.json_response({"error": str(exc), "code": "bad_request"}, status=status)
        return web.json_response(
            {"digest": request.match_info["digest"], "bytes": len(data), "stored": stored},
            status=201 if stored else 200,
        )

    def tamper(self, body: dict[str, Any]) -> dict[str, Any]:
        """Chaos (``kmctl chaos tamper-blob``): flip a bit of the blob ``digest``;
        ``ValueError`` naming the field if there is none such here."""
        digest = body.get("digest")
        if not isinstance(digest, str):
            raise ValueError("digest: the blob's sha256 (hex)")
        try:
            if not self.store.tamper(digest):
                raise ValueError(f"this node holds no blob {digest[:16]}...")
        except BlobStoreError as exc:
            raise ValueError(f"digest: {exc}") from None
        return {"tampered": digest}
