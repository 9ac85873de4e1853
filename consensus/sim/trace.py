"""The run's event trace: a bounded tail for humans and a hash of the whole run for replay.

Every event the simulator processes is one line. The last ``keep`` lines are printed when a
seed fails; the hash over all lines is what a replay must reproduce exactly.
"""

from __future__ import annotations

import hashlib
from collections import deque


class Trace:
    __slots__ = ("_hash", "count", "tail")

    def __init__(self, keep: int = 200) -> None:
        self.tail: deque[str] = deque(maxlen=keep)
        self._hash = hashlib.blake2b(digest_size=16)
        self.count = 0

    def add(self, line: str) -> None:
        self.tail.append(line)
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self.count += 1

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()
