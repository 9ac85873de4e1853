"""A sealed dataset opens only as itself, under its key, and says what a host did to it."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from kmnode.dataauth.blob import (
    MAX_BLOB_BYTES,
    BlobError,
    BlobKeyInvalid,
    BlobNameInvalid,
    BlobPlaintextMismatch,
    BlobTampered,
    BlobTooLarge,
    BlobUndecryptable,
    SealedDataset,
    new_dek,
    open_dataset,
    seal_dataset,
)

MARKER = b"SECRET-ROW-7f3a"
PLAINTEXT = b"name,salary\n" + MARKER + b",100\nbob,200\n"
DEK = new_dek()


def _sealed() -> SealedDataset:
    return seal_dataset("payroll", PLAINTEXT, DEK)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(sealed: SealedDataset, ciphertext: bytes, *, digest_ct: str | None = None) -> bytes:
    digest = _sha(ciphertext) if digest_ct is None else digest_ct
    return open_dataset("payroll", ciphertext, DEK, digest, sealed.digest_pt)


@settings(max_examples=100, deadline=None)
@given(name=st.text(min_size=1, max_size=40).filter(lambda n: "\0" not in n), data=st.binary())
def test_a_dataset_opens_to_its_plaintext_and_registers_its_digests(name: str, data: bytes) -> None:
    try:
        name.encode()
    except UnicodeEncodeError:
        return  # a lone surrogate: no name (tested below)
    dek = new_dek()
    sealed = seal_dataset(name, data, dek)
    assert sealed.size == len(data)
    assert sealed.digest_pt == _sha(data) and sealed.digest_ct == _sha(sealed.ciphertext)
    assert len(sealed.ciphertext) == len(data) + 24 + 16
    assert open_dataset(name, sealed.ciphertext, dek, sealed.digest_ct, sealed.digest_pt) == data


def test_the_blob_format_is_the_documented_one() -> None:
    """Nonce first, AAD = "kmsim-dataset1" NUL name NUL digest_pt: what other code may rely on."""
    sealed = _sealed()
    nonce, body = sealed.ciphertext[:24], sealed.ciphertext[24:]
    aad = b"kmsim-dataset1\0payroll\0" + sealed.digest_pt.encode()
    assert crypto_aead_xchacha20poly1305_ietf_decrypt(body, aad, nonce, DEK) == PLAINTEXT


def test_sealing_twice_gives_different_blobs_of_the_same_plaintext() -> None:
    one, two = _sealed(), _sealed()
    assert one.ciphertext != two.ciphertext and one.digest_ct != two.digest_ct
    assert one.digest_pt == two.digest_pt
    assert len(new_dek()) == 32 and new_dek() != new_dek()


@pytest.mark.parametrize("where", [0, 23, 24, 40, -17, -1], ids=lambda w: f"byte{w}")
def test_a_flipped_byte_anywhere_is_caught(where: int) -> None:
    """Nonce (0..23), ciphertext, tag (last 16): the digest catches it first; and if the
    registered digest were that of the changed blob, the AEAD still would."""
    sealed = _sealed()
    flipped = bytearray(sealed.ciphertext)
    flipped[where] ^= 0x01
    with pytest.raises(BlobTampered) as caught:
        _open(sealed, bytes(flipped), digest_ct=sealed.digest_ct)
    assert caught.value.reason == "blob-digest"
    with pytest.raises(BlobUndecryptable) as undecryptable:
        _open(sealed, bytes(flipped))
    assert undecryptable.value.reason == "blob-decrypt"


def test_a_blob_of_another_dataset_does_not_open_as_this_one() -> None:
    """Same owner, same data key: the AAD binds the name (and the plaintext digest)."""
    other = seal_dataset("payroll-2024", b"a\n1\n", DEK)
    with pytest.raises(BlobTampered):  # the host swaps the blob under this dataset's digest
        open_dataset("payroll", other.ciphertext, DEK, _sealed().digest_ct, other.digest_pt)
    with pytest.raises(BlobUndecryptable):  # even with every digest matching the swapped blob
        open_dataset("payroll", other.ciphertext, DEK, other.digest_ct, other.digest_pt)
    sealed = _sealed()  # and a blob under another registered plaintext digest
    with pytest.raises(BlobUndecryptable):
        open_dataset("payroll", sealed.ciphertext, DEK, sealed.digest_ct, other.digest_pt)


@pytest.mark.parametrize(
    "cut",
    [lambda b: b[:-1], lambda b: b[:30], lambda b: b[:24], lambda b: b"", lambda b: b + b"\0"],
)
def test_a_truncated_empty_or_extended_blob_is_refused(cut: Callable[[bytes], bytes]) -> None:
    sealed = _sealed()
    blob = cut(sealed.ciphertext)
    with pytest.raises(BlobTampered):
        _open(sealed, blob, digest_ct=sealed.digest_ct)
    with pytest.raises(BlobUndecryptable):
        _open(sealed, blob)


def test_an_oversize_blob_is_refused_before_it_is_hashed() -> None:
    sealed = _sealed()
    with pytest.raises(BlobTampered, match="larger"):
        _open(sealed, bytes(MAX_BLOB_BYTES + 1), digest_ct=sealed.digest_ct)
    with pytest.raises(BlobTooLarge) as caught:
        seal_dataset("big", bytes(MAX_BLOB_BYTES - 39), DEK)
    assert caught.value.reason == "blob-size"
    assert len(seal_dataset("big", bytes(MAX_BLOB_BYTES - 40), DEK).ciphertext) == MAX_BLOB_BYTES


def test_a_wrong_data_key_does_not_open_it() -> None:
    sealed = _sealed()
    for dek in (new_dek(), DEK[:31], b"", DEK + b"\0"):
        with pytest.raises(BlobUndecryptable):
            open_dataset("payroll", sealed.ciphertext, dek, sealed.digest_ct, sealed.digest_pt)
    with pytest.raises(BlobKeyInvalid):
        seal_dataset("payroll", PLAINTEXT, DEK[:16])


def test_a_blob_sealed_under_another_plaintext_digest_is_a_mismatch() -> None:
    """An owner who registers the digest of one text and seals another: the AEAD opens (the
    AAD holds the claimed digest), the plaintext check does not."""
    claimed = _sha(b"something else")
    nonce = secrets.token_bytes(24)
    aad = b"kmsim-dataset1\0payroll\0" + claimed.encode()
    blob = nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(PLAINTEXT, aad, nonce, DEK)
    with pytest.raises(BlobPlaintextMismatch) as caught:
        open_dataset("payroll", blob, DEK, _sha(blob), claimed)
    assert caught.value.reason == "plaintext-digest"


def test_the_checks_run_in_order_digest_then_key() -> None:
    sealed = _sealed()
    with pytest.raises(BlobTampered):  # tampered and the wrong key: the digest speaks first
        open_dataset("payroll", sealed.ciphertext[:-1], new_dek(), sealed.digest_ct, "0" * 64)


@pytest.mark.parametrize("name", ["", "a\0b", "\ud800"])
def test_a_name_that_cannot_be_bound_is_refused(name: str) -> None:
    with pytest.raises(BlobNameInvalid) as caught:
        seal_dataset(name, PLAINTEXT, DEK)
    assert caught.value.reason == "bad-name"
    with pytest.raises(BlobNameInvalid):
        open_dataset(name, b"", DEK, "", "")


def test_every_blob_error_is_a_value_error_with_its_own_reason() -> None:
    kinds: tuple[type[BlobError], ...] = (BlobTampered, BlobUndecryptable, BlobPlaintextMismatch)
    kinds += (BlobNameInvalid, BlobKeyInvalid, BlobTooLarge)
    assert all(issubclass(kind, BlobError) and issubclass(kind, ValueError) for kind in kinds)
    assert sorted(kind.reason for kind in kinds) == [
        "bad-key", "bad-name", "blob-decrypt", "blob-digest", "blob-size", "plaintext-digest"
    ]  # fmt: skip


def test_no_plaintext_nor_key_in_a_repr_or_an_error() -> None:
    sealed = _sealed()
    shown = repr(sealed)
    assert MARKER.decode() not in shown and sealed.ciphertext.hex()[:16] not in shown
    assert str(len(PLAINTEXT)) in shown and sealed.digest_ct in shown
    claimed = _sha(b"other")
    nonce = bytes(24)
    aad = b"kmsim-dataset1\0payroll\0" + claimed.encode()
    lying = nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(PLAINTEXT, aad, nonce, DEK)
    attempts = [
        (sealed.ciphertext[:-1], DEK, sealed.digest_ct, sealed.digest_pt),
        (sealed.ciphertext, new_dek(), sealed.digest_ct, sealed.digest_pt),
        (lying, DEK, _sha(lying), claimed),
    ]
    for blob, dek, digest_ct, digest_pt in attempts:
        with pytest.raises(BlobError) as caught:
            open_dataset("payroll", blob, dek, digest_ct, digest_pt)
        told = f"{caught.value!s} {caught.value!r}"
        assert MARKER.decode() not in told and DEK.hex() not in told and dek.hex() not in told
