"""Loading a node's KM enclave onto its simulated platform.

This is the one place on the KM side that touches the simulated hardware store: the KM enclave
process asks for "the KM enclave of node X" (and the key of its stored records) and gets an
enclave object, never a platform or a seed.
"""

from __future__ import annotations

import hashlib

from attest.hardware import EnclaveContext
from attest.identity import EnclaveRole
from attest.quote import QuoteVerifier
from consensus.recordauth import TAG_SIZE
from kmnode.config import ClusterConfig
from kmnode.enclave_code import build_identity, current_measurements
from kmnode.km.enclave import KMEnclave
from kmnode.simhw import HardwareStore

#: Label of the key that authenticates this node's Raft log records and snapshots.
_LOG_KEY_LABEL = b"kmsim raft log records\0"


class LogAuth:
    """Tags of this node's stored Raft records (``consensus.recordauth.RecordAuth``), under a
    key derived from the KM enclave's signer sealing key and the node's name: only a KM build of
    our signer on this platform, for this node, computes them. The signer's key and not the
    build's: a new KM build must be able to check the log it recovers a cluster from (issue
    16); the log holds no secret, and the tags guard it against the host, not against our own
    builds. The key stays inside the KM enclave process."""

    def __init__(self, seal_key: bytes, node: str) -> None:
        self._key = hashlib.blake2b(
            _LOG_KEY_LABEL + node.encode(), key=seal_key, digest_size=32
        ).digest()

    def tag(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=TAG_SIZE).digest()

    def __repr__(self) -> str:
        return "LogAuth(<key withheld>)"


def _km_context(config: ClusterConfig, name: str) -> EnclaveContext:
    node = config.node(name)
    store = HardwareStore(config.state_dir / "hardware")
    platform = store.platform(node.platform.id, node.platform.tcb)
    return platform.enclave(build_identity(EnclaveRole.KM))


def load_km(config: ClusterConfig, name: str) -> tuple[KMEnclave, LogAuth]:
    """Node ``name``'s KM enclave and the authenticator of its Raft log, from one load of
    its platform (what the KM enclave process starts with)."""
    context = _km_context(config, name)
    return _km_enclave(config, name, context), LogAuth(context.signer_seal_key(), name)


def load_km_enclave(config: ClusterConfig, name: str) -> KMEnclave:
    return _km_enclave(config, name, _km_context(config, name))


def _km_enclave(config: ClusterConfig, name: str, context: EnclaveContext) -> KMEnclave:
    store = HardwareStore(config.state_dir / "hardware")
    enclave = KMEnclave(
        name,
        context,
        QuoteVerifier(store.vendor_public_key()),
        # Whom to talk to before the enclave belongs to a cluster (joining): the configured
        # nodes. From the first committed entry on, only the replicated membership counts.
        bootstrap={n.name: n.platform.id for n in config.nodes},
    )
    # Until the replicated policy arrives (genesis or the join's log), judge peers by the
    # policy in cluster.yaml: a joining node must verify the member it joins through.
    enclave.state.policy = config.policy.resolve(current_measurements())
    return enclave
