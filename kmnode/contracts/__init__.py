"""Confidential contracts (issue 14): a WebAssembly VM with fuel metering, the service
enclave's internal cache hash table over contract state, sealed and verified state, the call
envelope, and the store's wire protocol. A library the service enclave, tests and benchmarks
drive alike: the only I/O here is ``store_wire.StoreClient``, on a socket it is given."""
