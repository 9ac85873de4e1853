"""A signed high-water mark: what `kmctl ledger mark` writes and `verify --against` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attest.quote import QuoteVerifier
from kmnode.errors import EXIT_REFUSED, EXIT_USAGE
from kmnode.km.ledger_proof import Proof, head_message
from kmnode.ledger.evidence import not_genuine
from kmnode.ledger.report import LedgerError

MARK_FORMAT = "kmsim-ledger-mark/1"


@dataclass(frozen=True)
class LedgerMark:
    """A signed high-water mark: the highest (index, chain hash) a member's enclave signed in
    some ledger, with the evidence (key, quote, signature), so it can be checked on its own."""

    index: int
    chain_hash: bytes
    proof: Proof
    #: Where it came from (a node's name, a file), for messages.
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARK_FORMAT,
            "source": self.source,
            "index": self.index,
            "chain_hash": self.chain_hash.hex(),
            "public_key": self.proof.public_key.hex(),
            "quote": self.proof.quote.hex(),
            "signature": self.proof.signature.hex(),
        }

    @classmethod
    def from_json(cls, data: object, source: str) -> LedgerMark:
        """A mark from its JSON; ``LedgerError`` (usage) if it is not one."""
        try:
            if not isinstance(data, dict) or data.get("format") != MARK_FORMAT:
                raise ValueError(f"not a {MARK_FORMAT} document")
            index = data["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 1:
                raise ValueError("index must be a positive integer")
            return cls(
                index=index,
                chain_hash=bytes.fromhex(data["chain_hash"]),
                proof=Proof(
                    bytes.fromhex(data["public_key"]),
                    bytes.fromhex(data["quote"]),
                    bytes.fromhex(data["signature"]),
                ),
                source=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{source} is not a ledger mark: {exc}", EXIT_USAGE) from None

    @classmethod
    def load(cls, path: Path) -> LedgerMark:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LedgerError(f"cannot read the mark {path}: {exc}", EXIT_USAGE) from None
        return cls.from_json(data, str(path))

    def check(self, verifier: QuoteVerifier) -> None:
        """Refuse (``LedgerError``) a mark whose evidence is not genuine: a quote under the
        vendor root binding the key that signed this (index, chain hash). Whether its signer
        was a member was judged when the mark was taken, from the ledger it came from."""
        why = not_genuine(self.proof, head_message(self.index, self.chain_hash), verifier)
        if why is not None:
            raise LedgerError(f"the mark from {self.source} is not genuine: {why}", EXIT_REFUSED)
