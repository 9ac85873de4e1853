"""Property: flipping any bit of attestation evidence is rejected, never accepted or a crash."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attest import errors
from attest.certs import TcbStatus
from attest.channel import SecureChannel
from attest.handshake import Initiator, Responder
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveRole
from attest.policy import Policy
from attest.quote import QuoteVerifier, report_data_for

from .conftest import KM, NOW, SERVICE, World, seed

VENDOR = VendorRoot(seed("vendor"))
PLATFORMS = {n: Platform(n, TcbStatus.UP_TO_DATE, seed(n), VENDOR) for n in ("a", "b", "c")}
POLICY = Policy(
    km_measurements=frozenset({KM.measurement}),
    service_measurements=frozenset({SERVICE.measurement}),
    min_svn=2,
)
WORLD = World(VENDOR, PLATFORMS, POLICY, QuoteVerifier(VENDOR.public_key))
RD = report_data_for(b"prop", b"x")
QUOTE = PLATFORMS["a"].enclave(KM).quote(RD, NOW)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flip(data: bytes, bit: int) -> bytes:
    index = bit % (len(data) * 8)
    out = bytearray(data)
    out[index // 8] ^= 1 << (index % 8)
    return bytes(out)


@SETTINGS
@given(bit=st.integers(min_value=0))
def test_flipped_quote_is_rejected(bit: int) -> None:
    verifier = QuoteVerifier(VENDOR.public_key)  # fresh cache: certificate bits are checked too
    try:
        verifier.verify(flip(QUOTE, bit), POLICY, RD, role=EnclaveRole.KM, now=NOW)
    except errors.AttestationError:
        return
    raise AssertionError(f"quote with bit {bit % (len(QUOTE) * 8)} flipped was accepted")


@SETTINGS
@given(which=st.sampled_from(["hello", "answer", "finish"]), bit=st.integers(min_value=0))
def test_flipped_handshake_message_is_rejected(which: str, bit: int) -> None:
    initiator = Initiator(WORLD.hs_config("a"), POLICY, "node-b")
    responder = Responder(WORLD.hs_config("b"), POLICY)
    hello = initiator.start()
    try:
        if which == "hello":
            hello = flip(hello, bit)
        answer = responder.receive(hello, NOW)
        assert answer is not None
        if which == "answer":
            answer = flip(answer, bit)
        finish = initiator.receive(answer, NOW)
        if which == "finish":
            finish = flip(finish, bit)
        responder.receive(finish, NOW)
    except errors.AttestationError:
        return
    # A flipped HELLO may still complete a handshake only if both sides then disagree on
    # keys, so no frame can pass between them: check that instead of accepting silently.
    assert which == "hello" and initiator.result and responder.result
    frame = initiator.result.channel.seal(b"payload")
    try:
        responder.result.channel.open(frame)
    except errors.ChannelError:
        return
    raise AssertionError("a handshake with a flipped HELLO produced a working channel")


@SETTINGS
@given(bit=st.integers(min_value=0), payload=st.binary(max_size=64))
def test_flipped_channel_frame_is_rejected(bit: int, payload: bytes) -> None:
    sender = SecureChannel(b"\x01" * 32, b"\x02" * 32, "b")
    receiver = SecureChannel(b"\x02" * 32, b"\x01" * 32, "a")
    frame = sender.seal(payload)
    try:
        receiver.open(flip(frame, bit))
    except errors.ChannelError:
        assert receiver.open(frame) == payload
        return
    raise AssertionError("a flipped frame was accepted")
