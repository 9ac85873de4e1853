"""End to end on real processes: 3 KM nodes on 127.0.0.1, the embedded broker, MQTT capture.

One cluster is shared by the tests of this module (in order), as an operator would drive it:
form, create and release keys, prove possession through ring + MQTT, rotate, refuse bad
enclaves, kill the leader mid-stream, restart a node, and finally scan for leaked keys.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kmnode.cli import cli
from kmnode.km.enclave import derive_key
from kmnode.km.loader import load_km_enclave
from tests import memscan

from .harness import LocalCluster, running, until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("cluster"), 3) as c:
        yield c


def test_cluster_forms_with_every_link_attested(cluster: LocalCluster) -> None:
    leader = cluster.leader()
    for name in cluster.names:
        status = cluster.status(name)
        assert status is not None and status["ready"] and status["has_master_secret"]
        assert status["voters"] == sorted(cluster.names)
        assert status["leader"] == leader
        others = {n for n in cluster.names if n != name}
        until(lambda n=name, o=others: set(cluster.status(n)["peers"]) == o, 10, f"{name} links")
        peers = cluster.status(name)["peers"]
        assert {p["platform_id"] for p in peers.values()} == {
            cluster.config.node(n).platform.id for n in others
        }


def release_and_prove(cluster: LocalCluster, key: str, generation: int) -> set[str]:
    code, reply = cluster.leader_call("POST", f"/v1/keys/{key}/release", {"node": "all"})
    assert code == 200, reply
    assert {r["node"] for r in reply["releases"]} == set(cluster.names)
    assert all(
        r["status"] == "provisioned" and r["generation"] == generation for r in reply["releases"]
    ), reply
    challenge = os.urandom(16).hex()
    macs = set()
    for name in cluster.names:
        code, proof = cluster.api(
            name,
            "POST",
            "/v1/service/prove",
            {"key": key, "generation": generation, "challenge": challenge},
        )
        assert code == 200, proof
        macs.add(proof["mac"])
    assert cluster.capture is not None

    def published() -> bool:
        records = [
            r for r in cluster.capture.json_on("/service/out") if r.get("challenge") == challenge
        ]
        return len(records) == len(cluster.names)

    until(published, 15, "every service enclave's proof on MQTT")
    mqtt_macs = {
        r["mac"] for r in cluster.capture.json_on("/service/out") if r.get("challenge") == challenge
    }
    assert mqtt_macs == macs
    return macs


def test_key_released_to_every_service_enclave_and_all_prove_the_same_key(
    cluster: LocalCluster,
) -> None:
    code, reply = cluster.leader_call("POST", "/v1/keys", {"name": "payments"})
    assert code == 201 and reply == {"key": "payments", "generation": 1}
    macs = release_and_prove(cluster, "payments", 1)
    assert len(macs) == 1, "service enclaves hold different keys"
    fingerprints = {
        cluster.api(n, "GET", "/v1/keys/payments")[1]["fingerprints"]["1"] for n in cluster.names
    }
    assert len(fingerprints) == 1


def test_rotation_and_release_of_generation_two(cluster: LocalCluster) -> None:
    first = release_and_prove(cluster, "payments", 1)
    code, reply = cluster.leader_call("POST", "/v1/keys/payments/rotate")
    assert code == 200 and reply["generation"] == 2
    second = release_and_prove(cluster, "payments", 2)
    assert len(second) == 1 and second != first


def test_node_with_unknown_km_measurement_cannot_join(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    rogue = LocalCluster(tmp_path, nodes=4)
    # Same hardware store and members as the running cluster, one extra node with patched code.
    data = rogue.config.model_dump(mode="json")
    data["nodes"][:3] = cluster.config.model_dump(mode="json")["nodes"]
    data["state_dir"] = str(cluster.config.state_dir)
    data["mqtt"] = cluster.config.model_dump(mode="json")["mqtt"]
    rogue.config_path.write_text(yaml.safe_dump(data))
    rogue.start("km4", env={"KMSIM_KM_PATCH": "exfiltrate()"})
    proc = rogue.procs["km4"]
    try:
        proc.wait(60)
    finally:
        rogue.close()
    assert proc.returncode != 0, "a node refused admission must exit with an error"
    assert "UnknownMeasurement" in rogue.log_tail("km4", 50)
    for name in cluster.names:
        assert "km4" not in cluster.status(name)["members"]
    assert cluster.capture is not None
    until(
        lambda: any(
            e.get("event") == "join.refused" and "UnknownMeasurement" in e["reason"]
            for e in cluster.capture.json_on("/events")
        ),
        10,
        "join.refused event",
    )
    refusals = [e for e in cluster.capture.json_on("/events") if e.get("event") == "peer.refused"]
    assert any("UnknownMeasurement" in e["reason"] for e in refusals)


def test_service_enclave_with_wrong_measurement_gets_nothing(cluster: LocalCluster) -> None:
    victim = cluster.names[-1]
    cluster.stop(victim)
    cluster.start(victim, env={"KMSIM_SERVICE_PATCH": "log_keys()"})
    cluster.wait_ready(victim)
    code, reply = cluster.leader_call("POST", "/v1/keys/payments/release", {"node": victim})
    assert code == 200
    (release,) = reply["releases"]
    assert release["status"] == "refused" and "UnknownMeasurement" in release["reason"]
    code, proof = cluster.api(
        victim, "POST", "/v1/service/prove", {"key": "payments", "generation": 2, "challenge": "00"}
    )
    assert code == 404 and "no key" in proof["error"]
    code, releases = cluster.api(cluster.names[0], "GET", "/v1/releases?key=payments")
    recorded = [r for r in releases["releases"] if r["id"] == release["release"]]
    assert recorded and recorded[0]["status"] == "refused"
    cluster.stop(victim)
    cluster.start(victim)
    cluster.wait_ready(victim)


def test_a_release_that_has_not_committed_never_reaches_the_service_enclave(
    cluster: LocalCluster,
) -> None:
    """The target attests its service enclave as soon as the request is in its log, to save a
    round trip; the key itself must wait for the commit. Here the commit is held off (one
    follower down, the target's acknowledgements dropped), then allowed."""
    leader = cluster.leader()
    target, other = [n for n in cluster.names if n != leader]
    code, _ = cluster.leader_call("POST", "/v1/keys", {"name": "held"})
    assert code == 201
    started = cluster.status(target)["service"]["early_attestations"]["started"]  # type: ignore[index]
    cluster.stop(other)
    code, _ = cluster.api(target, "POST", "/v1/chaos/rules", {"peer": leader, "partition": True})
    assert code == 200
    code, reply = cluster.api(leader, "POST", "/v1/keys/held/release", {"node": target})
    assert code in (503, 504), reply  # not committed: no quorum hears about it
    status = cluster.status(target)
    assert status is not None and status["service"]["early_attestations"]["started"] > started
    prove = {"key": "held", "generation": 1, "challenge": "00"}
    code, proof = cluster.api(target, "POST", "/v1/service/prove", prove)
    assert code == 404 and "no key" in proof["error"]

    cluster.api(target, "POST", "/v1/chaos/heal", {})
    cluster.start(other)
    for name in cluster.names:
        cluster.wait_ready(name)
    # Two of three logs hold the request, so the next leader commits it and it is provisioned.
    until(
        lambda: cluster.api(target, "POST", "/v1/service/prove", prove)[0] == 200,
        30,
        "the key to follow the commit",
    )
    code, releases = cluster.api(target, "GET", "/v1/releases?key=held")
    assert [r["status"] for r in releases["releases"]] == ["provisioned"]


def test_leader_killed_during_releases_loses_no_committed_release(cluster: LocalCluster) -> None:
    code, _ = cluster.leader_call("POST", "/v1/keys", {"name": "stream"})
    assert code == 201
    leader = cluster.leader()
    acknowledged: list[str] = []
    for i in range(40):
        if i == 15:
            cluster.kill(leader)
        try:
            target = cluster.names[i % 3]
            if target == leader:
                continue
            code, reply = cluster.leader_call("POST", "/v1/keys/stream/release", {"node": target})
        except (OSError, AssertionError):
            continue
        if code == 200:
            acknowledged += [r["release"] for r in reply["releases"]]
    survivors = [n for n in cluster.names if n != leader]
    assert len(acknowledged) >= 20
    for name in survivors:
        code, body = cluster.api(name, "GET", "/v1/releases?key=stream")
        ids = {r["id"] for r in body["releases"]}
        assert set(acknowledged) <= ids, f"{name} lost acknowledged releases"
    cluster.start(leader)
    cluster.wait_ready(leader)
    until(
        lambda: (
            set(acknowledged)
            <= {
                r["id"]
                for r in cluster.api(leader, "GET", "/v1/releases?key=stream")[1]["releases"]
            }
        ),
        30,
        "the restarted node to catch up",
    )


def test_stopped_node_restarts_from_its_data_directory_and_catches_up(
    cluster: LocalCluster,
) -> None:
    name = cluster.names[1]
    cluster.stop(name)
    code, _ = cluster.leader_call("POST", "/v1/keys", {"name": "while-down"})
    assert code == 201
    cluster.start(name)
    cluster.wait_ready(name)
    until(
        lambda: any(
            k["name"] == "while-down" for k in cluster.api(name, "GET", "/v1/keys")[1]["keys"]
        ),
        30,
        f"{name} to catch up",
    )
    fingerprints = {
        cluster.api(n, "GET", "/v1/keys/while-down")[1]["fingerprints"]["1"] for n in cluster.names
    }
    assert len(fingerprints) == 1


def test_ledger_of_a_stopped_node_verifies_and_damage_is_named(cluster: LocalCluster) -> None:
    name = cluster.names[2]
    cluster.stop(name)
    # Stopped right after the writes above: the entries since the last signature interval
    # may be unsigned yet (tests/integration/test_ledger_against.py waits for a full signature).
    args = ["-c", str(cluster.config_path), "ledger", "verify", name, "--json"]
    args.append("--allow-unsigned-tail")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["signatures"] >= 1 and report["commands"] > 20
    segment = sorted((cluster.config.state_dir / "nodes" / name / "raft").glob("wal-*.log"))[0]
    original = segment.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 3] ^= 0x40
    segment.write_bytes(bytes(damaged))
    try:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1
        report = json.loads(result.stdout)
        assert not report["ok"] and "offset" in report["problem"]
    finally:
        segment.write_bytes(original)
    cluster.start(name)
    cluster.wait_ready(name)


def test_no_plaintext_key_material_on_the_host_side(cluster: LocalCluster) -> None:
    """Unseal a node's state as the hardware would, derive every key, and search for them."""
    enclave = load_km_enclave(cluster.config, cluster.names[0])
    sealed = cluster.config.state_dir / "nodes" / cluster.names[0] / "enclave.sealed"
    enclave.restore_sealed_state(sealed.read_bytes())
    master = enclave._master_secret
    assert master is not None
    secrets = [master]
    for key, generations in (("payments", 2), ("stream", 1), ("while-down", 1)):
        secrets += [derive_key(master, key, g) for g in range(1, generations + 1)]
    needles = set()
    for secret in secrets:
        needles |= {
            secret,
            secret.hex().encode(),
            secret.hex().upper().encode(),
            base64.b64encode(secret),
            base64.urlsafe_b64encode(secret),
        }
    haystacks: list[tuple[str, bytes]] = []
    for root in (cluster.config.state_dir / "nodes", cluster.logs):
        haystacks += [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]
    assert cluster.capture is not None
    haystacks += [(f"mqtt:{t}", p) for t, p in cluster.capture.messages]
    assert len(haystacks) > 10 and any(h.startswith("mqtt:") for h, _ in haystacks)
    leaks = [name for name, data in haystacks for needle in needles if needle in data]
    assert leaks == []


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` and their command lines."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found[int(proc.name)] = cmdline
    return found


def _tcp_sockets(pid: int) -> int:
    """How many TCP sockets (listening or connected) process ``pid`` holds."""
    tcp = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            tcp.add(line.split()[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in tcp:
            held += 1
    return held


def test_the_host_holds_the_sockets_and_the_enclave_none(cluster: LocalCluster) -> None:
    """The KM enclave process speaks to its peers only through its host: it holds no TCP
    socket at all, while the host holds the peer port and the peer connections."""
    for name in cluster.names:
        status = cluster.status(name)
        assert status is not None
        km = status["km_enclave"]["pid"]
        assert _tcp_sockets(km) == 0
        assert _tcp_sockets(cluster.procs[name].pid) >= 3  # API, peer port, peer links


def _open_files_under(pid: int, root: Path) -> set[str]:
    """The files under ``root`` that process ``pid`` holds open."""
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root) + "/"):
            held.add(target)
    return held


def test_the_host_holds_the_files_and_the_enclave_none(cluster: LocalCluster) -> None:
    """The KM enclave process stores through its host: while keys commit it has no file of the
    node's directory open, and the host holds the Raft segment it appends to. What the host
    writes is what the enclave tagged: the log opens with the enclave's key."""
    code, reply = cluster.leader_call("POST", "/v1/keys", {"name": "stored-by-host"})
    assert code == 201, reply
    for name in cluster.names:
        node_dir = cluster.config.state_dir / "nodes" / name
        status = cluster.status(name)
        assert status is not None
        km = status["km_enclave"]["pid"]
        assert _open_files_under(km, node_dir) == set()
        io = status["km_enclave"]
        assert io["storage"] == "host" and io["peer_sockets"] == "host"
        assert io["peer_connections_dropped_slow"] == 0 and io["fsync_avg_ms"] >= 0
        host_files = _open_files_under(cluster.procs[name].pid, node_dir)
        assert any(Path(f).parent.name == "raft" and f.endswith(".log") for f in host_files)


def test_no_key_material_in_the_memory_of_any_host_process(cluster: LocalCluster) -> None:
    """While the cluster serves releases, search each node's three processes' memory: the
    host holds no master secret and no released key; the KM enclave process does hold the
    master secret and the service enclaves the released keys (so the scan does work)."""
    enclave = load_km_enclave(cluster.config, cluster.names[0])
    sealed = cluster.config.state_dir / "nodes" / cluster.names[0] / "enclave.sealed"
    enclave.restore_sealed_state(sealed.read_bytes())
    master = enclave._master_secret
    assert master is not None
    code, reply = cluster.leader_call("POST", "/v1/keys", {"name": "scanned"})
    assert code == 201, reply
    code, reply = cluster.leader_call("POST", "/v1/keys/scanned/release", {"node": "all"})
    assert code == 200 and all(r["status"] == "provisioned" for r in reply["releases"]), reply
    released = derive_key(master, "scanned", 1)
    needles = memscan.forms(master) | memscan.forms(released)
    for name in cluster.names:
        host = cluster.procs[name].pid
        children = _children(host)
        km = [pid for pid, cmd in children.items() if "kmnode.km.process" in cmd]
        assert len(km) == 1, children
        grandchildren = _children(km[0])
        service = [pid for pid, cmd in grandchildren.items() if "kmnode.service.process" in cmd]
        assert len(service) == 1, grandchildren
        assert cluster.status(name)["km_enclave"]["pid"] == km[0]
        assert memscan.found_in_memory(host, needles) == set(), f"{name}'s host holds a secret"
        assert master in memscan.found_in_memory(km[0], {master}), f"{name}'s KM enclave"
        assert released in memscan.found_in_memory(service[0], {released}), f"{name}'s service"
