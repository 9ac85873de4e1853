"""The service enclave: receives keys after local attestation and runs workloads with them."""
