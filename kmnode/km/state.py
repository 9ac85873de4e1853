"""The KM state machine that Raft replicates: keys, policy, members, releases, ledger chain.

Every KM enclave applies the same committed commands in the same order and must reach the same
state, so ``apply`` is a pure function of (state, index, command bytes): no clock, no
randomness, no I/O, and refusals are results, not exceptions, because a command that one node
refuses every node refuses identically. Nothing here is secret: keys are *derived* inside the
enclave from the master secret and (name, generation), so the ledger only holds metadata and
the host may store it in plaintext.

Each applied command extends a hash chain (``chain_hash``, over index and bytes) so a ledger
copied off a node can be checked offline, and signatures over the chain by the leader's enclave
can be verified later. Raft's own entries (leader NOOPs, membership changes) never reach the
state machine, so indexes increase but need not be contiguous.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from attest.identity import EnclaveRole
from attest.policy import Policy

MAX_COMMAND_BYTES = 64 * 1024
#: Releases per ``json.dumps`` call when a snapshot is serialised: each call holds the GIL, so
#: chunks keep a snapshot taken in a worker thread from stalling the event loop for long.
SNAPSHOT_CHUNK = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX32 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{32}$")
GENESIS_HASH = bytes(32)


class CommandRefused(Exception):
    """A command is well-formed JSON but not acceptable in the current state (or malformed)."""


def encode_command(op: str, **fields: Any) -> bytes:
    """Canonical bytes for a command: the same command always encodes identically."""
    return json.dumps({"op": op, **fields}, sort_keys=True, separators=(",", ":")).encode()


def chain_step(previous: bytes, index: int, data: bytes) -> bytes:
    return hashlib.blake2b(previous + index.to_bytes(8, "big") + data, digest_size=32).digest()


@dataclass
class KeyRecord:
    name: str
    generation: int
    #: Service measurements (hex) allowed to receive this key; empty means "the policy's".
    allowed_service: list[str]
    created_index: int
    rotated_index: int


@dataclass
class Member:
    name: str
    platform_id: str
    host: str
    peer_port: int
    api_port: int
    joined_index: int


@dataclass(frozen=True)
class Release:
    """One release. Immutable: the outcome replaces the record, so a snapshot can share the
    records (it copies only the list of them) while later entries keep being applied."""

    id: str
    key: str
    generation: int
    node: str
    requested_index: int
    status: str = "requested"  # requested | provisioned | refused
    reason: str = ""
    service_measurement: str = ""
    completed_index: int = 0


@dataclass
class KMState:
    cluster: str = ""
    #: Random id the genesis enclave chose (hex), and the chain hash right after the
    #: ``cluster.init`` entry: what sealed state is bound to (see ``KMEnclave.check_binding``).
    cluster_id: str = ""
    genesis_hash: bytes = b""
    policy: Policy = field(default_factory=Policy)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)
    releases: dict[str, Release] = field(default_factory=dict)
    applied_index: int = 0
    chain_hash: bytes = GENESIS_HASH
    #: Index the newest ledger signature covers, and the index of that ``ledger.sign`` entry.
    last_signed_index: int = 0
    last_signature_entry: int = 0

    # --- applying ---------------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> dict[str, Any]:
        """Apply the committed command at ``index``; returns ``{"ok": ..., ...}``."""
        if index <= self.applied_index:
            raise ValueError(f"apply out of order: got {index}, applied {self.applied_index}")
        self.applied_index = index
        self.chain_hash = chain_step(self.chain_hash, index, data)
        try:
            command = self._parse(data)
            handler = _HANDLERS.get(command["op"])
            if handler is None:
                raise CommandRefused(f"unknown operation {command['op']!r}")
            result = handler(self, index, command)
        except CommandRefused as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a committed entry must never stop the log
            # A field shape no check foresaw. Every node runs the same code on the same bytes,
            # so every node refuses it alike; raising would stop the Raft driver on every node,
            # and again after every restart, since the entry replays.
            return {"ok": False, "error": f"command could not be applied ({type(exc).__name__})"}
        return {"ok": True, **result}

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any]:
        if len(data) > MAX_COMMAND_BYTES:
            raise CommandRefused(f"command of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
        try:
            command = json.loads(data, parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandRefused(f"command is not JSON: {exc}") from None
        except RecursionError:
            raise CommandRefused("command is nested too deeply") from None
        if not isinstance(command, dict) or not isinstance(command.get("op"), str):
            raise CommandRefused("command must be an object with a string 'op'")
        return command

    # --- handlers ---------------------------------------------------------------------------

    def _init(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.cluster:
            raise CommandRefused(f"cluster {self.cluster!r} is already initialised")
        cluster = _str(cmd, "cluster")
        cluster_id = cmd.get("cluster_id", "")
        if not isinstance(cluster_id, str) or (cluster_id and not _HEX16.match(cluster_id)):
            raise CommandRefused("cluster_id must be 32 hex digits")
        policy = _policy(cmd.get("policy"))
        previous, self.policy = self.policy, policy
        try:
            self._add_member(index, cmd.get("member"))  # judged under the cluster's policy
        except CommandRefused:
            self.policy = previous  # a refused command changes nothing
            raise
        self.cluster = cluster
        self.cluster_id = cluster_id
        self.genesis_hash = self.chain_hash
        return {"cluster": cluster}

    def _member_add(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self._require_init()
        member = self._add_member(index, cmd.get("member"))
        return {"member": member.name}

    def _add_member(self, index: int, raw: Any) -> Member:
        if not isinstance(raw, dict):
            raise CommandRefused("member must be an object")
        name = _name(raw, "name")
        if name in self.members:
            raise CommandRefused(f"{name!r} is already a member")
        platform_id = _name(raw, "platform_id")
        if platform_id in self.policy.revoked_platforms:
            raise CommandRefused(f"platform {platform_id!r} is revoked")
        if any(m.platform_id == platform_id for m in self.members.values()):
            raise CommandRefused(f"platform {platform_id!r} already hosts a member")
        member = Member(
            name=name,
            platform_id=platform_id,
            host=_str(raw, "host"),
            peer_port=_port(raw, "peer_port"),
            api_port=_port(raw, "api_port"),
            joined_index=index,
        )
        self.members[name] = member
        return member

    def _member_remove(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self._require_init()
        name = _name(cmd, "name")
        if name not in self.members:
            raise CommandRefused(f"{name!r} is not a member")
        if len(self.members) == 1:
            raise CommandRefused("cannot remove the last member")
        del self.members[name]
        return {"member": name}

    def _key_create(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self._require_init()
        name = _name(cmd, "name")
        if name in self.keys:
            raise CommandRefused(f"key {name!r} already exists")
        allowed = _measurements(cmd.get("allowed_service", []))
        self.keys[name] = KeyRecord(name, 1, allowed, index, index)
        return {"key": name, "generation": 1}

    def _key_rotate(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        record = self._key(cmd)
        record.generation += 1
        record.rotated_index = index
        return {"key": record.name, "generation": record.generation}

    def _release_request(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        record = self._key(cmd)
        node = _name(cmd, "node")
        if node not in self.members:
            raise CommandRefused(f"{node!r} is not a member")
        generation = cmd.get("generation", record.generation)
        if (
            not isinstance(generation, int)
            or isinstance(generation, bool)
            or not 1 <= generation <= record.generation
        ):
            raise CommandRefused(
                f"key {record.name!r} has generations 1..{record.generation}, not {generation!r}"
            )
        release = Release(f"r{index}", record.name, generation, node, index)
        self.releases[release.id] = release
        return {"release": release.id, "key": record.name, "generation": generation, "node": node}

    def _release_outcome(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        release_id = _str(cmd, "release")
        release = self.releases.get(release_id)
        if release is None:
            raise CommandRefused(f"no release {release_id!r}")
        if release.status != "requested":
            raise CommandRefused(f"release {release_id} is already {release.status}")
        if _name(cmd, "node") != release.node:
            raise CommandRefused(f"release {release_id} targets {release.node!r}")
        status = _str(cmd, "status")
        if status not in ("provisioned", "refused"):
            raise CommandRefused(f"outcome status must be provisioned or refused, not {status!r}")
        measurement = cmd.get("service_measurement", "")
        if measurement and not (isinstance(measurement, str) and _HEX32.match(measurement)):
            raise CommandRefused("service_measurement must be 64 hex digits")
        if status == "provisioned" and not self.service_allowed(release.key, measurement):
            raise CommandRefused(
                f"measurement {measurement[:16]}… is not allowed to receive {release.key!r}"
            )
        self.releases[release_id] = replace(
            release,
            status=status,
            reason=str(cmd.get("reason", ""))[:500],
            service_measurement=measurement,
            completed_index=index,
        )
        return {"release": release_id, "status": status}

    def _policy_set(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self._require_init()
        self.policy = _policy(cmd.get("policy"))
        return {"policy": self.policy.to_dict()}

    def _policy_allow(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        role, measurement = _role_measurement(cmd)
        self.policy = self.policy.allow(role, measurement)
        return {"role": role.value, "measurement": measurement.hex()}

    def _policy_disallow(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        role, measurement = _role_measurement(cmd)
        self.policy = self.policy.disallow(role, measurement)
        return {"role": role.value, "measurement": measurement.hex()}

    def _policy_revoke_platform(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        platform_id = _name(cmd, "platform_id")
        self.policy = self.policy.revoke_platform(platform_id)
        return {"revoked": platform_id}

    def _ledger_sign(self, index: int, cmd: dict[str, Any]) -> dict[str, Any]:
        signed_index = cmd.get("index")
        if not isinstance(signed_index, int) or not 0 < signed_index < index:
            raise CommandRefused("ledger signature must cover an earlier index")
        chain = _str(cmd, "chain_hash")
        signer = _str(cmd, "public_key")
        if not (_HEX32.match(chain) and _HEX32.match(signer)):
            raise CommandRefused("chain_hash and public_key must be 64 hex digits")
        _str(cmd, "quote", 8192)
        _str(cmd, "signature")
        if signed_index <= self.last_signed_index:
            raise CommandRefused(f"index {signed_index} is already covered by a signature")
        self.last_signed_index = signed_index
        self.last_signature_entry = index
        return {"signed_index": signed_index}

    # --- queries ----------------------------------------------------------------------------

    def service_allowed(self, key: str, measurement_hex: str) -> bool:
        """May a service enclave with this measurement receive ``key``?"""
        record = self.keys.get(key)
        if record is None:
            return False
        if record.allowed_service:
            return measurement_hex in record.allowed_service
        return bytes.fromhex(measurement_hex or "00" * 32) in self.policy.measurements_for(
            EnclaveRole.SERVICE
        )

    def _key(self, cmd: dict[str, Any]) -> KeyRecord:
        self._require_init()
        name = _name(cmd, "key" if "key" in cmd else "name")
        record = self.keys.get(name)
        if record is None:
            raise CommandRefused(f"no key named {name!r}")
        return record

    def _require_init(self) -> None:
        if not self.cluster:
            raise CommandRefused("the cluster is not initialised yet")

    # --- snapshots --------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        return self.snapshot_capture()()

    def snapshot_capture(self) -> Callable[[], bytes]:
        """A consistent image of the state now, and a function that serialises it later.

        The capture is cheap (the small records are copied, the releases list is copied by
        reference: releases are immutable), so it can be taken on the event loop between two
        applies and serialised in a thread while applying goes on. Serialising the releases is
        the expensive part (it grows with the history): it runs chunk by chunk, without
        ``dataclasses.asdict``'s recursive deep copy (a frozen record's ``__dict__`` is already
        the flat dict), and the output is the same JSON that `restore` has always read.
        """
        head = {
            "cluster": self.cluster,
            "cluster_id": self.cluster_id,
            "genesis_hash": self.genesis_hash.hex(),
            "policy": self.policy.to_dict(),
            "keys": [asdict(k) for k in self.keys.values()],
            "members": [asdict(m) for m in self.members.values()],
            "applied_index": self.applied_index,
            "chain_hash": self.chain_hash.hex(),
            "last_signed_index": self.last_signed_index,
            "last_signature_entry": self.last_signature_entry,
        }
        releases = list(self.releases.values())

        def serialise() -> bytes:
            # The releases array is encoded in chunks and spliced into the object, whose keys
            # are written in sorted order: the bytes equal one json.dumps(sort_keys=True).
            parts = [b"["]
            for start in range(0, len(releases), SNAPSHOT_CHUNK):
                chunk = [vars(r) for r in releases[start : start + SNAPSHOT_CHUNK]]
                body = json.dumps(chunk, sort_keys=True, separators=(",", ":")).encode()
                parts.append(body[1:-1] if start == 0 else b"," + body[1:-1])
            parts.append(b"]")
            fields = {
                k: json.dumps(v, sort_keys=True, separators=(",", ":")).encode()
                for k, v in head.items()
            }
            fields["releases"] = b"".join(parts)
            return (
                b"{"
                + b",".join(b'"%s":%s' % (k.encode(), fields[k]) for k in sorted(fields))
                + b"}"
            )

        return serialise

    @classmethod
    def restore(cls, blob: bytes) -> KMState:
        data = json.loads(blob)
        return cls(
            cluster=data["cluster"],
            cluster_id=data.get("cluster_id", ""),
            genesis_hash=bytes.fromhex(data.get("genesis_hash", "")),
            policy=Policy.from_dict(data["policy"]),
            keys={k["name"]: KeyRecord(**k) for k in data["keys"]},
            members={m["name"]: Member(**m) for m in data["members"]},
            releases={r["id"]: Release(**r) for r in data["releases"]},
            applied_index=data["applied_index"],
            chain_hash=bytes.fromhex(data["chain_hash"]),
            last_signed_index=data["last_signed_index"],
            last_signature_entry=data["last_signature_entry"],
        )


_HANDLERS = {
    "cluster.init": KMState._init,
    "member.add": KMState._member_add,
    "member.remove": KMState._member_remove,
    "key.create": KMState._key_create,
    "key.rotate": KMState._key_rotate,
    "release.request": KMState._release_request,
    "release.outcome": KMState._release_outcome,
    "policy.set": KMState._policy_set,
    "policy.allow": KMState._policy_allow,
    "policy.disallow": KMState._policy_disallow,
    "policy.revoke_platform": KMState._policy_revoke_platform,
    "ledger.sign": KMState._ledger_sign,
}


# --- field validation (every refusal says which field and why) -------------------------------


def _no_constant(name: str) -> Any:
    raise CommandRefused(f"{name} is not a number a command may hold")


def _str(cmd: dict[str, Any], key: str, max_len: int = 256) -> str:
    value = cmd.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise CommandRefused(f"{key!r} must be a non-empty string of at most {max_len} chars")
    return value


def _name(cmd: dict[str, Any], key: str) -> str:
    value = _str(cmd, key)
    if not _NAME.match(value):
        raise CommandRefused(f"{key!r} must match {_NAME.pattern}, got {value!r}")
    return value


def _port(cmd: dict[str, Any], key: str) -> int:
    value = cmd.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise CommandRefused(f"{key!r} must be a port number")
    return value


def _measurements(raw: Any) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(m, str) and _HEX32.match(m) for m in raw):
        raise CommandRefused("allowed_service must be a list of 64-hex-digit measurements")
    return sorted(set(raw))


def _role_measurement(cmd: dict[str, Any]) -> tuple[EnclaveRole, bytes]:
    role = cmd.get("role")
    if role not in [r.value for r in EnclaveRole]:
        raise CommandRefused(f"role must be km or service, not {role!r}")
    measurement = _str(cmd, "measurement")
    if not _HEX32.match(measurement):
        raise CommandRefused("measurement must be 64 hex digits")
    return EnclaveRole(role), bytes.fromhex(measurement)


def _policy(raw: Any) -> Policy:
    if not isinstance(raw, dict):
        raise CommandRefused("policy must be an object")
    try:
        return Policy.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CommandRefused(f"invalid policy: {exc}") from None
