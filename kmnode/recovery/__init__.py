"""Disaster recovery's pure library (issue 16): the k-of-n recovery shares of the master secret.

If every node loses its sealed state (or every node runs a KM build that cannot unseal it), the
master secret survives only as shares held by recovery operators. This package splits it, boxes
each share to its holder, checks a submitted share at once against a public commitment, and
rebuilds the secret from enough of them (``shares``).

No I/O here, no clock, no network, no Raft: the KM enclave and the CLI drive these functions.
"""
