"""The secure channel that a completed handshake yields: AEAD frames with strict counters.

Each direction has its own key and its own counter. The counter is the AEAD nonce, so it is
authenticated without extra bytes; the receiver accepts only the next counter, which refuses
replays (counter already seen) and reordering or loss (counter ahead) on a transport that is
supposed to be ordered. Because the two directions use different keys, a frame reflected back
to its sender does not authenticate; we then try the sender's own key only to name the attack.
A refused frame changes nothing, so the genuine next frame is still accepted.
"""

from __future__ import annotations

import struct

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from attest.errors import (
    ChannelExhausted,
    FrameReflected,
    FrameReordered,
    FrameReplayed,
    FrameTampered,
)

_COUNTER = struct.Struct(">Q")
_NONCE_PREFIX = b"\0\0\0\0"
TAG_SIZE = 16
FRAME_OVERHEAD = _COUNTER.size + TAG_SIZE
#: Counters never wrap: a channel that has sent this many frames must be re-established.
MAX_COUNTER = 2**64 - 1


def _nonce(counter: int) -> bytes:
    return _NONCE_PREFIX + _COUNTER.pack(counter)


class SecureChannel:
    """One endpoint of an attested channel. Not thread-safe: one task sends, one receives."""

    __slots__ = ("_recv_counter", "_recv_key", "_send_counter", "_send_key", "peer")

    def __init__(self, send_key: bytes, recv_key: bytes, peer: str) -> None:
        if len(send_key) != 32 or len(recv_key) != 32 or send_key == recv_key:
            raise ValueError("a channel needs two distinct 32-byte keys")
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_counter = 0
        self._recv_counter = 0
        self.peer = peer

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt the next outgoing frame."""
        counter = self._send_counter
        if counter >= MAX_COUNTER:
            raise ChannelExhausted("send counter exhausted; re-run the handshake")
        header = _COUNTER.pack(counter)
        ciphertext = crypto_aead_chacha20poly1305_ietf_encrypt(
            plaintext, header, _nonce(counter), self._send_key
        )
        self._send_counter = counter + 1
        return header + ciphertext

    def open(self, frame: bytes) -> bytes:
        """Decrypt the next incoming frame, or raise without changing any state."""
        if len(frame) < FRAME_OVERHEAD:
            raise FrameTampered(f"frame of {len(frame)} bytes is shorter than the overhead")
        header = bytes(frame[: _COUNTER.size])
        (counter,) = _COUNTER.unpack(header)
        ciphertext = bytes(frame[_COUNTER.size :])
        try:
            plaintext = crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, header, _nonce(counter), self._recv_key
            )
        except CryptoError as exc:
            if self._is_own_frame(header, counter, ciphertext):
                raise FrameReflected(f"frame {counter} is one of ours sent back") from exc
            raise FrameTampered(f"frame {counter} fails authentication") from exc
        if counter < self._recv_counter:
            raise FrameReplayed(f"frame {counter} already received (expected {self._recv_counter})")
        if counter > self._recv_counter:
            raise FrameReordered(
                f"frame {counter} arrived while frame {self._recv_counter} is still missing"
            )
        self._recv_counter = counter + 1
        return bytes(plaintext)

    def _is_own_frame(self, header: bytes, counter: int, ciphertext: bytes) -> bool:
        try:
            crypto_aead_chacha20poly1305_ietf_decrypt(
                ciphertext, header, _nonce(counter), self._send_key
            )
        except CryptoError:
            return False
        return True

    def __repr__(self) -> str:
        return (
            f"SecureChannel(peer={self.peer!r}, sent={self._send_counter}, "
            f"received={self._recv_counter})"
        )
