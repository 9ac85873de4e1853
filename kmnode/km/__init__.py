"""The KM enclave: everything here runs inside the (simulated) TEE and is measured."""
