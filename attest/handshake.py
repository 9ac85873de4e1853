"""Mutual remote attestation between two KM enclaves, as a sans-I/O state machine.

Three messages::

    initiator -> responder   HELLO    name_i, nonce_i, ephemeral X25519 key e_i
    responder -> initiator   ANSWER   name_r, nonce_r, e_r, quote_r(HELLO, name_r, nonce_r, e_r)
    initiator -> responder   FINISH   quote_i(binds HELLO and ANSWER)

Each quote's report data hashes everything the peer said before it, so it binds the signer's
own ephemeral key (no man in the middle can substitute its own) and the other side's fresh
nonce (an old quote cannot be replayed into a new session). Session keys come from the X25519
shared secret and the hash of the whole transcript, one key per direction.

The objects here never touch a socket or a clock: callers feed in bytes and the current time,
and send what comes back (the h11 style), so the same code runs over aiohttp, in the
simulator, and in tests that tamper with every byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey
from nacl.utils import random as random_bytes

from attest import wire
from attest.channel import SecureChannel
from attest.errors import (
    AttestationError,
    HandshakeError,
    HandshakeReplay,
    PeerIdentityMismatch,
    ReportDataMismatch,
    SelfSession,
    UnexpectedHandshakeMessage,
    UnknownPeer,
)
from attest.hardware import EnclaveContext
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import QuoteVerifier, VerifiedIdentity, report_data_for

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
KEY_SIZE = 32
_HELLO = b"KMH1"
_ANSWER = b"KMH2"
_FINISH = b"KMH3"


@dataclass(frozen=True)
class HandshakeConfig:
    """What one KM enclave brings to every handshake it takes part in."""

    name: str
    enclave: EnclaveContext
    verifier: QuoteVerifier
    #: Node name -> platform id for every known member: a peer must be who it claims to be.
    directory: Mapping[str, str]
    #: Accept initiators not in ``directory`` (a member admitting a joining node).
    accept_unknown_peers: bool = False
    random: Callable[[int], bytes] = random_bytes


@dataclass(frozen=True)
class HandshakeResult:
    peer_name: str
    peer: VerifiedIdentity
    channel: SecureChannel
    transcript_hash: bytes


def peer_refusal(result: HandshakeResult, policy: Policy, directory: Mapping[str, str]) -> str:
    """Why the peer of a completed handshake may no longer use its channel ("" if it still
    may): it is no longer in ``directory`` on the platform its quote proved, or ``policy`` now
    refuses what its quote showed (platform revoked, TCB status, measurement, security
    version). A membership or policy change applies to established sessions too, not only to
    the next handshake; the quote's age is not judged again (it was fresh when it counted)."""
    peer, name = result.peer, result.peer_name
    if directory.get(name) != peer.platform_id:
        return f"{name} is no longer a member on platform {peer.platform_id!r}"
    for _, _, refusal in policy.judge(peer.platform_id, peer.tcb_status, peer.identity, peer.role):
        if refusal is not None:
            return f"{name}: {refusal}"
    return ""


class _State(Enum):
    START = auto()
    WAIT_ANSWER = auto()
    WAIT_HELLO = auto()
    WAIT_FINISH = auto()
    DONE = auto()
    FAILED = auto()


def _x25519(private: PrivateKey, peer_public: bytes) -> bytes:
    try:
        shared = crypto_scalarmult(bytes(private), peer_public)
    except CryptoError as exc:
        raise HandshakeError("peer ephemeral key is a low-order point") from exc
    if shared == bytes(32):
        raise HandshakeError("peer ephemeral key gives an all-zero shared secret")
    return bytes(shared)


def _session_keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes]:
    """(initiator->responder key, responder->initiator key, transcript hash)."""
    transcript_hash = hashlib.blake2b(transcript, digest_size=32).digest()
    i2r = hashlib.blake2b(b"kmsim-i2r" + transcript_hash, key=shared, digest_size=32).digest()
    r2i = hashlib.blake2b(b"kmsim-r2i" + transcript_hash, key=shared, digest_size=32).digest()
    return i2r, r2i, transcript_hash


class _Party:
    """State shared by both roles: one ephemeral key, one nonce, one outcome."""

    def __init__(self, config: HandshakeConfig, policy: Policy, state: _State) -> None:
        self._config = config
        self._policy = policy
        self._state = state
        self._ephemeral = PrivateKey(config.random(KEY_SIZE))
        self._nonce = config.random(NONCE_SIZE)
        self.result: HandshakeResult | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def _expect(self, state: _State, what: str) -> None:
        if self._state is not state:
            raise UnexpectedHandshakeMessage(f"received {what} in state {self._state.name.lower()}")

    def _fail_on_error(self, step: Callable[[], bytes | None]) -> bytes | None:
        """Run one step; any failure leaves the handshake permanently failed."""
        try:
            return step()
        except AttestationError:
            self._state = _State.FAILED
            raise

    def _verify_peer(
        self, quote: bytes, binding: bytes, peer_name: str, now: float
    ) -> VerifiedIdentity:
        try:
            verified = self._config.verifier.verify(
                quote, self._policy, binding, role=EnclaveRole.KM, now=now
            )
        except ReportDataMismatch as exc:
            raise HandshakeReplay(
                f"{peer_name}'s quote does not bind this session (replayed or forged)"
            ) from exc
        own = self._config
        if peer_name == own.name or verified.platform_id == own.enclave.platform_id:
            raise SelfSession(
                f"peer {peer_name!r} on platform {verified.platform_id!r} is this enclave itself"
            )
        expected_platform = self._config.directory.get(peer_name)
        if expected_platform is not None and verified.platform_id != expected_platform:
            raise PeerIdentityMismatch(
                f"peer claims to be {peer_name!r} (platform {expected_platform!r}) "
                f"but its quote is from platform {verified.platform_id!r}"
            )
        return verified


class Initiator(_Party):
    """The side that dials: knows which node it expects to reach."""

    def __init__(self, config: HandshakeConfig, policy: Policy, peer_name: str) -> None:
        super().__init__(config, policy, _State.START)
        if peer_name == config.name:
            raise SelfSession(f"{peer_name!r} is this enclave itself")
        if peer_name not in config.directory:
            raise UnknownPeer(f"{peer_name!r} is not a known member")
        self._peer_name = peer_name
        self._hello = b""

    def start(self) -> bytes:
        """The HELLO message to send first."""
        self._expect(_State.START, "start")
        self._hello = wire.pack(
            _HELLO,
            wire.u16(PROTOCOL_VERSION),
            self._config.name.encode("utf-8"),
            self._nonce,
            bytes(self._ephemeral.public_key),
        )
        self._state = _State.WAIT_ANSWER
        return self._hello

    def receive(self, answer: bytes, now: float) -> bytes:
        """Check the responder's ANSWER; returns FINISH to send. ``result`` is then set."""
        self._expect(_State.WAIT_ANSWER, "answer")
        finish = self._fail_on_error(lambda: self._on_answer(answer, now))
        assert finish is not None
        return finish

    def _on_answer(self, answer: bytes, now: float) -> bytes:
        name_raw, nonce, ephemeral, quote = wire.unpack(answer, _ANSWER, 4, "handshake answer")
        name = wire.text(name_raw, "responder name")
        wire.fixed(nonce, NONCE_SIZE, "responder nonce")
        wire.fixed(ephemeral, KEY_SIZE, "responder ephemeral key")
        if name != self._peer_name:
            raise PeerIdentityMismatch(f"dialled {self._peer_name!r} but {name!r} answered")
        binding = report_data_for(b"handshake-responder", self._hello, name_raw, nonce, ephemeral)
        verified = self._verify_peer(quote, binding, name, now)
        shared = _x25519(self._ephemeral, ephemeral)
        own = report_data_for(b"handshake-initiator", self._hello, answer)
        finish = wire.pack(_FINISH, self._config.enclave.quote(own, now))
        i2r, r2i, transcript_hash = _session_keys(shared, self._hello + answer + finish)
        self.result = HandshakeResult(
            name, verified, SecureChannel(i2r, r2i, name), transcript_hash
        )
        self._state = _State.DONE
        return finish


class Responder(_Party):
    """The side that accepts: learns who is calling from HELLO and checks it."""

    def __init__(self, config: HandshakeConfig, policy: Policy) -> None:
        super().__init__(config, policy, _State.WAIT_HELLO)
        self._hello = b""
        self._answer = b""
        self._peer_name = ""
        self._peer_ephemeral = b""

    def receive(self, message: bytes, now: float) -> bytes | None:
        """Feed HELLO (returns ANSWER to send) or FINISH (returns None; ``result`` is set)."""
        if self._state is _State.WAIT_HELLO:
            return self._fail_on_error(lambda: self._on_hello(message, now))
        self._expect(_State.WAIT_FINISH, "a handshake message")
        return self._fail_on_error(lambda: self._on_finish(message, now))

    def _on_hello(self, hello: bytes, now: float) -> bytes:
        version, name_raw, nonce, ephemeral = wire.unpack(hello, _HELLO, 4, "handshake hello")
        if wire.read_u16(version, "protocol version") != PROTOCOL_VERSION:
            raise HandshakeError(f"unsupported protocol version {version.hex()}")
        name = wire.text(name_raw, "initiator name")
        wire.fixed(nonce, NONCE_SIZE, "initiator nonce")
        wire.fixed(ephemeral, KEY_SIZE, "initiator ephemeral key")
        if name == self._config.name:
            raise SelfSession(f"{name!r} is this enclave itself")
        if name not in self._config.directory and not self._config.accept_unknown_peers:
            raise UnknownPeer(f"{name!r} is not a known member")
        own_name = self._config.name.encode("utf-8")
        own_key = bytes(self._ephemeral.public_key)
        binding = report_data_for(b"handshake-responder", hello, own_name, self._nonce, own_key)
        quote = self._config.enclave.quote(binding, now)
        self._hello = hello
        self._peer_name = name
        self._peer_ephemeral = ephemeral
        self._answer = wire.pack(_ANSWER, own_name, self._nonce, own_key, quote)
        self._state = _State.WAIT_FINISH
        return self._answer

    def _on_finish(self, finish: bytes, now: float) -> None:
        (quote,) = wire.unpack(finish, _FINISH, 1, "handshake finish")
        binding = report_data_for(b"handshake-initiator", self._hello, self._answer)
        verified = self._verify_peer(quote, binding, self._peer_name, now)
        shared = _x25519(self._ephemeral, self._peer_ephemeral)
        i2r, r2i, transcript_hash = _session_keys(shared, self._hello + self._answer + finish)
        channel = SecureChannel(r2i, i2r, self._peer_name)
        self.result = HandshakeResult(self._peer_name, verified, channel, transcript_hash)
        self._state = _State.DONE
        return None
