"""The service enclave as the privacy computing platform (issue 15, S5): one computation per
committed token, its result sealed to the data user.

The KM enclave boxes each job's material to this enclave after local attestation (the token it
signed, the dataset's data key, the input key for the sealed parameters); the host relays the
box and keeps the blob. Everything the host hands over is checked here before it is used: the
box opens only from the vouched KM enclave; the token must be for this enclave's measurement,
not used before by this instance, and its grant not revoked as far as this enclave has been
told; the blob must hash to the registered digest and decrypt to the registered plaintext; the
parameters must open under this user and token and hash to the digest the token binds. Then the
predetermined operation runs (``kmnode.dataauth.ops``: never raw rows for high-privacy data,
aggregates honour the minimum group size, results bounded), and the result leaves sealed to the
user's key only: in the reply (the KM enclave commits its hash) and as a ring record the host
publishes on the user's MQTT topic. A refusal says why and releases nothing.

The data key and the plaintext live in local variables for the one job and are dropped with
them (Python cannot promise to zero memory; a native enclave would).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Annotated, Protocol

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kmnode.contracts.envelope import EnvelopeError, open_call
from kmnode.contracts.vm import ContractVM
from kmnode.dataauth.blob import MAX_BLOB_BYTES, BlobError, open_dataset
from kmnode.dataauth.ops import Limits, OpRefused, params_digest, run_op
from kmnode.dataauth.table import Table, TableError, parse_table
from kmnode.dataauth.wasm_op import checksum, run_wasm_op
from kmnode.service.enclave import ProvisioningError, ServiceEnclave
from kmnode.service_pipe import (
    DataJobReply,
    DataJobRequest,
    DataReleaseReply,
    DataReleaseRequest,
    DataRevokeReply,
    DataRevokeRequest,
    JobEnd,
)

RECORD_DATA_RESULT = 3
#: The largest result (bytes of the operation's JSON) this enclave seals.
MAX_RESULT_BYTES = 4096
#: Tokens this instance remembers having run (a replayed job is refused): far more than a
#: node's tokens in flight; older ones are committed as consumed or refused, which the KM
#: enclave checks before it boxes a job.
DONE_KEPT = 65536
#: Results held for their end's commit (the oldest are dropped: their users fetch them from
#: the platform's API, which keeps them too).
HELD_KEPT = 4096

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Code = Annotated[str, StringConstraints(max_length=1 << 17)]
#: Jobs one box carries (the KM side batches fewer: ``data_feed.JOBS_IN_FLIGHT``).
MAX_BATCH = 256


class Output(Protocol):
    def write(self, data: bytes, type: int = 0) -> bool: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Platform(_Strict):
    node: str
    measurement: Hex64


class TokenView(_Strict):
    """The fields of a token (``kmnode.km.dataauth.Token.body``) this enclave acts on."""

    v: int
    id: Annotated[str, StringConstraints(pattern=r"^t[1-9][0-9]{0,18}$")]
    grant: str
    data: str
    digest: Hex64
    digest_pt: Hex64
    user: str
    user_pk: Hex64
    op: str
    op_checksum: Hex64
    params: Hex64
    platform: _Platform
    issued: int
    issued_at: int
    expires_at: int
    uses_left_after: int


class JobSpec(_Strict):
    """One computation of a batch, as the KM enclave boxed it."""

    token: Annotated[str, StringConstraints(max_length=8192)]
    signature: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
    dek: Hex64
    sealed: Annotated[str, StringConstraints(max_length=1 << 17)]
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    privacy: str
    min_group_size: Annotated[int, Field(ge=1)]
    #: A WebAssembly operation's version (its module is in the batch's ``codes``).
    op_version: Annotated[int, Field(ge=0)] = 0


class JobEnvelope(_Strict):
    """A batch of computations: the input key once, the jobs, and the WebAssembly modules
    they run (base64, by checksum)."""

    kind: str
    input: Hex64
    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=MAX_BATCH)]
    codes: Annotated[
        dict[Hex64, Annotated[str, StringConstraints(max_length=1 << 17)]],
        Field(max_length=MAX_BATCH),
    ]


class JobRefused(Exception):
    """A job this enclave will not run; the message is the reason committed with the token."""


class DataJobs:
    """This service enclave instance's computations. ``blob_dir``: where the host keeps the
    blobs (untrusted: every byte read is checked)."""

    def __init__(self, enclave: ServiceEnclave, blob_dir: Path) -> None:
        self._enclave = enclave
        self._blob_dir = blob_dir
        self._vm: ContractVM | None = None  # made at the first WebAssembly operation
        self._revoked: set[str] = set()
        self._done: dict[str, None] = {}
        #: Results computed, by token, until their end is committed (``release``).
        self._held: dict[str, bytes] = {}

    def revoke(self, request: DataRevokeRequest) -> DataRevokeReply:
        """Revocations the KM enclave saw committed: their tokens are refused from now on."""
        fresh = [g for g in request.grants if g not in self._revoked]
        self._revoked.update(fresh)
        return DataRevokeReply(revoked=len(fresh))

    def run(self, request: DataJobRequest, writer: Output) -> DataJobReply:
        """Every job of a vouched box, in order; each ends consumed or refused on its own."""
        envelope = self._enclave.open_envelope(
            bytes.fromhex(request.ciphertext), bytes.fromhex(request.vouch), "data"
        )
        try:
            batch = JobEnvelope.model_validate(envelope)
            tokens = [TokenView.model_validate_json(job.token) for job in batch.jobs]
        except ValidationError as exc:
            raise ProvisioningError(f"data job rejected: {exc.errors()[0]['msg']}") from None
        ends = [
            self._end(batch, job, token, writer)
            for job, token in zip(batch.jobs, tokens, strict=True)
        ]
        return DataJobReply(ends=ends)

    def release(self, request: DataReleaseRequest, writer: Output) -> DataReleaseReply:
        """Results whose end the ledger now holds as consumed leave, through the ring (a token
        this instance holds nothing for, e.g. after a restart, is passed over)."""
        released = 0
        for token in request.tokens:
            record = self._held.pop(token, None)
            if record is not None:
                writer.write(record, RECORD_DATA_RESULT)
                released += 1
        return DataReleaseReply(released=released)

    def _end(self, batch: JobEnvelope, job: JobSpec, token: TokenView, writer: Output) -> JobEnd:
        try:
            sealed = self._compute(batch, job, token)
        except JobRefused as exc:
            reason = str(exc)[:500]
            writer.write(_record(token, "refused", reason, b""), RECORD_DATA_RESULT)
            return JobEnd(token=token.id, status="refused", reason=reason)
        digest = hashlib.sha256(sealed).hexdigest()
        # Held until the ledger holds this end (``release``): a result never leaves for a
        # token that could still end refused (its platform crashing before the commit).
        self._held[token.id] = _record(token, "consumed", "", sealed)
        if len(self._held) > HELD_KEPT:
            del self._held[next(iter(self._held))]
        return JobEnd(
            token=token.id,
            status="consumed",
            sealed=base64.b64encode(sealed).decode(),
            result_hash=digest,
        )

    def _compute(self, batch: JobEnvelope, job: JobSpec, token: TokenView) -> bytes:
        """The result sealed to the token's user, or ``JobRefused`` with the reason."""
        own = self._enclave.context.identity.measurement.hex()
        if token.platform.measurement != own:
            raise JobRefused("the token binds another service measurement")
        if token.id in self._done:
            raise JobRefused(f"token {token.id} was used before (replay)")
        self._done[token.id] = None  # from here on, whatever happens, never a second run
        if len(self._done) > DONE_KEPT:
            del self._done[next(iter(self._done))]
        if token.grant in self._revoked:
            raise JobRefused(f"grant {token.grant} was revoked")
        if job.privacy not in ("low", "high"):
            raise JobRefused("the dataset's privacy level is unknown")
        ciphertext = self._read_blob(token.digest)
        try:
            plaintext = open_dataset(
                token.data, ciphertext, bytes.fromhex(job.dek), token.digest, token.digest_pt
            )
        except BlobError as exc:
            raise JobRefused(f"{exc.reason}: {exc}") from None
        params = _open_params(batch.input, job, token)
        try:
            table = parse_table(plaintext)
            limits = Limits(min_group_size=job.min_group_size, max_result_bytes=MAX_RESULT_BYTES)
            if token.op_checksum in batch.codes:
                result = self._run_wasm(batch, job, token, table, params, limits)
            else:
                result = run_op(token.op, table, params, job.privacy, limits)  # type: ignore[arg-type]
        except TableError as exc:
            raise JobRefused(f"bad-data: {exc}") from None
        except OpRefused as exc:
            raise JobRefused(f"{exc.reason}: {exc}") from None
        try:
            return bytes(SealedBox(PublicKey(bytes.fromhex(token.user_pk))).encrypt(result))
        except (ValueError, CryptoError):
            raise JobRefused("the user's key is unusable") from None

    def _run_wasm(
        self,
        batch: JobEnvelope,
        job: JobSpec,
        token: TokenView,
        table: Table,
        params: dict[str, object],
        limits: Limits,
    ) -> bytes:
        """A WebAssembly operation: only the module whose checksum the token binds."""
        try:
            code = base64.b64decode(batch.codes[token.op_checksum], validate=True)
        except ValueError:
            raise JobRefused("op-failed: the operation's code is not base64") from None
        if checksum(code) != token.op_checksum:
            raise JobRefused("op-failed: the operation's code is not the one the token binds")
        if self._vm is None:
            self._vm = ContractVM()
        return run_wasm_op(self._vm, code, token.op, job.op_version, table, params, limits)

    def _read_blob(self, digest: str) -> bytes:
        try:
            with open(self._blob_dir / digest, "rb") as f:
                data = f.read(MAX_BLOB_BYTES + 1)
        except OSError:
            raise JobRefused(
                "blob-missing: the host has no blob with the registered digest"
            ) from None
        if len(data) > MAX_BLOB_BYTES:
            raise JobRefused(f"blob-digest: the host's blob is larger than {MAX_BLOB_BYTES} bytes")
        return data


def _open_params(input_key: str, job: JobSpec, token: TokenView) -> dict[str, object]:
    """The parameters, opened under this user and computation, hashing to the token's digest."""
    try:
        opened = open_call(PrivateKey(bytes.fromhex(input_key)), job.sealed, token.user, job.nonce)
        params = json.loads(opened.args)
    except (EnvelopeError, ValueError):
        raise JobRefused("params: the sealed parameters do not open for this computation") from None
    if not isinstance(params, dict):
        raise JobRefused("params: the parameters are not an object")
    try:
        digest = params_digest(params)
    except (TypeError, ValueError):
        raise JobRefused("params: the parameters are not canonical JSON") from None
    if digest != token.params:
        raise JobRefused("params: the parameters do not hash to the digest the token binds")
    return params


def _record(token: TokenView, status: str, reason: str, sealed: bytes) -> bytes:
    """The ring record of a job's end (published on the user's MQTT topic): public fields and
    the result sealed to the user."""
    record = {
        "kind": "data.result",
        "token": token.id,
        "user": token.user,
        "dataset": token.data,
        "op": token.op,
        "status": status,
        "reason": reason,
        "sealed": base64.b64encode(sealed).decode(),
        "result_hash": hashlib.sha256(sealed).hexdigest() if sealed else "",
    }
    return json.dumps(record, separators=(",", ":")).encode()
