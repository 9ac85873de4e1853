"""The KM enclave process: ``python -m kmnode.km.process`` (started by the node's host).

It attaches the two rings the host created, builds the node's trusted half (``KMNode``: the
KM enclave, the state machine, Raft, the peer protocols over connections whose sockets the
host holds: ``kmnode.km.vnet``) and serves the host's requests over
the circuit until the host asks it to stop, its stdin closes (the host died: a killed node must
not leave its enclave running), or the node refuses its own state. What it sends the host is
public: replies and events. The service enclave is this process's child (the node's two
enclaves talk directly); its output ring belongs to the host, which hands this process the
ring's memfd and control socket to pass on (``--service-ring-fd``). The two
doorbell pipes (``kmnode.circuit``) are inherited file descriptors named on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from attest.errors import SealingError
from consensus.disk import Disk, DiskError, LocalDisk
from consensus.storage import CorruptLogError, StorageError
from kmnode import logsetup
from kmnode.circuit import CIRCUIT_CAPACITY, Circuit, CircuitMode
from kmnode.config import load_config
from kmnode.datadir import RAFT_DIR
from kmnode.imports import loaded_project_modules
from kmnode.km import metrics
from kmnode.km.host_disk import HostDisk
from kmnode.km.node import KMNode, NodeStartError
from kmnode.km.operator import Operator
from kmnode.km.service_link import ServiceLink
from kmnode.km.vnet import AsyncioNet, Net, VirtualNet
from kmnode.km_messages import (
    Ack,
    MetricsReply,
    MetricsRequest,
    ModulesReply,
    ModulesRequest,
    Notice,
    Reply,
    Request,
    Started,
    Stopping,
    StopRequest,
    Tick,
)
from kmnode.ring import Ring
from kmnode.service_pipe import RingHandoff

log = logging.getLogger("kmnode.km")


async def _stdin_closed() -> None:
    """Return when the host's end of our stdin closes (the host exited, however it died)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass


async def serve(
    config_path: Path,
    name: str,
    rings: tuple[int, int],
    bells: tuple[int, int],
    service_ring: RingHandoff,
    mode: str,
    contract_store: str = "",
) -> int:
    config = load_config(config_path)
    # The host's sealed memfds: refused unless sealed against shrinking and growing, and of the
    # circuit's size (``Ring.attach_sealed``).
    inbound = Ring.attach_sealed(rings[0], CIRCUIT_CAPACITY)
    outbound = Ring.attach_sealed(rings[1], CIRCUIT_CAPACITY)
    data_dir = config.state_dir / "nodes" / name
    service = ServiceLink(config_path, name, service_ring, contract_store=contract_store)
    stop = asyncio.Event()
    circuits: list[Circuit] = []

    def notify(notice: Notice) -> None:
        for circuit in circuits:
            circuit.notify(notice)

    limits = config.limits
    virtual = (
        VirtualNet(limits.handshake_buffer_bytes, 2 * limits.frame_bytes)
        if config.enclave.peer_sockets == "host"
        else None
    )
    net: Net = virtual if virtual is not None else AsyncioNet()

    async def on_request(request: Request) -> Reply:
        if isinstance(request, StopRequest):
            stop.set()
            return Ack()
        if isinstance(request, ModulesRequest):
            return ModulesReply(modules=loaded_project_modules(), pid=os.getpid())
        if isinstance(request, MetricsRequest):
            return MetricsReply(families=metrics.collect(node))
        return await operator.handle(request)

    def on_notice(notice: Notice) -> None:
        if isinstance(notice, Tick):
            node.tick()
            return
        if virtual is None or not virtual.on_notice(notice):
            log.warning("ignored a %s from the host", type(notice).__name__)

    circuit_mode: CircuitMode = "ocall" if mode == "ocall" else "switchless"
    circuit = Circuit(
        inbound,
        outbound,
        bell_in=bells[0],
        bell_out=bells[1],
        on_request=on_request,
        on_notice=on_notice,
        mode=circuit_mode,
        name=f"{name}-km",
    )
    circuits.append(circuit)
    raft_dir = data_dir / RAFT_DIR
    disks: tuple[Disk, Disk]
    if config.enclave.storage == "host":
        loop = asyncio.get_running_loop()
        disks = (
            HostDisk(circuit, "node", data_dir, loop),
            HostDisk(circuit, "raft", raft_dir, loop),
        )
    else:
        disks = (LocalDisk(data_dir), LocalDisk(raft_dir))
    node = KMNode(config, name, service, notify, net, disks)
    operator = Operator(node)
    if virtual is not None:
        virtual.circuit = circuit
    circuit.start()
    try:
        await node.start()
    except (NodeStartError, StorageError, SealingError, DiskError) as exc:
        log.error("%s: cannot start: %s", name, exc)
        if isinstance(exc, CorruptLogError | SealingError):
            log.error(
                "%s: its data directory cannot be repaired; the other members go on without "
                "it. To replace it by a fresh node of the same name: kmctl chaos replace %s",
                name,
                name,
            )
        circuit.notify(Stopping(exit_code=1, reason=f"cannot start: {type(exc).__name__}: {exc}"))
        await node.stop()
        await circuit.close()
        return 1
    circuit.notify(Started(mode=node.mode))
    host_gone = asyncio.create_task(_stdin_closed())
    waits = [
        asyncio.create_task(stop.wait()),
        asyncio.create_task(node.stop_requested.wait()),
        asyncio.create_task(circuit.closed.wait()),
        host_gone,
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    if node.stop_requested.is_set():
        circuit.notify(Stopping(exit_code=node.exit_code, reason="the node stopped"))
    await node.stop()
    if virtual is not None:
        await virtual.stop()
    with contextlib.suppress(Exception):
        await circuit.close()
    return node.exit_code


def main() -> None:
    parser = argparse.ArgumentParser(description="A node's KM enclave (started by its host).")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--ring-in-fd", type=int, required=True, help="fd: host -> us ring")
    parser.add_argument("--ring-out-fd", type=int, required=True, help="fd: us -> host ring")
    parser.add_argument("--bell-in", type=int, required=True, help="fd: the host's doorbell")
    parser.add_argument("--bell-out", type=int, required=True, help="fd: our doorbell")
    parser.add_argument("--service-ring-fd", type=int, required=True, help="fd: service ring")
    parser.add_argument(
        "--service-ring-control", type=int, required=True, help="fd: its ring-control socket"
    )
    parser.add_argument("--circuit", choices=("switchless", "ocall"), default="switchless")
    parser.add_argument(
        "--contract-store", default="", help="the host's contract store (abstract socket, hex)"
    )
    args = parser.parse_args()
    logsetup.configure(args.node, "km")
    # The host stops us through the circuit; a terminal's ^C reaches the whole group and the
    # host then asks in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rings, bells = (args.ring_in_fd, args.ring_out_fd), (args.bell_in, args.bell_out)
    service_ring = RingHandoff(args.service_ring_fd, args.service_ring_control)
    sys.exit(
        asyncio.run(
            serve(
                args.config,
                args.node,
                rings,
                bells,
                service_ring,
                args.circuit,
                args.contract_store,
            )
        )
    )


if __name__ == "__main__":
    main()
