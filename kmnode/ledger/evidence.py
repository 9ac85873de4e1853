"""Judging a ledger signature's evidence: is it a genuine enclave's (quote under the vendor
root, binding the key that signed), and does its enclave count at that point of the ledger
(a member's platform, allowed by that point's policy)? Two questions, because a genuine
signature of a non-member is merely not counted, while evidence that is not genuine is forged."""

from __future__ import annotations

from attest.certs import TcbStatus
from attest.errors import AttestationError
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import Quote, QuoteVerifier, report_data_for
from kmnode.km.ledger_proof import SIGNER_LABEL, Proof, signature_holds
from kmnode.km.state import KMState


def not_genuine(proof: Proof, message: bytes, verifier: QuoteVerifier) -> str | None:
    """None if ``proof`` is a genuine enclave's signature over ``message``, else why not: the
    quote is certified under the vendor root and binds the key, and the key signed it. Who
    the enclave is (measurement, platform) is the caller's to judge."""
    try:
        body = Quote.decode(proof.quote).body
        any_enclave = Policy(
            km_measurements=frozenset({body.identity.measurement}),
            accepted_tcb=frozenset(TcbStatus),
        )
        verifier.verify(
            proof.quote,
            any_enclave,
            report_data_for(SIGNER_LABEL, proof.public_key),
            role=EnclaveRole.KM,
            now=body.timestamp_ms / 1000.0,
        )
    except AttestationError as exc:
        return f"signer's quote refused: {type(exc).__name__}: {exc}"
    if not signature_holds(proof.public_key, message, proof.signature):
        return "signature does not verify under the attested signing key"
    return None


def not_counted(proof: Proof, state: KMState, verifier: QuoteVerifier) -> str | None:
    """None if a genuine signer was a member's enclave that ``state``'s policy allows."""
    body = Quote.decode(proof.quote).body
    try:
        verifier.verify(
            proof.quote,
            state.policy,
            report_data_for(SIGNER_LABEL, proof.public_key),
            role=EnclaveRole.KM,
            now=body.timestamp_ms / 1000.0,
        )
    except AttestationError as exc:
        return f"the policy then refused its enclave ({type(exc).__name__}: {exc})"
    if not any(m.platform_id == body.platform_id for m in state.members.values()):
        return f"platform {body.platform_id!r} hosted no member then"
    return None
