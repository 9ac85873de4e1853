"""A service enclave whose host store is not reachable yet answers contract requests with an
error (never dies of it), and runs contracts as soon as the store answers."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import cast

from kmnode.config import ContractsSpec
from kmnode.host.contract_store import ContractStore
from kmnode.ring import Writer
from kmnode.service.process import LazyRuntime, answer
from kmnode.service_pipe import ContractStatusRequest, encode
from tests.km.enclaves import service


def status(runtime: LazyRuntime) -> dict[str, object]:
    line = encode(ContractStatusRequest(id=1))
    reply: dict[str, object] = json.loads(answer(service("a"), cast(Writer, None), line, runtime))
    return reply


def test_contracts_wait_for_the_store_and_the_enclave_lives_on(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("")
    address = listener.getsockname()
    listener.close()  # the address exists, nobody listens yet: a host still starting
    runtime = LazyRuntime(ContractsSpec(), bytes(address).hex())
    refused = status(runtime)
    assert refused["ok"] is False and "no contract store" in str(refused["error"])
    with ContractStore(tmp_path / "c.sqlite", fsync=False) as store:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(1)
        try:
            accepted: list[socket.socket] = []
            listener.settimeout(5)

            # The enclave dials on its next request; the host accepts and serves it.
            def accept() -> None:
                conn, _ = listener.accept()
                accepted.append(conn)
                store.serve(conn)

            thread = threading.Thread(target=accept, daemon=True)
            thread.start()
            runtime_reply = status(runtime)
            thread.join(5)
            assert runtime_reply["ok"] is True and runtime_reply["position"] == 0
        finally:
            listener.close()


def test_no_store_address_means_no_contracts() -> None:
    reply = status(LazyRuntime(ContractsSpec(), ""))
    assert reply["ok"] is False and "no contract store" in str(reply["error"])
