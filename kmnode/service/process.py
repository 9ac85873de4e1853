"""The service enclave as a child process of the node.

It loads itself onto its node's simulated platform, answers the KM enclave's local-attestation
challenges, accepts keys encrypted to it, and runs the proof workload. Requests come from the
host as typed JSON lines on stdin (``kmnode.service_pipe``; the host relays them and only ever
sees challenges, reports and ciphertext); every workload output is written to the
shared-memory ring, which the host drains and publishes. Replies on stdout are for the
request/response flow only.

The ring arrives as an inherited descriptor of a sealed memfd, with this process's end of the
ring-control socket (``kmnode.service.ring_output``): a ring the host tampers with is reported
and replaced by a fresh one while this process, and the keys it holds, carry on.

``KMSIM_SERVICE_PATCH`` (environment) models a modified service build (see
``kmnode.enclave_code.build_identity``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path
from typing import Protocol

from attest.identity import EnclaveRole
from kmnode import logsetup
from kmnode.config import ContractsSpec, load_config
from kmnode.contracts.cache import CacheConfig
from kmnode.contracts.store_wire import StoreClient, StoreWireError
from kmnode.datadir import BLOB_DIR, NODES_DIR
from kmnode.enclave_code import build_identity, current_identity
from kmnode.imports import loaded_project_modules
from kmnode.service.contract_requests import ContractRequest, handle_contract
from kmnode.service.contracts import ContractRuntime
from kmnode.service.data_jobs import DataJobs
from kmnode.service.enclave import ProvisioningError, ServiceEnclave
from kmnode.service.ring_output import RingOutput
from kmnode.service_pipe import (
    ChallengeReply,
    ChallengeRequest,
    DataJobRequest,
    DataReleaseRequest,
    DataRevokeRequest,
    IdentityReply,
    IdentityRequest,
    KeyReply,
    KeyRequest,
    ModulesReply,
    ModulesRequest,
    PipeError,
    ProveReply,
    Reply,
    Request,
    decode_request,
    encode,
    line_id,
)
from kmnode.simhw import HardwareStore

RECORD_PROOF = 1


class Output(Protocol):
    """Where workload records go (a ``RingOutput``; a ring ``Writer`` in tests)."""

    def write(self, data: bytes, type: int = 0) -> bool: ...


def handle(
    enclave: ServiceEnclave,
    writer: Output,
    request: Request,
    runtime: LazyRuntime | None = None,
    jobs: DataJobs | None = None,
) -> Reply:
    """The reply to one request (refusals raise; ``answer`` turns them into error replies)."""
    if isinstance(request, DataJobRequest | DataRevokeRequest | DataReleaseRequest):
        if jobs is None:
            raise ProvisioningError("this service enclave runs no data jobs")
        if isinstance(request, DataRevokeRequest):
            return jobs.revoke(request)
        if isinstance(request, DataReleaseRequest):
            return jobs.release(request, writer)
        return jobs.run(request, writer)
    if isinstance(request, ContractRequest):
        return handle_contract(runtime.get() if runtime else None, enclave, writer, request)
    if isinstance(request, IdentityRequest):
        return IdentityReply(measurement=enclave.context.identity.measurement.hex())
    if isinstance(request, ModulesRequest):
        # Public: which project modules this process has loaded, so a test (or an auditor)
        # can check that the measurement covers every one of them.
        return ModulesReply(modules=loaded_project_modules())
    if isinstance(request, ChallengeRequest):
        response = enclave.answer_challenge(
            bytes.fromhex(request.km_measurement), bytes.fromhex(request.challenge)
        )
        return ChallengeReply(response=response.hex())
    if isinstance(request, KeyRequest):
        name, generation = enclave.accept_key(
            bytes.fromhex(request.ciphertext), bytes.fromhex(request.vouch)
        )
        return KeyReply(key=name, generation=generation)
    mac = enclave.prove(request.key, request.generation, bytes.fromhex(request.challenge))
    record = {
        "kind": "proof",
        "key": request.key,
        "generation": request.generation,
        "challenge": request.challenge,
        "mac": mac,
    }
    writer.write(json.dumps(record, separators=(",", ":")).encode(), RECORD_PROOF)
    return ProveReply(mac=mac)


def answer(
    enclave: ServiceEnclave,
    writer: Output,
    line: bytes,
    runtime: LazyRuntime | None = None,
    jobs: DataJobs | None = None,
) -> bytes:
    """The reply line to one request line (errors are replies too, never exceptions)."""
    try:
        request = decode_request(line)
        reply = handle(enclave, writer, request, runtime, jobs).model_copy(
            update={"id": request.id}
        )
    except (PipeError, ProvisioningError, ValueError, StoreWireError) as exc:
        reply = Reply(id=line_id(line), ok=False, error=f"{type(exc).__name__}: {exc}")
    return encode(reply)


def serve(
    enclave: ServiceEnclave,
    writer: Output,
    fd_in: int = 0,
    fd_out: int = 1,
    runtime: LazyRuntime | None = None,
    jobs: DataJobs | None = None,
) -> None:
    """Answer requests until stdin closes (the host went away).

    Whatever the pipe holds is read at once, and the replies to all of its complete lines go
    back in one write: under load the host sends many requests per write, and a reply per
    write (with a wake-up of the host each) was most of this process's and the pipe's cost.
    """
    pending = b""
    while True:
        chunk = os.read(fd_in, 1 << 16)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(
            answer(enclave, writer, line, runtime, jobs) for line in lines if line.strip()
        )
        view = memoryview(out)
        while view:
            view = view[os.write(fd_out, view) :]


def main() -> None:
    parser = argparse.ArgumentParser(description="kmsim service enclave (started by the node)")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ring-fd", type=int, required=True, help="fd: the output ring's memfd")
    parser.add_argument(
        "--ring-control", type=int, required=True, help="fd: our end of the ring-control socket"
    )
    parser.add_argument(
        "--contract-store",
        default="",
        help="the host's contract store: an abstract unix socket address (hex); none: no contracts",
    )
    args = parser.parse_args()
    logsetup.configure(
        args.node,
        "service",
        text_format=f"%(asctime)s %(levelname)s service-enclave[{args.node}]: %(message)s",
    )
    config = load_config(args.config)
    node = config.node(args.node)
    platform = HardwareStore(config.state_dir / "hardware").platform(
        node.platform.id, node.platform.tcb
    )
    # The KM enclave this service takes keys from is its own build's, whatever the host's
    # environment says (a patched KM build is not trusted).
    enclave = ServiceEnclave(
        platform.enclave(build_identity(EnclaveRole.SERVICE)),
        trusted_km={current_identity(EnclaveRole.KM).measurement},
    )
    output = RingOutput(socket.socket(fileno=args.ring_control))
    output.start(args.ring_fd)
    runtime = LazyRuntime(config.contracts, args.contract_store)
    jobs = DataJobs(enclave, config.state_dir / NODES_DIR / args.node / BLOB_DIR)
    try:
        serve(enclave, output, runtime=runtime, jobs=jobs)
    finally:
        output.close()


class LazyRuntime:
    """The contract runtime, made at the first contract request that finds the host's store
    (``address_hex``; none: no contracts here). A store not reachable yet (a busy host still
    starting) is tried again at the next request, so the enclave never dies of it."""

    def __init__(self, spec: ContractsSpec, address_hex: str) -> None:
        self._spec, self._address = spec, address_hex
        self._runtime: ContractRuntime | None = None

    def get(self) -> ContractRuntime | None:
        if self._runtime is None and self._address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(bytes.fromhex(self._address))
            except (OSError, ValueError) as exc:
                sock.close()
                logging.getLogger(__name__).warning("contract store not reachable: %s", exc)
                return None
            spec = self._spec
            cache = CacheConfig(
                max_entries=spec.cache_entries,
                max_bytes=spec.cache_bytes,
                flush_every=spec.flush_every,
                epc_budget_bytes=spec.epc_budget_bytes,
            )
            self._runtime = ContractRuntime(StoreClient(sock), cache, spec.checkpoint_every)
        return self._runtime


if __name__ == "__main__":
    main()
