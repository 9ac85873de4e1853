"""Tests of the confidential-contract library (kmnode.contracts)."""

from __future__ import annotations

from collections.abc import Mapping


class DictBacking:
    """A backing store that is a dict per contract, recording every load and store batch."""

    def __init__(self) -> None:
        self.data: dict[str, dict[bytes, bytes]] = {}
        self.loads: list[tuple[str, bytes]] = []
        self.stores: list[tuple[str, dict[bytes, bytes | None]]] = []

    def load(self, contract: str, key: bytes) -> bytes | None:
        self.loads.append((contract, key))
        return self.data.get(contract, {}).get(key)

    def store(self, contract: str, writes: Mapping[bytes, bytes | None]) -> None:
        self.stores.append((contract, dict(writes)))
        table = self.data.setdefault(contract, {})
        for key, value in writes.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        if not table:
            del self.data[contract]

    def snapshot(self) -> dict[str, dict[bytes, bytes]]:
        return {contract: dict(table) for contract, table in self.data.items()}
