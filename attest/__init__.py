"""Simulated TEE hardware and attestation: pure functions and state machines, no I/O."""
