"""Names inside a node's data directory, shared by the node and by the tools that inspect or
damage it (chaos faults, the replacement flow). A module of its own, without imports, so
host-side tooling can name these files without pulling in enclave code."""

#: The KM enclave's sealed state; only that enclave on that platform can open it.
SEALED_STATE = "enclave.sealed"
#: The Raft log and snapshots.
RAFT_DIR = "raft"
#: Written into an empty data directory by `kmctl chaos replace` (and anyone who re-creates a
#: member): "this node belongs to an existing cluster; join it". Without it an empty directory
#: on the first node of cluster.yaml means genesis, and a replaced first node would found a
#: second cluster with a different master secret.
JOIN_MARKER = "join-existing"
#: Written by `kmctl up --recover` / `kmctl node run NAME --recover`: "this node's sealed state
#: is lost; replay the ledger and wait for recovery shares". Removed once the node has rebuilt
#: the master secret and sealed it. Without it, a Raft log without sealed state is refused.
RECOVER_MARKER = "recover"
#: The KM enclave's sealed recovery session (its recovery key derives from it): kept while the
#: node recovers, so a restart mid-ceremony keeps the shares boxed to it; removed once done.
RECOVERY_SESSION = "recovery.session"
#: Written by `kmctl snapshot restore` into an empty data directory: a signed snapshot the KM
#: enclave checks and takes as the start of its Raft log at its next start (then removed).
RESTORE_SNAPSHOT = "restore.snapshot"
#: Node data directories, under the cluster's state directory.
NODES_DIR = "nodes"
#: Dataset blobs (ciphertext, named by their sha256) in a node's data directory: the host
#: keeps them, the service enclave reads and checks them (issue 15).
BLOB_DIR = "blobs"
