"""A hostile host against the service enclave's output ring, on a real node.

The host cannot shrink the ring (it is a sealed memfd); when it tampers with the ring's header
or sits on the enclave's lock, the service enclave reports the error (an event naming it, no
secret), gets a fresh ring and keeps publishing, in the same process: the key provisioned
before the tampering still proves, with the same MAC as before.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmnode.ring import LAYOUT
from tests.integration.test_cluster import _children

from .harness import LocalCluster, running, until

pytestmark = pytest.mark.timeout(240)

NODE = "km1"
RING_LABEL = f"/memfd:kmsim-{NODE}-service"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("ring-recovery"), 1) as c:
        yield c


def enclave_pids(cluster: LocalCluster) -> tuple[int, int]:
    """(KM enclave pid, service enclave pid) of the node."""
    km = [p for p, cmd in _children(cluster.procs[NODE].pid).items() if "kmnode.km.process" in cmd]
    assert len(km) == 1
    service = [p for p, cmd in _children(km[0]).items() if "kmnode.service.process" in cmd]
    assert len(service) == 1
    return km[0], service[0]


def service_running(cluster: LocalCluster) -> bool:
    status = cluster.status(NODE)
    return status is not None and bool(status["service"]["running"])


def host_ring_fd(cluster: LocalCluster) -> Path:
    """The host's descriptor of the current output ring, as /proc shows it."""
    fds = Path(f"/proc/{cluster.procs[NODE].pid}/fd")
    found = [fd for fd in fds.iterdir() if os.readlink(fd).startswith(RING_LABEL)]
    assert len(found) == 1, [os.readlink(fd) for fd in fds.iterdir()]
    return found[0]


def tamper(
    cluster: LocalCluster, field: str, value: int, fmt: str, ring: Path | None = None
) -> None:
    """What the host (or anyone who can read its fd table) can do: write the ring's header."""
    fd = os.open(ring or host_ring_fd(cluster), os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096) as header:
            struct.pack_into(fmt, header, LAYOUT[field], value)
    finally:
        os.close(fd)


def prove(cluster: LocalCluster, challenge: str) -> str:
    body = {"key": "held", "generation": 1, "challenge": challenge}
    code, proof = cluster.api(NODE, "POST", "/v1/service/prove", body)
    assert code == 200, proof
    mac: str = proof["mac"]
    return mac


def published(cluster: LocalCluster, challenge: str) -> list[dict[str, Any]]:
    assert cluster.capture is not None
    return [r for r in cluster.capture.json_on("/service/out") if r.get("challenge") == challenge]


def ring_events(cluster: LocalCluster) -> list[dict[str, Any]]:
    assert cluster.capture is not None
    events = cluster.capture.json_on("/events")
    return [e for e in events if e.get("event") == "service.ring_failed"]


def test_the_host_cannot_resize_any_ring_under_an_enclave(cluster: LocalCluster) -> None:
    """The service's output ring and the circuit's two rings (host <-> KM enclave) are sealed
    memfds: whoever holds one (the host, the KM enclave process) cannot shrink or grow it, so
    no enclave can be made to touch memory that is gone (SIGBUS)."""
    km, _ = enclave_pids(cluster)
    rings = [
        fd
        for pid in (cluster.procs[NODE].pid, km)
        for fd in Path(f"/proc/{pid}/fd").iterdir()
        if os.readlink(fd).startswith(f"/memfd:kmsim-{NODE}-")
    ]
    labels = {os.readlink(fd).split(" ")[0] for fd in rings}
    assert {RING_LABEL, f"/memfd:kmsim-{NODE}-kmin", f"/memfd:kmsim-{NODE}-kmout"} <= labels
    for ring in rings:
        fd = os.open(ring, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            for attempt in (0, size // 2, size * 2):
                with pytest.raises(OSError) as refused:
                    os.ftruncate(fd, attempt)
                assert refused.value.errno == errno.EPERM, ring
            assert os.fstat(fd).st_size == size
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    ("field", "value", "fmt", "error"),
    [
        ("writer_lock", 1, "<I", "RingLockTimeout"),
        ("write_offset", 0xDEAD_BEEF_0000, "<Q", "RingCorrupted"),
    ],
)
def test_a_tampered_ring_is_reported_and_replaced_and_no_key_is_lost(
    cluster: LocalCluster, field: str, value: int, fmt: str, error: str
) -> None:
    code, reply = cluster.api(NODE, "POST", "/v1/keys", {"name": "held"})
    assert code in (201, 409), reply  # the second run finds the key created by the first
    code, reply = cluster.api(NODE, "POST", "/v1/keys/held/release", {"node": NODE})
    assert code == 200 and reply["releases"][0]["status"] == "provisioned", reply
    challenge = os.urandom(16).hex()
    before = prove(cluster, challenge)
    until(lambda: len(published(cluster, challenge)) == 1, 15, "the first proof on MQTT")
    pids, ring = enclave_pids(cluster), host_ring_fd(cluster).stat().st_ino
    reports = len(ring_events(cluster))
    replaced = cluster.status(NODE)["service"]["ring_replacements"]  # type: ignore[index]

    tamper(cluster, field, value, fmt)

    # The next proof meets the tampered ring: it is reported, replaced, and the proof goes out
    # through the fresh ring, under the same key, from the same process.
    assert prove(cluster, challenge) == before
    until(lambda: len(published(cluster, challenge)) == 2, 15, "the proof after the tampering")
    assert {r["mac"] for r in published(cluster, challenge)} == {before}
    until(lambda: len(ring_events(cluster)) == reports + 1, 15, "the ring failure event")
    event = ring_events(cluster)[-1]
    assert event["error"].startswith(f"{error}: memfd:service-output: "), event
    assert event["replaced"] is True
    assert enclave_pids(cluster) == pids, "the service enclave must not have restarted"
    assert host_ring_fd(cluster).stat().st_ino != ring, "the host drains a fresh ring"
    log = (cluster.logs / f"{NODE}.log").read_text(errors="replace")
    assert f"reports its output ring failed ({error}" in log
    status = cluster.status(NODE)
    assert status is not None and status["ready"]
    assert status["service"]["ring_replacements"] == replaced + 1


def test_a_service_enclave_restarted_after_a_replacement_writes_to_the_current_ring(
    cluster: LocalCluster,
) -> None:
    """The KM enclave process passes every service it starts the ring it inherited, which is
    stale once the host replaced it: the new service asks, and writes where the host reads."""
    assert ring_events(cluster), "runs after the replacements above"
    km, old_service = enclave_pids(cluster)
    # The first ring, which the KM enclave process still holds, was replaced because its lock
    # was held; let go of it, so that only asking the host tells the stale ring from the current.
    held = [fd for fd in Path(f"/proc/{km}/fd").iterdir() if os.readlink(fd).startswith(RING_LABEL)]
    assert len(held) == 1
    tamper(cluster, "writer_lock", 0, "<I", held[0])
    code, reply = cluster.api(NODE, "POST", "/v1/chaos/service-crash", {})
    assert code == 200 and reply["killed"] == old_service, reply
    until(lambda: not service_running(cluster), 10, "the service enclave to be down")
    # a crashed service enclave loses its keys (that is what the recovery above avoids)
    code, reply = cluster.api(NODE, "POST", "/v1/keys/held/release", {"node": NODE})
    assert code == 200 and reply["releases"][0]["status"] == "provisioned", reply
    assert enclave_pids(cluster)[1] != old_service
    challenge = os.urandom(16).hex()
    mac = prove(cluster, challenge)
    until(lambda: len(published(cluster, challenge)) == 1, 15, "the restarted service's proof")
    assert published(cluster, challenge)[0]["mac"] == mac
