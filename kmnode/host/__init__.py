"""The untrusted host side of a KM node: never sees plaintext key material."""
