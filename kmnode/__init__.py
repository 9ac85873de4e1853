"""The KM node: untrusted host, KM enclave, service enclave, ring buffer, API and CLI."""
