"""The service pipe carries requests and replies in batches, each still matched by id.

Under load a write per request and a write per reply (each waking the other process) were the
largest single cost of provisioning on a node; requests made in one loop turn now leave in one
write, and the service answers everything it read in one write.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import cast

import pytest

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from kmnode.km.service_link import ServiceLink
from kmnode.ring import Writer
from kmnode.service.enclave import ServiceEnclave
from kmnode.service.process import answer, serve
from kmnode.service_pipe import MAX_LINE, ServiceUnavailable

pytestmark = pytest.mark.timeout(60)

SVC_ID = EnclaveIdentity(measure_sources({"svc": b"svc"}), signer_id("t"), 2, 1)
PLATFORM = Platform("a", TcbStatus.UP_TO_DATE, b"a".ljust(32, b"\0"), VendorRoot(b"v" * 32))


def test_serve_answers_every_line_of_a_read_in_one_write_in_order() -> None:
    enclave = ServiceEnclave(PLATFORM.enclave(SVC_ID), trusted_km=set())
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    thread = threading.Thread(
        target=serve, args=(enclave, cast(Writer, None), in_r, out_w), daemon=True
    )
    thread.start()
    requests = [{"op": "identity", "id": i} for i in range(20)]
    blob = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    blob += b"not json\n" + b'{"op": "nope", "id": 99}\n'
    os.write(in_w, blob[:37])  # a line split across two reads is still one request
    os.write(in_w, blob[37:])
    os.close(in_w)
    thread.join(10)
    os.close(out_w)
    out = b""
    while chunk := os.read(out_r, 1 << 16):
        out += chunk
    os.close(out_r)
    os.close(in_r)
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in replies] == [*range(20), None, 99]
    measurement = SVC_ID.measurement.hex()
    assert all(
        r == {"ok": True, "error": "", "measurement": measurement, "id": i}
        for i, r in enumerate(replies[:20])
    )
    assert replies[20]["ok"] is False and replies[21]["ok"] is False
    assert "unknown operation 'nope'" in replies[21]["error"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"op": "challenge", "id": 1, "km_measurement": "00", "challenge": "00"}', "pattern"),
        (b'{"op": "prove", "id": 1, "key": "k", "generation": 0, "challenge": "00"}', "greater"),
        (b'{"op": "prove", "id": 1, "key": "k", "generation": "1", "challenge": "00"}', "integer"),
        (b'{"op": "key", "id": 1, "ciphertext": "zz"}', "pattern"),
        (b'{"op": "identity", "id": 1, "extra": true}', "extra"),
        (
            b'{"op": "key", "id": 1, "ciphertext": "' + b"00" * (MAX_LINE // 2 + 8) + b'"}',
            "exceeds",
        ),
        # Contract requests: the same strictness (a host relaying them may send anything).
        (b'{"op": "contract.ops", "id": 1, "ops": []}', "at least 1"),
        (
            b'{"op": "contract.ops", "id": 1, "ops": [{"seq": 0, "kind": "call", '
            b'"contract": "token"}]}',
            "greater",
        ),
        (
            b'{"op": "contract.ops", "id": 1, "ops": [{"seq": 1, "kind": "drop", '
            b'"contract": "token"}]}',
            "'deploy' or 'call'",
        ),
        (
            b'{"op": "contract.ops", "id": 1, "ops": [{"seq": 1, "kind": "call", '
            b'"contract": "../etc"}]}',
            "pattern",
        ),
        (b'{"op": "contract.keys", "id": 1, "ciphertext": "zz", "vouch": ""}', "pattern"),
        (
            b'{"op": "contract.check", "id": 1, "checkpoint": {"seq": 1, "roots": {"t": "00"}}}',
            "pattern",
        ),
        (
            b'{"op": "contract.restore", "id": 1, "checkpoints": [], "contracts": []}',
            "Field required",
        ),
    ],
)
def test_a_malformed_request_gets_a_specific_error_and_changes_nothing(
    line: bytes, error: str
) -> None:
    enclave = ServiceEnclave(PLATFORM.enclave(SVC_ID), trusted_km=set())
    reply = json.loads(answer(enclave, cast(Writer, None), line))
    assert reply["ok"] is False and error in reply["error"], reply
    assert reply["id"] in (1, None)
    assert repr(enclave).endswith("keys=0)")


# A stand-in service: counts its reads, answers each (prove) request with a "mac" that holds
# the read it came in and the request's generation; generation 999 makes it die.
ECHO = """
import json, os
reads = 0
pending = b""
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    reads += 1
    *lines, pending = (pending + chunk).split(b"\\n")
    out = b""
    for line in lines:
        request = json.loads(line)
        if request.get("generation") == 999:
            os._exit(3)
        mac = "%02x%04x" % (reads, request["generation"])
        out += json.dumps({"ok": True, "id": request["id"], "mac": mac}).encode() + b"\\n"
    os.write(1, out)
"""


async def echo(link: ServiceLink, n: int) -> tuple[int, int]:
    """(the read the stand-in got request ``n`` in, the ``n`` it echoed back)."""
    mac = await link.prove("k", n + 1, b"\\x00")
    return int(mac[:2], 16), int(mac[2:], 16) - 1


class EchoLink(ServiceLink):
    """A ServiceLink whose child is the stand-in above (no ring, no simulated platform)."""

    async def start(self) -> None:
        await self._spawn()
        self._started.set()

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            ECHO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reply_task = asyncio.create_task(self._read_replies(self._proc))


async def test_requests_of_one_loop_turn_share_a_write_and_get_their_own_replies(
    tmp_path: Path,
) -> None:
    link = EchoLink(tmp_path / "c.yaml", "km1", "/kmsim-unused-ring", tmp_path / "log")
    await link.start()
    try:
        replies = await asyncio.gather(*(echo(link, n) for n in range(100)))
        assert [n for _, n in replies] == list(range(100))
        assert {read for read, _ in replies} == {1}, "100 requests made together: one write"
        assert await echo(link, 100) == (2, 100)
    finally:
        await link.stop()


async def test_a_service_that_dies_fails_its_waiters_at_once(tmp_path: Path) -> None:
    link = EchoLink(tmp_path / "c.yaml", "km1", "/kmsim-unused-ring", tmp_path / "log")
    await link.start()
    try:
        waiting = [asyncio.ensure_future(echo(link, n)) for n in range(5)]
        with pytest.raises(ServiceUnavailable):
            await asyncio.wait_for(echo(link, 998), 5)
        for future in waiting:
            with pytest.raises(ServiceUnavailable):
                await asyncio.wait_for(future, 5)
        # The next request restarts the service (as after a crash) and is answered.
        await asyncio.wait_for(link._proc.wait(), 5)  # type: ignore[union-attr]
        assert (await asyncio.wait_for(echo(link, 1), 5))[1] == 1 and link.restarts == 1
    finally:
        await link.stop()
