"""Service-enclave logic: answer local attestation, accept provisioned keys, run workloads.

Keys arrive in a box (``attest.keybox``) to an X25519 key pair generated inside this enclave
and bound into its local-attestation report, so only this enclave instance can open them; and
each comes with the KM enclave's own local report vouching for the box key it was sealed with,
so a key boxed by anyone else (the host knows this enclave's public key too) is refused.

The first vouched delivery pins the KM enclave's box key for the lifetime of this instance:
afterwards keys come from that KM enclave instance only, so a second genuine KM enclave the
host starts on the same platform (say, one restored from an older sealed state that still
allows what was since revoked) cannot feed this enclave keys. A key it holds is never replaced:
the same name and generation with other bytes is refused, and the held key stays.

The workload used by the tests and benchmarks proves possession of a key without revealing it:
a MAC of a challenge under a key derived from the released key for that purpose alone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Collection

from attest import local
from attest.errors import AttestationError
from attest.hardware import EnclaveContext
from attest.keybox import KeyBoxError, KeyBoxes


class ProvisioningError(Exception):
    """A provisioned key could not be accepted (wrong recipient, corrupt, malformed)."""


#: Personalisation of the proof key's derivation (see ``proof_key``).
PROOF_PERSON = b"kmsim-proof-v1"
#: A key name as the KM state machine allows it (``kmnode.km.commands.Name``).
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_SIZE = 32
#: A contract's name as the KM state machine allows it (``commands.ContractName``).
_CONTRACT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def proof_key(material: bytes) -> bytes:
    """The key proofs of possession are MACed with: derived from the released key, for proofs
    alone. Whoever asks for proofs chooses the challenge, so a proof under the operational
    key itself would be a MAC oracle for it (sign any message a workload would MAC); under a
    derived key it says only "this enclave holds the key", equal across enclaves iff their
    keys are."""
    return hashlib.blake2b(key=material, person=PROOF_PERSON, digest_size=32).digest()


class ServiceEnclave:
    """``trusted_km``: the KM measurements whose boxes this enclave opens (its own build's)."""

    def __init__(self, context: EnclaveContext, trusted_km: Collection[bytes]) -> None:
        self.context = context
        self._trusted_km = frozenset(trusted_km)
        self._boxes = KeyBoxes()
        self._keys: dict[tuple[str, int], bytes] = {}
        self._proof_keys: dict[tuple[str, int], bytes] = {}
        #: The box key of the KM enclave instance this enclave takes keys from (pinned by the
        #: first vouched delivery).
        self._km_box_key: bytes | None = None

    def answer_challenge(self, km_measurement: bytes, challenge: bytes) -> bytes:
        """Local attestation response for our node's KM enclave."""
        return local.respond(self.context, km_measurement, challenge, self._boxes.public)

    def _open_vouched(self, ciphertext: bytes, vouch: bytes) -> tuple[bytes, object]:
        """(sender, envelope) of a box from a KM enclave that vouched for its box key (a local
        report from this platform, for this enclave, by a trusted KM measurement), from the
        KM enclave instance pinned by the first delivery; ``ProvisioningError`` otherwise."""
        try:
            sender = KeyBoxes.sender(ciphertext)
            local.verify_vouch(self.context, vouch, self._trusted_km, sender, self._boxes.public)
        except (AttestationError, KeyBoxError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ProvisioningError(f"provisioned key rejected: {reason}") from None
        if self._km_box_key is not None and sender != self._km_box_key:
            raise ProvisioningError(
                "provisioned key rejected: it comes from another KM enclave instance than the "
                "one this service enclave attested with first"
            )
        try:
            return sender, json.loads(self._boxes.open(ciphertext))
        except (KeyBoxError, ValueError) as exc:
            raise ProvisioningError(f"provisioned key rejected: {type(exc).__name__}") from None

    def accept_key(self, ciphertext: bytes, vouch: bytes) -> tuple[str, int]:
        """Open a vouched key box (``_open_vouched``) and hold the key. ``ProvisioningError``
        names what is wrong, and nothing changes."""
        sender, envelope = self._open_vouched(ciphertext, vouch)
        try:
            assert isinstance(envelope, dict)
            name, generation = envelope["key"], envelope["generation"]
            material = bytes.fromhex(envelope["material"])
        except (AssertionError, ValueError, KeyError, TypeError) as exc:
            raise ProvisioningError(f"provisioned key rejected: {type(exc).__name__}") from None
        if (
            not isinstance(name, str)
            or not _KEY_NAME.fullmatch(name)
            or type(generation) is not int
            or not 1 <= generation < 2**63
            or len(material) != _KEY_SIZE
        ):
            raise ProvisioningError("provisioned key envelope is malformed")
        held = self._keys.get((name, generation))
        if held is not None and not hmac.compare_digest(held, material):
            raise ProvisioningError(
                f"provisioned key rejected: {name!r} generation {generation} is already held "
                "with other key material (the held key stays)"
            )
        self._km_box_key = sender
        self._keys[(name, generation)] = material
        self._proof_keys[(name, generation)] = proof_key(material)
        return name, generation

    def accept_contract_keys(
        self, ciphertext: bytes, vouch: bytes
    ) -> tuple[bytes, dict[str, bytes]]:
        """Open a vouched box of contract keys: (contract-input key, state keys by contract).
        The caller installs them (``ContractRuntime.install_keys``, which refuses a held key
        with other bytes)."""
        sender, envelope = self._open_vouched(ciphertext, vouch)
        try:
            assert isinstance(envelope, dict) and envelope["kind"] == "contracts"
            state = envelope["state"]
            assert isinstance(state, dict) and len(state) <= 4096
            keys = {str(name): bytes.fromhex(key) for name, key in state.items()}
            input_key = bytes.fromhex(envelope["input"])
        except (AssertionError, ValueError, KeyError, TypeError) as exc:
            raise ProvisioningError(f"contract keys rejected: {type(exc).__name__}") from None
        if len(input_key) != _KEY_SIZE or any(
            len(k) != _KEY_SIZE or not _CONTRACT_NAME.fullmatch(n) for n, k in keys.items()
        ):
            raise ProvisioningError("contract keys envelope is malformed")
        self._km_box_key = sender
        return input_key, keys

    def open_envelope(self, ciphertext: bytes, vouch: bytes, kind: str) -> dict[str, object]:
        """Open a vouched box whose envelope says it is a ``kind`` (``data``: one computation's
        material); the caller parses the rest. ``ProvisioningError`` otherwise."""
        sender, envelope = self._open_vouched(ciphertext, vouch)
        if not isinstance(envelope, dict) or envelope.get("kind") != kind:
            raise ProvisioningError(f"provisioned envelope rejected: not a {kind} envelope")
        self._km_box_key = sender
        return envelope

    def holds(self, name: str, generation: int) -> bool:
        return (name, generation) in self._keys

    def prove(self, name: str, generation: int, challenge: bytes) -> str:
        """HMAC-BLAKE2b of ``challenge`` under the key's proof key (``proof_key``)."""
        key = self._proof_keys.get((name, generation))
        if key is None:
            raise ProvisioningError(f"no key {name!r} generation {generation} provisioned")
        return hmac.new(key, challenge, hashlib.blake2b).hexdigest()

    def __repr__(self) -> str:
        return f"ServiceEnclave(platform={self.context.platform_id!r}, keys={len(self._keys)})"
