"""The KM enclave: the only place the cluster master secret and derived keys exist in clear.

The host drives this object but only ever receives ciphertext from it: sealed state for its data
directory, channel frames for the network, keys encrypted to an attested service enclave. Keys
are derived from the master secret and (key name, generation), so every KM enclave derives the
same bytes without any key ever being written to the replicated ledger.

The interface is narrow on purpose, because the host may call any entry point in any order with
any arguments (``tests/km/test_adversarial_host.py`` does exactly that):

* every decision is taken from the enclave's own state: whom it may talk to (committed
  membership, or the bootstrap directory until this enclave has a cluster), whether a joining
  node is admitted (a committed member record on the platform its quote proved), whether a key
  may be provisioned (a committed release naming this node, once);
* a channel carries only typed messages the enclave builds itself (Raft messages from this
  node, join requests and replies): there is no entry point that seals host-chosen plaintext or
  returns the plaintext of a frame, and no session with itself;
* the master secret leaves only inside a join reply, on a channel whose keys are bound to the
  joining enclave's quote, to a node the committed membership admitted.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey

from attest import local
from attest.errors import AttestationError, SealingError
from attest.handshake import (
    HandshakeConfig,
    HandshakeResult,
    Initiator,
    Responder,
    peer_refusal,
)
from attest.hardware import EnclaveContext
from attest.identity import EnclaveIdentity, EnclaveRole
from attest.keybox import KeyBoxes
from attest.local import LocallyAttested
from attest.quote import Quote, QuoteVerifier, report_data_for
from attest.sealing import seal, unseal
from consensus.codec import DECODE_LIMITS, CodecError, DecodeLimits, decode_message, encode_message
from consensus.types import ConfState, Message, SnapshotMeta
from kmnode.km.commands import LedgerSign
from kmnode.km.ledger_proof import (
    SIGNER_LABEL,
    Proof,
    SignedSnapshot,
    head_message,
    signature_holds,
    snapshot_message,
    split_message,
    state_digest,
)
from kmnode.km.recovery_commands import RecoveryShares
from kmnode.km.recovery_state import canonical_split
from kmnode.km.state import KMState
from kmnode.recovery.boxing import RECOVERY_KEY_LABEL, recovery_report_data
from kmnode.recovery.shares import (
    BogusShare,
    RecoveryError,
    Share,
    check_share,
    combine,
    master_commitment,
    split,
)

SECRET_SIZE = 32
CLUSTER_ID_SIZE = 16
#: Outstanding local-attestation challenges kept (each is good for one provisioning).
MAX_OPEN_CHALLENGES = 4096
#: Open sessions kept; the oldest is dropped beyond this (a host opening sessions in a loop
#: must not grow enclave memory without bound).
MAX_SESSIONS = 1024
#: Members a join reply may name.
MAX_JOIN_MEMBERS = 1024
#: Largest join request or reply the enclave opens.
MAX_JOIN_FRAME = 64 * 1024
_SEALED_VERSION = 2
#: Label of the report data in the quote ``kmctl attest show`` prints (nothing else uses it).
SHOW_QUOTE_LABEL = b"kmctl-attest-show"


class EnclaveStateError(Exception):
    """The enclave cannot do this in its current state (no master secret yet, ...)."""


class SessionRefused(EnclaveStateError):
    """A session entry point was used for something its session cannot do."""


class FrameRefused(EnclaveStateError):
    """A channel frame was authentic but its content is not acceptable (wrong sender, ...)."""


class BindingMismatch(SealingError):
    """Sealed state and the ledger belong to different clusters (or a different genesis)."""


class Purpose(Enum):
    """What a peer connection is for; fixed when its session opens."""

    RAFT = "raft"
    JOIN = "join"


@dataclass(frozen=True)
class ProvisionResult:
    """What the host may see of a provisioning: ciphertext for the service, and the outcome."""

    ok: bool
    reason: str
    service_measurement: str
    #: The key boxed to the attested service enclave's public key (empty when refused).
    ciphertext: bytes
    #: This KM enclave's local report for that service, vouching for the box key it used.
    vouch: bytes = b""


#: The most bytes of job material one data-job box carries (the pipe's line is 1 MiB of hex).
MAX_JOB_ENVELOPE = 256 * 1024


@dataclass(frozen=True)
class DataJobs:
    """A batch of data jobs provisioned: the box (``result``, not ok if nothing went in), the
    tokens refused with their reason, and those left for another batch (the box was full)."""

    result: ProvisionResult
    refused: dict[str, str]
    left: list[str]


@dataclass(frozen=True)
class JoinRequest:
    """A joining node's member record, as its own enclave sent it and ours verified it."""

    name: str
    #: The platform the joiner's quote proved (never what the joiner claims).
    platform_id: str
    host: str
    peer_port: int
    api_port: int
    #: A member asking again only to learn the committed membership (it restarted behind the
    #: cluster): it must not be added if it is not a member any more.
    refresh: bool = False

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform_id": self.platform_id,
            "host": self.host,
            "peer_port": self.peer_port,
            "api_port": self.api_port,
        }


@dataclass(frozen=True)
class JoinReply:
    """A member's answer to a join request, as the host may see it (never the secret)."""

    status: str  # admitted | redirect | busy | refused
    leader: str = ""
    reason: str = ""


@dataclass
class _Session:
    party: Initiator | Responder
    purpose: Purpose
    initiator: bool
    #: A join reply has been sealed (members) or opened (joiners) on this session.
    join_answered: bool = False
    join_requested: bool = False


def _open_join_frame(result: HandshakeResult, frame: bytes, what: str) -> dict[str, Any]:
    """The JSON object in a join session's frame (bounded, authenticated, an object)."""
    if len(frame) > MAX_JOIN_FRAME:
        raise FrameRefused(f"{what} of {len(frame)} bytes exceeds {MAX_JOIN_FRAME}")
    try:
        body = json.loads(result.channel.open(frame))
    except ValueError:
        raise FrameRefused(f"{what} is not JSON") from None
    if not isinstance(body, dict):
        raise FrameRefused(f"{what} is not an object")
    return body


def contract_key(master_secret: bytes, purpose: str, contract: str) -> bytes:
    """A contract key (``input``: the contract-input key; ``state``: a contract's state key):
    derived apart from operators' keys (another personalisation), so no key an operator can
    create and release shares bytes with one."""
    info = json.dumps([purpose, contract]).encode()
    return hashlib.blake2b(
        info, key=master_secret, person=b"kmsim-contract1", digest_size=32
    ).digest()


def data_key(master_secret: bytes, purpose: str) -> bytes:
    """A data-authorization key (``wrap``: the X25519 key owners wrap data keys to;
    ``token``: the Ed25519 seed tokens are signed with), apart from every other derivation."""
    return hashlib.blake2b(
        purpose.encode(), key=master_secret, person=b"kmsim-data1", digest_size=32
    ).digest()


def derive_key(master_secret: bytes, name: str, generation: int) -> bytes:
    """Key bytes for (name, generation): one-way from the master secret, distinct per input."""
    info = json.dumps([name, generation]).encode()
    return hashlib.blake2b(info, key=master_secret, person=b"kmsim-key-v1", digest_size=32).digest()


class KMEnclave:
    """Enclave-side state of one KM node. ``repr`` and errors never include secrets.

    ``bootstrap`` (node name -> platform id, from cluster.yaml) is whom the enclave may talk to
    before it belongs to a cluster (a joining node dialling a member, members dialling it); from
    the moment its replicated state names a cluster, only committed members count.
    """

    def __init__(
        self,
        name: str,
        context: EnclaveContext,
        verifier: QuoteVerifier,
        bootstrap: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._context = context
        self.verifier = verifier
        self.state = KMState(quote_verifier=verifier)
        self._bootstrap = dict(bootstrap or {})
        #: The committed membership a member sent with our admission, and its applied index
        #: then: peers until this enclave's own state has caught up to that index.
        self._join_directory: dict[str, str] = {}
        self._join_index = 0
        self._master_secret: bytes | None = None
        #: Random id of the cluster this enclave belongs to, and the hash of its genesis entry:
        #: both sealed with the master secret, so a blob cannot be carried to another cluster.
        self._cluster_id = ""
        self._genesis_hash = ""
        #: Set when the ledger turns out to belong to another cluster than the sealed state.
        self.binding_error = ""
        #: The sealed state changed (genesis hash learnt): the host should store it anew.
        self.sealed_dirty = False
        self._signing_key = SigningKey(nacl.utils.random(SECRET_SIZE))
        self._sessions: dict[int, _Session] = {}
        #: Challenges issued and not yet used, oldest first (a dict as an ordered set).
        self._challenges: dict[bytes, None] = {}
        #: Releases provisioned by this enclave instance: each at most once.
        self._provisioned: set[str] = set()
        #: Tokens whose data key this enclave handed to its service (once per token).
        self._jobs: set[str] = set()
        #: This recovery's session seed (``recovery_session``; empty: not recovering).
        self._recovery_seed = b""
        #: Provisioning boxes to service enclaves (see ``attest.keybox``).
        self._boxes = KeyBoxes()
        self._next_session = 0
        #: How much a peer's Raft message may make the decoder build (``LimitsSpec``).
        self.decode_limits: DecodeLimits = DECODE_LIMITS

    # --- public facts -------------------------------------------------------------------------

    @property
    def identity(self) -> EnclaveIdentity:
        return self._context.identity

    @property
    def platform_id(self) -> str:
        return self._context.platform_id

    @property
    def has_master_secret(self) -> bool:
        return self._master_secret is not None

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def show_quote(self, now: float) -> tuple[bytes, bytes]:
        """(report data, quote) for `kmctl attest show`: the report data is fixed by the
        enclave (a label and the node name), so the host cannot obtain a quote that binds
        something of its choosing, such as a handshake key of its own."""
        binding = report_data_for(SHOW_QUOTE_LABEL, self.name.encode())
        return binding, self._context.quote(binding, now)

    # --- master secret ----------------------------------------------------------------------

    def genesis(self) -> None:
        """Create the cluster master secret and cluster id (first node of a new cluster only)."""
        if self._master_secret is not None:
            raise EnclaveStateError("this enclave already holds a master secret")
        if self.state.cluster:
            raise EnclaveStateError(f"this enclave belongs to cluster {self.state.cluster!r}")
        self._master_secret = nacl.utils.random(SECRET_SIZE)
        self._cluster_id = nacl.utils.random(CLUSTER_ID_SIZE).hex()

    def _require_secret(self) -> bytes:
        if self._master_secret is None:
            raise EnclaveStateError("no master secret: the node has not joined a cluster")
        if self.binding_error:
            raise EnclaveStateError(f"refusing to use the master secret: {self.binding_error}")
        return self._master_secret

    def key_fingerprint(self, name: str, generation: int) -> str:
        """A MAC proving which key bytes this enclave derives, without revealing them."""
        key = derive_key(self._require_secret(), name, generation)
        return hashlib.blake2b(b"kmsim-fingerprint", key=key, digest_size=16).hexdigest()

    # --- sealing and cluster binding --------------------------------------------------------

    def sealed_state(self) -> bytes:
        """Everything the enclave needs after a restart, sealed to this platform and code, and
        bound to this node, its cluster id and (once known) the cluster's genesis entry."""
        payload = json.dumps(
            {
                "version": _SEALED_VERSION,
                "name": self.name,
                "cluster_id": self._cluster_id,
                "genesis_hash": self._genesis_hash,
                "join_directory": self._join_directory,
                "join_index": self._join_index,
                "master_secret": self._require_secret().hex(),
                "signing_key": bytes(self._signing_key).hex(),
            }
        ).encode()
        self.sealed_dirty = False
        return seal(self._context, payload)

    def restore_sealed_state(self, blob: bytes) -> None:
        """Unseal state written by :meth:`sealed_state`; raises a SealingError if it cannot."""
        try:
            data = json.loads(unseal(self._context, blob))
        except ValueError:
            raise SealingError("sealed state does not parse") from None
        if not isinstance(data, dict) or data.get("version") != _SEALED_VERSION:
            raise SealingError(
                f"sealed state has version {data.get('version') if isinstance(data, dict) else '?'}"
                f", this enclave reads version {_SEALED_VERSION}"
            )
        if data.get("name") != self.name:
            raise SealingError(
                f"sealed state belongs to node {data.get('name')!r}, not {self.name!r}"
            )
        cluster_id = data.get("cluster_id")
        if not isinstance(cluster_id, str) or len(cluster_id) != 2 * CLUSTER_ID_SIZE:
            raise SealingError("sealed state names no cluster")
        self._master_secret = bytes.fromhex(data["master_secret"])
        self._signing_key = SigningKey(bytes.fromhex(data["signing_key"]))
        self._cluster_id = cluster_id
        self._genesis_hash = str(data.get("genesis_hash") or "")
        join_directory, join_index = data.get("join_directory", {}), data.get("join_index", 0)
        if isinstance(join_directory, dict) and isinstance(join_index, int):
            self._join_directory, self._join_index = dict(join_directory), join_index
        self.check_binding()

    def check_binding(self) -> None:
        """Compare the replicated state's cluster id and genesis hash with the sealed ones.

        Called after every apply that could change them (and after a restore). A mismatch is
        recorded in ``binding_error`` (the node stops on it) and the master secret is no longer
        used; nothing raises, because it runs while committed entries are applied.
        """
        state = self.state
        if not state.cluster or self._master_secret is None or self.binding_error:
            return
        if state.cluster_id and self._cluster_id and state.cluster_id != self._cluster_id:
            self.binding_error = (
                f"the sealed state belongs to cluster id {self._cluster_id}, the ledger to "
                f"{state.cluster_id}: a sealed blob from another cluster"
            )
            return
        genesis = state.genesis_hash.hex() if state.genesis_hash else ""
        if genesis and self._genesis_hash and genesis != self._genesis_hash:
            self.binding_error = (
                f"the sealed state was made for genesis {self._genesis_hash[:16]}…, the ledger "
                f"starts with {genesis[:16]}…"
            )
            return
        if genesis and not self._genesis_hash:
            self._genesis_hash = genesis
            self.sealed_dirty = True

    # --- whom this enclave talks to -----------------------------------------------------------

    def directory(self) -> dict[str, str]:
        """Node name -> platform id of the peers this enclave accepts: committed members once
        it belongs to a cluster, the bootstrap directory before that. Never itself."""
        if self.state.cluster:
            names = {m.name: m.platform_id for m in self.state.members.values()}
            if self.state.applied_index < self._join_index:
                # Still catching up to the index at which a member admitted us: the members it
                # named then count too (a leader added after the first entries this node
                # applies would otherwise be refused before its own record arrives).
                names = {**self._join_directory, **names}
        elif self.has_master_secret:
            # A member whose state has not named its cluster yet (a restart replaying its
            # log): the membership a member sent at its admission, never cluster.yaml, which
            # may still list nodes the cluster has removed.
            names = dict(self._join_directory)
        else:
            names = {**self._bootstrap, **self._join_directory}
        names.pop(self.name, None)
        return names

    def _handshake_config(self, accept_unknown_peers: bool) -> HandshakeConfig:
        return HandshakeConfig(
            name=self.name,
            enclave=self._context,
            verifier=self.verifier,
            directory=self.directory(),
            accept_unknown_peers=accept_unknown_peers,
        )

    # --- sessions: the host moves bytes, the enclave keeps every channel key ---------------

    def open_initiator(self, peer: str, purpose: Purpose) -> tuple[int, bytes]:
        """Start a handshake towards ``peer`` (a peer of :meth:`directory`); returns (session
        id, HELLO to send). Raises an AttestationError for an unknown peer or itself."""
        purpose = Purpose(purpose)
        initiator = Initiator(self._handshake_config(False), self.state.policy, peer)
        session = self._new_session(_Session(initiator, purpose, initiator=True))
        return session, initiator.start()

    def open_responder(self, purpose: Purpose) -> int:
        """Accept a handshake. Unknown initiators are heard only on a join connection, and only
        by a member (it holds the secret). One whose state has not named its cluster yet (the
        genesis node before its first entry applies, a member replaying its log) hears them
        too, and its join handler answers "busy": refusing the handshake would tell a joiner
        it will never be admitted, and it would give up."""
        purpose = Purpose(purpose)
        accept_unknown = purpose is Purpose.JOIN and self.has_master_secret
        responder = Responder(self._handshake_config(accept_unknown), self.state.policy)
        return self._new_session(_Session(responder, purpose, initiator=False))

    def handshake_step(self, session: int, message: bytes, now: float) -> bytes | None:
        """Feed a handshake message; returns the reply to send, if any. Raises on refusal."""
        record = self._sessions.get(session)
        if record is None:
            raise SessionRefused(f"no handshake session {session}")
        if record.party.result is not None:
            raise SessionRefused(f"session {session} has completed its handshake")
        try:
            return record.party.receive(message, now)
        except AttestationError:
            self._sessions.pop(session, None)
            raise

    def session_peer(self, session: int) -> tuple[str, str]:
        """(peer node name, verified platform id) of a completed handshake."""
        result = self._result(session)
        return result.peer_name, result.peer.platform_id

    def close_session(self, session: int) -> None:
        self._sessions.pop(session, None)

    def session_refusal(self, session: int) -> str:
        """Why a Raft session may no longer carry messages under the committed membership and
        policy ("" if it still may): the host closes such links when either changes."""
        record = self._sessions.get(session)
        if record is None or record.party.result is None:
            return f"session {session} has no completed handshake"
        if record.purpose is not Purpose.RAFT:
            return ""
        return peer_refusal(record.party.result, self.state.policy, self.directory())

    def _new_session(self, record: _Session) -> int:
        self._next_session += 1
        self._sessions[self._next_session] = record
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return self._next_session

    def _session(self, session: int, purpose: Purpose, initiator: bool | None) -> _Session:
        record = self._sessions.get(session)
        if record is None or record.party.result is None:
            raise SessionRefused(f"session {session} has no completed handshake")
        if record.purpose is not purpose:
            raise SessionRefused(
                f"session {session} is a {record.purpose.value} session, not {purpose.value}"
            )
        if initiator is not None and record.initiator is not initiator:
            side = "dialled" if initiator else "accepted"
            raise SessionRefused(f"session {session} was not {side} by this enclave")
        return record

    def _result(self, session: int) -> HandshakeResult:
        record = self._sessions.get(session)
        if record is None or record.party.result is None:
            raise SessionRefused(f"session {session} has no completed handshake")
        return record.party.result

    # --- Raft links: this node's messages out on links it dialled, peers' messages in ---------

    def _still_a_peer(self, result: HandshakeResult) -> None:
        """A Raft link lives only as long as its peer belongs and the policy allows what its
        quote showed (a member removed, moved to another platform, or whose platform or
        measurement the policy no longer allows, loses its established links at once, not at
        its next handshake)."""
        reason = peer_refusal(result, self.state.policy, self.directory())
        if reason:
            raise FrameRefused(reason)

    def seal_raft(self, session: int, message: Message) -> bytes:
        """One Raft message from this node to the session's peer, as a channel frame."""
        result = self._session(session, Purpose.RAFT, initiator=True).party.result
        assert result is not None
        self._still_a_peer(result)
        if message.frm != self.name or message.to != result.peer_name:
            raise FrameRefused(
                f"a message {message.frm!r} -> {message.to!r} does not belong on the link "
                f"{self.name!r} -> {result.peer_name!r}"
            )
        return result.channel.seal(encode_message(message))

    def open_raft(self, session: int, frame: bytes) -> Message:
        """The Raft message in a frame from the session's peer (addressed to this node)."""
        result = self._session(session, Purpose.RAFT, initiator=False).party.result
        assert result is not None
        self._still_a_peer(result)
        plaintext = result.channel.open(frame)
        try:
            message = decode_message(plaintext, limits=self.decode_limits)
        except CodecError as exc:
            raise FrameRefused(f"undecodable message from {result.peer_name}: {exc}") from None
        if message.frm != result.peer_name or message.to != self.name:
            raise FrameRefused(
                f"{result.peer_name} sent a message claiming {message.frm!r} -> {message.to!r}"
            )
        return message

    # --- joining ----------------------------------------------------------------------------

    def join_request(
        self, session: int, host: str, peer_port: int, api_port: int, *, refresh: bool = False
    ) -> bytes:
        """The join request of this node (its addresses; its name and platform are the
        enclave's own) as a frame on a join session this enclave dialled. ``refresh``: this
        node is a member asking only for the committed membership (see ``JoinRequest``)."""
        record = self._session(session, Purpose.JOIN, initiator=True)
        if record.join_requested:
            raise SessionRefused(f"session {session} has already carried a join request")
        record.join_requested = True
        assert record.party.result is not None
        body = {
            "name": self.name,
            "host": host,
            "peer_port": peer_port,
            "api_port": api_port,
            "refresh": refresh,
        }
        return record.party.result.channel.seal(json.dumps(body).encode())

    def open_join_request(self, session: int, frame: bytes) -> JoinRequest:
        """A joiner's request, checked: its name is the one its handshake proved, and its
        platform is the one its quote proved (whatever the record says)."""
        record = self._session(session, Purpose.JOIN, initiator=False)
        result = record.party.result
        assert result is not None
        body = _open_join_frame(result, frame, "join request")
        if body.get("name") != result.peer_name:
            raise FrameRefused("join request names another node than the handshake proved")
        host, peer_port, api_port = body.get("host"), body.get("peer_port"), body.get("api_port")
        if not (isinstance(host, str) and 0 < len(host) <= 253):
            raise FrameRefused("join request: host must be a non-empty string")
        for port in (peer_port, api_port):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise FrameRefused("join request: ports must be numbers in 1..65535")
        assert isinstance(peer_port, int) and isinstance(api_port, int)
        refresh = body.get("refresh", False)
        if not isinstance(refresh, bool):
            raise FrameRefused("join request: refresh must be true or false")
        return JoinRequest(
            result.peer_name, result.peer.platform_id, host, peer_port, api_port, refresh
        )

    def join_reply(self, session: int, reply: JoinReply) -> bytes:
        """A member's answer on a join session it accepted. An ``admitted`` answer carries the
        master secret and cluster id, and is sealed only if the committed membership holds the
        joiner on the platform its quote proved; once per session."""
        record = self._session(session, Purpose.JOIN, initiator=False)
        result = record.party.result
        assert result is not None
        if record.join_answered:
            raise SessionRefused(f"session {session} has already been answered")
        body: dict[str, Any] = {
            "status": reply.status,
            "leader": reply.leader,
            "reason": reply.reason[:500],
        }
        if reply.status == "admitted":
            member = self.state.members.get(result.peer_name)
            if member is None or member.platform_id != result.peer.platform_id:
                raise SessionRefused(
                    f"{result.peer_name} on platform {result.peer.platform_id!r} is not a "
                    "committed member: it cannot be sent the master secret"
                )
            body["master_secret"] = self._require_secret().hex()
            body["cluster_id"] = self._cluster_id
            body["members"] = {m.name: m.platform_id for m in self.state.members.values()}
            body["applied_index"] = self.state.applied_index
        elif reply.status not in ("redirect", "busy", "refused"):
            raise SessionRefused(f"unknown join status {reply.status!r}")
        record.join_answered = True
        return result.channel.seal(json.dumps(body).encode())

    def open_join_reply(self, session: int, frame: bytes) -> JoinReply:
        """The member's answer on a join session this enclave dialled; an admission installs
        the master secret and cluster id here (they are not part of what is returned)."""
        record = self._session(session, Purpose.JOIN, initiator=True)
        result = record.party.result
        assert result is not None
        if not record.join_requested or record.join_answered:
            raise SessionRefused(f"session {session} expects no join reply")
        body = _open_join_frame(result, frame, "join reply")
        status = body.get("status")
        if status not in ("admitted", "redirect", "busy", "refused"):
            raise FrameRefused(f"unknown join status {status!r}")
        record.join_answered = True
        if status == "admitted":
            self._install_join_directory(body.get("members"), body.get("applied_index"))
            self._install_secret(body.get("master_secret"), body.get("cluster_id"))
        return JoinReply(str(status), str(body.get("leader") or ""), str(body.get("reason", "")))

    def _install_secret(self, secret_hex: object, cluster_id: object) -> None:
        try:
            secret = bytes.fromhex(str(secret_hex))
        except ValueError:
            raise FrameRefused("the admitted reply carries no readable master secret") from None
        if len(secret) != SECRET_SIZE:
            raise FrameRefused("received master secret has the wrong size")
        if not isinstance(cluster_id, str) or len(cluster_id) != 2 * CLUSTER_ID_SIZE:
            raise FrameRefused("the admitted reply names no cluster id")
        if self._master_secret is not None and (
            self._master_secret != secret or self._cluster_id != cluster_id
        ):
            raise FrameRefused("received a master secret different from the one held")
        self._master_secret = secret
        self._cluster_id = cluster_id

    def _install_join_directory(self, members: object, applied_index: object) -> None:
        if not isinstance(members, dict) or not isinstance(applied_index, int):
            raise FrameRefused("the admitted reply carries no membership")
        if len(members) > MAX_JOIN_MEMBERS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in members.items()
        ):
            raise FrameRefused("the admitted reply's membership is malformed")
        self._join_directory = dict(members)
        self._join_index = applied_index

    # --- ledger signing -----------------------------------------------------------------------

    def ledger_signature(self, now: float) -> LedgerSign:
        """A ``ledger.sign`` command over this enclave's own applied state: the index and chain
        hash signed are the ones this enclave computed, never the caller's (no entry point takes
        a chain hash, an index or bytes to sign). Refused before the enclave belongs to a
        cluster, and once its ledger turned out to belong to another one."""
        index, chain = self._signable_head()
        proof = self._ledger_proof(head_message(index, chain), now)
        return LedgerSign(
            index=index,
            chain_hash=chain.hex(),
            public_key=proof.public_key.hex(),
            quote=proof.quote.hex(),
            signature=proof.signature.hex(),
        )

    def snapshot_capture(self, term: int, now: float) -> Callable[[], bytes]:
        """An image of this enclave's state now, and a function that serialises it later (in a
        worker thread) inside an envelope signed over (applied index, ``term``, chain hash,
        digest of the image), so an offline verifier can tell a genuine snapshot from a
        fabricated one. The index, chain and image are the enclave's own; ``term`` is the Raft
        term of the entry at that index, which the in-enclave driver (not the state) knows: it
        is signed so a verifier can match the snapshot's metadata, and buys nothing else."""
        if not isinstance(term, int) or isinstance(term, bool) or not 0 <= term < 2**63:
            raise EnclaveStateError(f"{term!r} is not a Raft term")
        index, chain = self._signable_head()
        serialise = self.state.snapshot_capture()

        def signed() -> bytes:
            image = serialise()
            message = snapshot_message(index, term, chain, state_digest(image))
            proof = self._ledger_proof(message, now)
            return SignedSnapshot(index, term, chain, proof, image).encode()

        return signed

    def _signable_head(self) -> tuple[int, bytes]:
        state = self.state
        if not state.cluster:
            raise EnclaveStateError("nothing to sign: this enclave belongs to no cluster yet")
        if self.binding_error:
            raise EnclaveStateError(f"refusing to sign this ledger: {self.binding_error}")
        return state.applied_index, state.chain_hash

    def _ledger_proof(self, message: bytes, now: float) -> Proof:
        public = bytes(self._signing_key.verify_key)
        quote = self._context.quote(report_data_for(SIGNER_LABEL, public), now)
        return Proof(public, quote, self._signing_key.sign(message).signature)

    # --- provisioning -----------------------------------------------------------------------

    def new_challenge(self) -> bytes:
        """A fresh local-attestation challenge; only challenges issued here are accepted."""
        challenge = local.new_challenge()
        self._challenges[challenge] = None
        if len(self._challenges) > MAX_OPEN_CHALLENGES:
            # Answers that never came, or releases that never committed: forget the oldest.
            del self._challenges[next(iter(self._challenges))]
        return challenge

    def provision(self, release_id: str, challenge: bytes, response: bytes) -> ProvisionResult:
        """Local attestation of the service enclave, then the released key encrypted to it.

        Only for a release this enclave's replicated state holds as committed, naming this
        node, still awaiting its outcome, and not provisioned before by this enclave: the key
        and generation are the release's, never the caller's. Each challenge is good for one
        attempt, so a recorded response cannot be replayed.
        """
        release = self.state.releases.get(release_id)
        if release is None:
            return ProvisionResult(False, f"no committed release {release_id!r}", "", b"")
        if release.node != self.name:
            return ProvisionResult(False, f"release {release_id} is for {release.node}", "", b"")
        if release.status != "requested" or release_id in self._provisioned:
            return ProvisionResult(False, f"release {release_id} was already handled", "", b"")
        secret = self._require_secret()
        attested = self._attest_service(challenge, response)
        if isinstance(attested, ProvisionResult):
            return attested
        measurement = attested.identity.measurement.hex()
        if not self.state.service_allowed(release.key, measurement):
            return ProvisionResult(
                False, f"service measurement not allowed for key {release.key!r}", measurement, b""
            )
        self._provisioned.add(release_id)
        material = derive_key(secret, release.key, release.generation)
        envelope = {
            "key": release.key,
            "generation": release.generation,
            "material": material.hex(),
        }
        return self._box_to(attested, envelope)

    def contract_input_key(self) -> bytes:
        """The public half of the cluster's contract-input key (X25519), to which callers seal
        their arguments: the same on every node (derived from the master secret), and its
        private half only ever goes to attested service enclaves."""
        return bytes(PrivateKey(contract_key(self._require_secret(), "input", "")).public_key)

    def provision_contract_keys(self, challenge: bytes, response: bytes) -> ProvisionResult:
        """Local attestation of the service enclave, then the contract keys boxed to it: the
        contract-input key and the state key of every contract the committed state holds. The
        committed deploys are the consensus on providing them; the measurement must be one the
        policy allows for service enclaves. Asked again after each deploy (the envelope holds
        every contract's key; the service refuses a held key with other bytes)."""
        secret = self._require_secret()
        attested = self._attest_service(challenge, response)
        if isinstance(attested, ProvisionResult):
            return attested
        # ``_attest_service`` checked the measurement against the policy's service enclaves.
        envelope = {
            "kind": "contracts",
            "input": contract_key(secret, "input", "").hex(),
            "state": {
                name: contract_key(secret, "state", name).hex() for name in self.state.contracts
            },
        }
        return self._box_to(attested, envelope)

    # --- recovery (issue 16) ------------------------------------------------------------------

    def check_snapshot_import(self, data: bytes) -> SnapshotMeta:
        """Judge a snapshot the operator restores into this node's empty directory: a member's
        enclave must have signed exactly this image (its quote under the vendor root, of a KM
        build the policy this enclave starts with allows, on a platform the image names as a
        member's, allowed by the image's own policy), and the image must be at the index and
        chain hash signed. Returns where the Raft log starts; ``EnclaveStateError`` says why
        not. Nothing in it is secret: the master secret comes back through recovery shares."""
        try:
            signed = SignedSnapshot.decode(data)
        except ValueError as exc:
            raise EnclaveStateError(f"the snapshot is damaged: {exc}") from None
        if signed is None:
            raise EnclaveStateError("the snapshot is not signed by any enclave")
        proof = signed.proof
        try:
            quote = Quote.decode(proof.quote)
            self.verifier.verify(
                quote,
                self.state.policy,
                report_data_for(SIGNER_LABEL, proof.public_key),
                role=EnclaveRole.KM,
                now=quote.body.timestamp_ms / 1000,
            )
        except AttestationError as exc:
            raise EnclaveStateError(f"the snapshot's signer is refused: {exc}") from None
        if not signature_holds(proof.public_key, signed.message(), proof.signature):
            raise EnclaveStateError("the snapshot's signature does not verify")
        try:
            image = KMState.restore(signed.state)
        except (ValueError, KeyError, TypeError) as exc:
            raise EnclaveStateError(f"the snapshot's image does not parse ({exc})") from None
        if (image.applied_index, image.chain_hash) != (signed.index, signed.chain_hash):
            raise EnclaveStateError("the snapshot's image is not the one that was signed")
        body = quote.body
        if not any(m.platform_id == body.platform_id for m in image.members.values()):
            raise EnclaveStateError("the snapshot was signed on a platform that hosted no member")
        if body.identity.measurement not in image.policy.measurements_for(EnclaveRole.KM):
            raise EnclaveStateError("the snapshot was signed by a build its own policy refuses")
        if self.name not in image.members:
            raise EnclaveStateError(f"the snapshot's cluster has no member {self.name!r}")
        voters = tuple(sorted(image.members))
        return SnapshotMeta(signed.index, signed.term, ConfState(voters=voters))

    def recovery_split(self, now: float) -> RecoveryShares:
        """The split of the master secret the replicated state asks for (holders, their keys,
        threshold and generation all from the committed identities, never from the caller),
        each share boxed to its holder, signed with the ledger-signing key under a quote;
        ``EnclaveStateError`` if none is due."""
        due = self.state.recovery.due(self.state.identities)
        if due is None:
            raise EnclaveStateError("no recovery split is due")
        made = split(
            self._require_secret(),
            due.holders,
            due.threshold,
            cluster_id=self._cluster_id,
            generation=due.generation,
        )
        proof = self._ledger_proof(split_message(canonical_split(made)), now)
        return RecoveryShares(
            recovery_set=made,
            public_key=proof.public_key.hex(),
            quote=proof.quote.hex(),
            signature=proof.signature.hex(),
        )

    def recovery_session(self, sealed: bytes | None) -> bytes:
        """Begin this enclave's recovery session (``sealed`` None: a fresh random seed), or
        resume it after a restart (the blob this returned before); returns the sealed session
        for the host to keep until the recovery is over (``SealingError`` if ``sealed`` is not
        this enclave's). The recovery key derives from it: shares boxed in an earlier recovery,
        which the ledger keeps, never open in a later one, so each loss needs its own shares."""
        if sealed is None:
            seed = nacl.utils.random(SECRET_SIZE)
        else:
            try:
                data = json.loads(unseal(self._context, sealed))
                if data.get("name") != self.name or data.get("kind") != "recovery-session":
                    raise SealingError("the sealed blob is not this node's recovery session")
                seed = bytes.fromhex(data["seed"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise SealingError("the recovery session does not parse") from None
            if len(seed) != SECRET_SIZE:
                raise SealingError("the recovery session has the wrong size")
        self._recovery_seed = seed
        if sealed is not None:
            return sealed
        payload = {"kind": "recovery-session", "name": self.name, "seed": seed.hex()}
        return seal(self._context, json.dumps(payload).encode())

    def _recovery_box(self) -> PrivateKey:
        """This enclave's recovery key: derived from its sealing key (only this code on this
        platform holds it) and its recovery session (the same after a restart in the middle of
        a recovery, another in the next one)."""
        if not self._recovery_seed:
            raise EnclaveStateError("no recovery session: this node is not recovering")
        seed = hashlib.blake2b(
            RECOVERY_KEY_LABEL + self.name.encode() + self._recovery_seed,
            key=self._context.seal_key(),
            digest_size=32,
        ).digest()
        return PrivateKey(seed)

    def recovery_key(self, now: float) -> tuple[str, bytes]:
        """(X25519 public key hex, a quote binding it to this node) that holders box their
        shares to; ``kmctl recovery submit`` verifies the quote before it boxes anything."""
        public = bytes(self._recovery_box().public_key)
        binding = recovery_report_data(self.name, public)
        return public.hex(), self._context.quote(binding, now)

    def _open_recovery_box(self, holder: str, boxes: Mapping[str, str]) -> Share:
        """``holder``'s share from the box addressed to this node, checked against the
        current split's commitment (``BogusShare`` naming the holder otherwise)."""
        current = self.state.recovery.current
        if current is None:
            raise RecoveryError("the ledger holds no recovery split")
        boxed = boxes.get(self.name)
        if boxed is None:
            raise RecoveryError(f"the share of {holder!r} is not boxed to node {self.name!r}")
        entry = current.entry(holder)
        try:
            value = SealedBox(self._recovery_box()).decrypt(base64.b64decode(boxed))
        except (CryptoError, ValueError):
            raise BogusShare(holder) from None
        share = Share(holder, entry.index, value)
        check_share(current, holder, share)
        return share

    def check_recovery_share(self, holder: str, generation: int, boxes: Mapping[str, str]) -> None:
        """Before a submitted share is proposed: refuse it at once if this enclave does not
        need it, it is for another split, or it does not match its holder's commitment."""
        if self._master_secret is not None:
            raise EnclaveStateError("this node holds the master secret: it is not recovering")
        current = self.state.recovery.current
        if current is None:
            raise RecoveryError("the ledger holds no recovery split")
        if generation != current.generation:
            raise RecoveryError(
                f"a share of split {generation}; the ledger's split is {current.generation}"
            )
        self._open_recovery_box(holder, boxes)

    def recover(self) -> str:
        """Once the ledger holds enough shares: rebuild the master secret from the boxes
        addressed to this node, check it against the ledger's commitment, and take it up
        (the node then seals it anew). Returns "" or why this enclave could not."""
        recovery, state = self.state.recovery, self.state
        current = recovery.current
        if self._master_secret is not None or current is None or not recovery.complete_index:
            return ""
        shares, problems = [], []
        for holder, submission in recovery.submitted.items():
            try:
                shares.append(self._open_recovery_box(holder, submission.boxes))
            except RecoveryError as exc:
                problems.append(str(exc))
        try:
            master = combine(current, shares)
        except RecoveryError as exc:
            return "; ".join([str(exc), *problems])
        if master_commitment(state.cluster_id, master) != recovery.master_commitment:
            return "the rebuilt secret does not match the ledger's commitment"
        self._master_secret = master
        self._cluster_id = state.cluster_id
        self._genesis_hash = state.genesis_hash.hex()
        self.sealed_dirty = True
        return ""

    # --- data authorization (issue 15) ------------------------------------------------------

    def data_public_keys(self) -> dict[str, str]:
        """The cluster's data-wrap key (X25519: owners seal their data keys to it) and token
        verification key (Ed25519), hex: the same on every node."""
        secret = self._require_secret()
        wrap = PrivateKey(data_key(secret, "wrap")).public_key
        token = SigningKey(data_key(secret, "token")).verify_key
        return {"wrap_key": bytes(wrap).hex(), "token_key": bytes(token).hex()}

    def token_signature(self, token_id: str) -> tuple[bytes, str]:
        """A committed token's canonical bytes and their Ed25519 signature (hex) under the
        cluster's token key: deterministic, so every node gives the same bytes."""
        token = self.state.data.tokens.get(token_id)
        if token is None:
            raise EnclaveStateError(f"no committed token {token_id!r}")
        body = token.body()
        signature = SigningKey(data_key(self._require_secret(), "token")).sign(body).signature
        return body, signature.hex()

    def attested_measurement(self, challenge: bytes, response: bytes) -> str:
        """The measurement of our service enclave, checked by local attestation (what this node
        reports in ``service.measured``); "" if the answer does not hold."""
        attested = self._attest_service(challenge, response)
        if isinstance(attested, ProvisionResult):
            return ""
        return attested.identity.measurement.hex()

    def provision_data_jobs(
        self, token_ids: Sequence[str], challenge: bytes, response: bytes
    ) -> DataJobs:
        """Local attestation of the service enclave, then a batch of computations' material
        boxed to it: for each token its signed body, the dataset's data key (unwrapped here
        from the committed registration), the sealed parameters, the operation's code if it
        is WebAssembly (once per module), and the input key that opens the parameters.

        Decided from this enclave's own committed state only, token by token: it must name
        this node, still be ``issued``, not handed over before by this enclave, its grant
        unrevoked, its expiry not reached on the state's clock, and the attested service must
        run the measurement it binds; a token that fails is refused with the reason and the
        rest go on. The box holds at most ``MAX_JOB_ENVELOPE`` bytes: tokens past it are
        ``left`` for another batch, untouched.
        """
        token_ids = list(dict.fromkeys(token_ids))  # a token named twice is one job
        secret = self._require_secret()
        attested = self._attest_service(challenge, response)
        if isinstance(attested, ProvisionResult):
            return DataJobs(attested, {t: attested.reason for t in token_ids}, [])
        measurement = attested.identity.measurement.hex()
        data = self.state.data
        refused: dict[str, str] = {}
        jobs: list[dict[str, Any]] = []
        codes: dict[str, str] = {}
        deks: dict[str, bytes] = {}
        left: list[str] = []
        size = 0
        for token_id in token_ids:
            if size > MAX_JOB_ENVELOPE:
                left.append(token_id)
                continue
            token = data.tokens.get(token_id)
            reason = self._job_refusal(token_id, measurement)
            if reason:
                refused[token_id] = reason
                continue
            assert token is not None
            dataset = data.datasets[token.dataset]
            dek = deks.get(dataset.name)
            if dek is None:
                try:
                    wrapped = base64.b64decode(dataset.wrapped_key, validate=True)
                    dek = SealedBox(PrivateKey(data_key(secret, "wrap"))).decrypt(wrapped)
                except (ValueError, CryptoError):
                    refused[token_id] = f"the data key of {dataset.name!r} does not unwrap"
                    continue
                deks[dataset.name] = dek
            self._jobs.add(token_id)
            body, signature = self.token_signature(token_id)
            job: dict[str, Any] = {
                "token": body.decode(),
                "signature": signature,
                "dek": dek.hex(),
                "sealed": token.sealed,
                "nonce": token.nonce,
                "privacy": dataset.privacy,
                "min_group_size": dataset.min_group_size,
            }
            registered = data.ops.get(token.op)
            if registered is not None:  # WebAssembly: its code, which the token binds
                job["op_version"] = registered.version
                if registered.checksum not in codes:
                    codes[registered.checksum] = registered.code
                    size += len(registered.code)
            size += len(body) + len(token.sealed) + 256
            jobs.append(job)
        if not jobs:
            return DataJobs(
                ProvisionResult(False, "no job to hand over", measurement, b""), refused, left
            )
        envelope = {
            "kind": "data",
            "input": contract_key(secret, "input", "").hex(),
            "jobs": jobs,
            "codes": codes,
        }
        return DataJobs(self._box_to(attested, envelope), refused, left)

    def _job_refusal(self, token_id: str, measurement: str) -> str:
        """Why token ``token_id`` is not handed to a service at ``measurement`` ("" if it is)."""
        data = self.state.data
        token = data.tokens.get(token_id)
        if token is None:
            return f"no committed token {token_id!r}"
        if token.node != self.name:
            return f"token {token_id} is for {token.node}"
        if token.state != "issued" or token_id in self._jobs:
            return f"token {token_id} was already used"
        grant = data.grants.get(token.grant)
        if grant is None or grant.revoked_index:
            return f"grant {token.grant} was revoked"
        if self.state.newest_request >= token.expires_at:
            return f"token {token_id} expired"
        if measurement != token.measurement:
            return (
                f"service enclave runs {measurement[:16]}..., the token binds "
                f"{token.measurement[:16]}..."
            )
        return ""

    def _attest_service(
        self, challenge: bytes, response: bytes
    ) -> LocallyAttested | ProvisionResult:
        """Check a local-attestation answer to a challenge this enclave issued (each good for
        one attempt, so a recorded response cannot be replayed); a refusal as the result."""
        if challenge not in self._challenges:
            return ProvisionResult(False, "challenge was not issued by this enclave", "", b"")
        del self._challenges[challenge]
        try:
            return local.verify_response(self._context, challenge, response, self.state.policy)
        except AttestationError as exc:
            return ProvisionResult(False, f"{type(exc).__name__}: {exc}", "", b"")

    def _box_to(self, attested: LocallyAttested, envelope: dict[str, Any]) -> ProvisionResult:
        """``envelope`` boxed to the attested service enclave, with this enclave's vouch for the
        box key it used."""
        ciphertext = self._boxes.seal(attested.public_key, json.dumps(envelope).encode())
        vouch = local.vouch(
            self._context, attested.identity.measurement, self._boxes.public, attested.public_key
        )
        measurement = attested.identity.measurement.hex()
        return ProvisionResult(True, "", measurement, bytes(ciphertext), vouch)

    def __repr__(self) -> str:
        return f"KMEnclave({self.name!r}, has_master_secret={self.has_master_secret})"
