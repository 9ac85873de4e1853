"""Exceptions of the ring buffer.

They are plain Python classes (the Cython extension imports and raises them) so that callers
can catch them without importing the extension, and so that each failure the TEE side can meet
on untrusted shared memory has a name of its own: a full ring is an ordinary condition a
caller handles, a corrupted header is an attack or a bug and must never be retried blindly.
"""

from __future__ import annotations


class RingError(Exception):
    """Base class, so a caller can treat every ring failure alike when it does not care why."""


class RingFull(RingError):
    """The record(s) did not fit and the caller asked to fail, or a wait for space timed out.

    `written` says how many records of a batch were written before the ring filled, so that
    nothing is lost silently: the caller still owns records[written:].
    """

    def __init__(self, message: str, written: int = 0) -> None:
        super().__init__(message)
        self.written = written


class RingLockTimeout(RingError, TimeoutError):
    """A ring lock stayed held past the caller's timeout.

    On the TEE side this is what a host holding the lock produces: the writer gives up rather
    than blocking forever, and the record is reported unwritten (`written` counts a batch's
    records that did go in before the lock was lost).
    """

    def __init__(self, message: str, written: int = 0) -> None:
        super().__init__(message)
        self.written = written


class RingCorrupted(RingError):
    """A value read from the shared header or a record frame is impossible.

    Raised instead of acting on it: the shared memory is writable by the other side, which is
    untrusted, so every offset, length and capacity is validated before it is used.
    """


class RecordTooLarge(RingError, ValueError):
    """The record exceeds the ring's maximum record size (fixed when the ring was created)."""


class RingNotSealed(RingError):
    """A ring handed over by file descriptor whose memory the other side could still resize.

    Shrinking a shared mapping under the TEE makes its next touch of the lost pages a SIGBUS,
    which no bounds check can catch; so the TEE side maps only a memfd sealed against shrinking
    and growing, with the seals themselves sealed, and refuses anything else.
    """


class RingClosed(RingError):
    """The ring was closed; its memory is no longer mapped in this process."""


__all__ = [
    "RecordTooLarge",
    "RingClosed",
    "RingCorrupted",
    "RingError",
    "RingFull",
    "RingLockTimeout",
    "RingNotSealed",
]
