"""The KM enclave: the only place the cluster master secret and derived keys exist in clear.

The host drives this object but only ever receives ciphertext from it: sealed state for its data
directory, channel frames for the network, keys encrypted to an attested service enclave. Keys
are derived from the master secret and (key name, generation), so every KM enclave derives the
same bytes without any key ever being written to the replicated ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import nacl.utils
from nacl.signing import SigningKey

from attest import local
from attest.channel import SecureChannel
from attest.errors import AttestationError, SealingError
from attest.handshake import HandshakeConfig, HandshakeResult, Initiator, Responder
from attest.hardware import EnclaveContext
from attest.keybox import KeyBoxes
from attest.quote import QuoteVerifier, report_data_for
from attest.sealing import seal, unseal
from kmnode.km.state import KMState

SECRET_SIZE = 32
#: Outstanding local-attestation challenges kept (each is good for one provisioning).
MAX_OPEN_CHALLENGES = 4096
_SEALED_VERSION = 1


class EnclaveStateError(Exception):
    """The enclave cannot do this in its current state (no master secret yet, ...)."""


@dataclass(frozen=True)
class ProvisionResult:
    """What the host may see of a provisioning: ciphertext for the service, and the outcome."""

    ok: bool
    reason: str
    service_measurement: str
    #: The key boxed to the attested service enclave's public key (empty when refused).
    ciphertext: bytes


def derive_key(master_secret: bytes, name: str, generation: int) -> bytes:
    """Key bytes for (name, generation): one-way from the master secret, distinct per input."""
    info = json.dumps([name, generation]).encode()
    return hashlib.blake2b(info, key=master_secret, person=b"kmsim-key-v1", digest_size=32).digest()


class KMEnclave:
    """Enclave-side state of one KM node. ``repr`` and errors never include secrets."""

    def __init__(self, name: str, context: EnclaveContext, verifier: QuoteVerifier) -> None:
        self.name = name
        self.context = context
        self.verifier = verifier
        self.state = KMState()
        self._master_secret: bytes | None = None
        self._signing_key = SigningKey(nacl.utils.random(SECRET_SIZE))
        self._sessions: dict[int, Initiator | Responder] = {}
        #: Challenges issued and not yet used, oldest first (a dict as an ordered set).
        self._challenges: dict[bytes, None] = {}
        #: Provisioning boxes to service enclaves (see ``attest.keybox``).
        self._boxes = KeyBoxes()
        self._next_session = 0

    # --- master secret ----------------------------------------------------------------------

    @property
    def has_master_secret(self) -> bool:
        return self._master_secret is not None

    def genesis(self) -> None:
        """Create the cluster master secret (first node of a new cluster only)."""
        if self._master_secret is not None:
            raise EnclaveStateError("this enclave already holds a master secret")
        self._master_secret = nacl.utils.random(SECRET_SIZE)

    def export_master_secret(self, channel: SecureChannel) -> bytes:
        """The master secret as one frame of an attested channel to a joining member."""
        return channel.seal(self._require_secret())

    def import_master_secret(self, channel: SecureChannel, frame: bytes) -> None:
        secret = channel.open(frame)
        if len(secret) != SECRET_SIZE:
            raise EnclaveStateError("received master secret has the wrong size")
        if self._master_secret is not None and self._master_secret != secret:
            raise EnclaveStateError("received a master secret different from the one held")
        self._master_secret = secret

    def _require_secret(self) -> bytes:
        if self._master_secret is None:
            raise EnclaveStateError("no master secret: the node has not joined a cluster")
        return self._master_secret

    def key_fingerprint(self, name: str, generation: int) -> str:
        """A MAC proving which key bytes this enclave derives, without revealing them."""
        key = derive_key(self._require_secret(), name, generation)
        return hashlib.blake2b(b"kmsim-fingerprint", key=key, digest_size=16).hexdigest()

    # --- sealing ----------------------------------------------------------------------------

    def sealed_state(self) -> bytes:
        """Everything the enclave needs after a restart, sealed to this platform and code."""
        payload = json.dumps(
            {
                "version": _SEALED_VERSION,
                "name": self.name,
                "master_secret": self._require_secret().hex(),
                "signing_key": bytes(self._signing_key).hex(),
            }
        ).encode()
        return seal(self.context, payload)

    def restore_sealed_state(self, blob: bytes) -> None:
        """Unseal state written by :meth:`sealed_state`; raises a SealingError if it cannot."""
        data = json.loads(unseal(self.context, blob))
        if data.get("version") != _SEALED_VERSION or data.get("name") != self.name:
            raise SealingError("sealed state belongs to another node or version")
        self._master_secret = bytes.fromhex(data["master_secret"])
        self._signing_key = SigningKey(bytes.fromhex(data["signing_key"]))

    # --- attestation ------------------------------------------------------------------------

    def directory(self) -> dict[str, str]:
        return {m.name: m.platform_id for m in self.state.members.values()}

    def handshake_config(self, accept_unknown_peers: bool = False) -> HandshakeConfig:
        return HandshakeConfig(
            name=self.name,
            enclave=self.context,
            verifier=self.verifier,
            directory=self.directory(),
            accept_unknown_peers=accept_unknown_peers,
        )

    def initiator(self, peer: str, directory: dict[str, str] | None = None) -> Initiator:
        config = self.handshake_config()
        if directory is not None:
            config = HandshakeConfig(config.name, config.enclave, config.verifier, directory)
        return Initiator(config, self.state.policy, peer)

    def responder(self, accept_unknown_peers: bool = False) -> Responder:
        return Responder(self.handshake_config(accept_unknown_peers), self.state.policy)

    # --- sessions: the host moves bytes, the enclave keeps every channel key ---------------

    def open_initiator(self, peer: str, directory: dict[str, str]) -> tuple[int, bytes]:
        """Start a handshake towards ``peer``; returns (session id, HELLO to send)."""
        initiator = self.initiator(peer, directory)
        session = self._new_session(initiator)
        return session, initiator.start()

    def open_responder(self, directory: dict[str, str], accept_unknown_peers: bool) -> int:
        config = self.handshake_config(accept_unknown_peers)
        config = HandshakeConfig(
            config.name, config.enclave, config.verifier, directory, accept_unknown_peers
        )
        return self._new_session(Responder(config, self.state.policy))

    def handshake_step(self, session: int, message: bytes, now: float) -> bytes | None:
        """Feed a handshake message; returns the reply to send, if any. Raises on refusal."""
        party = self._sessions.get(session)
        if party is None:
            raise EnclaveStateError(f"no handshake session {session}")
        return party.receive(message, now)

    def session_peer(self, session: int) -> tuple[str, str]:
        """(peer node name, verified platform id) of a completed handshake."""
        result = self._result(session)
        return result.peer_name, result.peer.platform_id

    def seal_frame(self, session: int, plaintext: bytes) -> bytes:
        return self._result(session).channel.seal(plaintext)

    def open_frame(self, session: int, frame: bytes) -> bytes:
        return self._result(session).channel.open(frame)

    def send_master_secret(self, session: int) -> bytes:
        return self.export_master_secret(self._result(session).channel)

    def receive_master_secret(self, session: int, frame: bytes) -> None:
        self.import_master_secret(self._result(session).channel, frame)

    def close_session(self, session: int) -> None:
        self._sessions.pop(session, None)

    def _new_session(self, party: Initiator | Responder) -> int:
        self._next_session += 1
        self._sessions[self._next_session] = party
        return self._next_session

    def _result(self, session: int) -> HandshakeResult:
        party = self._sessions.get(session)
        if party is None or party.result is None:
            raise EnclaveStateError(f"session {session} has no completed handshake")
        return party.result

    def signing_quote(self, now: float) -> tuple[bytes, bytes]:
        """(public key, quote binding it): lets anyone check ledger signatures offline."""
        public = bytes(self._signing_key.verify_key)
        return public, self.context.quote(report_data_for(b"ledger-signer", public), now)

    def sign_chain(self, index: int, chain_hash: bytes) -> bytes:
        return self._signing_key.sign(index.to_bytes(8, "big") + chain_hash).signature

    # --- provisioning -----------------------------------------------------------------------

    def new_challenge(self) -> bytes:
        """A fresh local-attestation challenge; only challenges issued here are accepted."""
        challenge = local.new_challenge()
        self._challenges[challenge] = None
        if len(self._challenges) > MAX_OPEN_CHALLENGES:
            # Answers that never came, or releases that never committed: forget the oldest.
            del self._challenges[next(iter(self._challenges))]
        return challenge

    def provision(
        self, key: str, generation: int, challenge: bytes, response: bytes
    ) -> ProvisionResult:
        """Local attestation of the service enclave, then its key encrypted to it (or refusal).

        Must be called only for a release the state machine has committed; the outcome is
        then proposed as a ``release.outcome`` audit record. Each challenge is good for one
        attempt, so a recorded response cannot be replayed.
        """
        if challenge not in self._challenges:
            return ProvisionResult(False, "challenge was not issued by this enclave", "", b"")
        del self._challenges[challenge]
        try:
            attested = local.verify_response(self.context, challenge, response, self.state.policy)
        except AttestationError as exc:
            return ProvisionResult(False, f"{type(exc).__name__}: {exc}", "", b"")
        measurement = attested.identity.measurement.hex()
        if not self.state.service_allowed(key, measurement):
            return ProvisionResult(
                False, f"service measurement not allowed for key {key!r}", measurement, b""
            )
        material = derive_key(self._require_secret(), key, generation)
        envelope = json.dumps({"key": key, "generation": generation, "material": material.hex()})
        ciphertext = self._boxes.seal(attested.public_key, envelope.encode())
        return ProvisionResult(True, "", measurement, bytes(ciphertext))

    def __repr__(self) -> str:
        return f"KMEnclave({self.name!r}, has_master_secret={self.has_master_secret})"
