"""Confidential contracts (issue 14): a WebAssembly VM with fuel metering, the service
enclave's internal cache hash table over contract state, and what they share. A pure library:
nothing here does I/O, so the service enclave, tests and benchmarks drive it alike."""
