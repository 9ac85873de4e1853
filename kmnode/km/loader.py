"""Loading a node's KM enclave onto its simulated platform.

This is the one place on the KM side that touches the simulated hardware store: the host asks
for "the KM enclave of node X" and gets an enclave object, never a platform or a seed.
"""

from __future__ import annotations

from attest.identity import EnclaveRole
from attest.quote import QuoteVerifier
from kmnode.config import ClusterConfig
from kmnode.enclave_code import build_identity, current_measurements
from kmnode.km.enclave import KMEnclave
from kmnode.simhw import HardwareStore


def load_km_enclave(config: ClusterConfig, name: str) -> KMEnclave:
    node = config.node(name)
    store = HardwareStore(config.state_dir / "hardware")
    platform = store.platform(node.platform.id, node.platform.tcb)
    enclave = KMEnclave(
        name,
        platform.enclave(build_identity(EnclaveRole.KM)),
        QuoteVerifier(store.vendor_public_key()),
        # Whom to talk to before the enclave belongs to a cluster (joining): the configured
        # nodes. From the first committed entry on, only the replicated membership counts.
        bootstrap={n.name: n.platform.id for n in config.nodes},
    )
    # Until the replicated policy arrives (genesis or the join's log), judge peers by the
    # policy in cluster.yaml: a joining node must verify the member it joins through.
    enclave.state.policy = config.policy.resolve(current_measurements())
    return enclave
