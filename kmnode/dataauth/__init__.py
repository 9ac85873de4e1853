"""Data authorization's pure library (issue 15, S5): what a data owner does to a dataset before
registering it (``blob``), the dataset's plaintext format (``table``), and the predetermined
operations a service enclave may run over it (``ops``).

No I/O here, no clock and no randomness but a new data key and a nonce: the replicated
commands, the KM enclave and the service enclave drive these functions, and every node that
runs an operation over the same bytes returns the same bytes.
"""
