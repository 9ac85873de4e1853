"""Typed attestation failures.

Every check that can fail has its own exception class, so a caller (and a test) can tell a
forged signature from a stale quote without parsing messages, and an operator reading a log
line knows exactly which rule refused a peer. Messages never include secret material.
"""

from __future__ import annotations


class AttestationError(Exception):
    """Base class: something presented as evidence of a trusted enclave was not accepted."""


# --- encoding ---------------------------------------------------------------------------------


class MalformedEvidence(AttestationError):
    """Bytes that should be a quote, certificate, report or message do not parse."""


# --- quote verification -----------------------------------------------------------------------


class UntrustedCertificate(AttestationError):
    """The platform certificate is not signed by the vendor root we trust."""


class BadSignature(AttestationError):
    """The quote body is not signed by the attestation key its certificate names."""


class CertificateMismatch(AttestationError):
    """The quote claims a platform or TCB status that its own certificate does not state."""


class RevokedPlatform(AttestationError):
    """The quote comes from a platform the policy has revoked."""


class TcbNotAccepted(AttestationError):
    """The platform's TCB status is not one the policy accepts."""


class UnknownMeasurement(AttestationError):
    """The enclave's measurement is not allowed for the role it claims."""


class SecurityVersionTooLow(AttestationError):
    """The enclave's security version is below the policy's minimum."""


class StaleQuote(AttestationError):
    """The quote is older than the policy's maximum age, or dated in the future."""


class ReportDataMismatch(AttestationError):
    """The quote's report data does not bind what the verifier expected (key, nonce)."""


# --- handshake --------------------------------------------------------------------------------


class HandshakeError(AttestationError):
    """The mutual attestation handshake cannot continue."""


class UnexpectedHandshakeMessage(HandshakeError):
    """A message arrived that this side of the handshake is not waiting for (or a duplicate)."""


class HandshakeReplay(HandshakeError):
    """The peer's quote is valid but bound to another session's nonce or key: a replay."""


class PeerIdentityMismatch(HandshakeError):
    """The peer's quote is valid but from a platform other than the node it claims to be."""


class UnknownPeer(HandshakeError):
    """The peer names a node that is not in the cluster's membership."""


class SelfSession(HandshakeError):
    """The peer is this very enclave (same name or same platform): a host talking to itself.

    Such a channel would let the host drive both ends of an "attested" session, so it is
    refused whatever the directory says.
    """


# --- channel ----------------------------------------------------------------------------------


class ChannelError(AttestationError):
    """A frame on an attested channel was refused; the channel state is unchanged."""


class FrameTampered(ChannelError):
    """Authentication failed: the frame was modified, truncated, or reflected back to us."""


class FrameReflected(FrameTampered):
    """The frame was encrypted with our own sending key: someone sent it back to us."""


class FrameReplayed(ChannelError):
    """The frame's counter was already received."""


class FrameReordered(ChannelError):
    """The frame's counter skips ahead: an earlier frame is missing or was held back."""


class ChannelExhausted(ChannelError):
    """The send counter reached its limit; a new handshake is required."""


# --- local attestation ------------------------------------------------------------------------


class LocalAttestationError(AttestationError):
    """A local report from a service enclave was not accepted."""


class ReportNotFromThisPlatform(LocalAttestationError):
    """The report's MAC does not verify with this platform's report key for us as target."""


class ChallengeMismatch(LocalAttestationError):
    """The report does not bind the challenge we issued (stale or replayed report)."""


# --- sealing ----------------------------------------------------------------------------------


class SealingError(AttestationError):
    """Sealed data cannot be opened by this enclave on this platform."""


class SealedOnOtherPlatform(SealingError):
    """The blob was sealed on another platform; only that platform can open it."""


class SealedByOtherEnclave(SealingError):
    """The blob was sealed by an enclave with another measurement."""


class SealedDataCorrupt(SealingError):
    """The blob fails authentication: it was modified after sealing."""
