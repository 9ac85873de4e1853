"""cluster.yaml: the schema, its defaults, and errors that name the bad field.

The same file drives `kmctl up` on one machine and the docker/Kubernetes manifests, so a typo
must be caught before anything starts: unknown keys are refused, every field is typed, and
cross-field rules (unique names, ports, platforms) are checked after the types. All problems are
reported at once, one line each, as ``path: message`` (``nodes[2].peer_port: ...``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attest.certs import TcbStatus
from attest.identity import EnclaveRole
from attest.policy import Policy
from kmnode.identity import PublicIdentity

#: In a policy's measurement list, stands for "the enclave code of this installation".
CURRENT_MEASUREMENT = "@current"
DEFAULT_CONFIG_NAME = "cluster.yaml"

Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
_HEX_MEASUREMENT = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one ``path: message`` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlatformSpec(_Strict):
    """The simulated machine a node runs on."""

    id: Name
    tcb: TcbStatus = TcbStatus.UP_TO_DATE


class NodeSpec(_Strict):
    name: Name
    #: The address the node listens on (peer and API ports). ``0.0.0.0`` or ``::`` listen on
    #: every interface, and then ``advertise`` must say where others reach it.
    host: str = "127.0.0.1"
    #: The address peers, kmctl and the ledger's member record use to reach the node (a host
    #: name or an IP address, never an unspecified one); unset means ``host``.
    advertise: str | None = None
    peer_port: Port
    api_port: Port
    platform: PlatformSpec
    #: The Linux network namespace the node runs in (``kmctl chaos netns setup`` creates it and
    #: gives it ``host``): real IP-level partitions between nodes on one machine. Unset means
    #: the node shares the machine's network, as every default node does.
    netns: Name | None = None

    @field_validator("host")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        return check_address(value, unspecified_ok=True)

    @field_validator("advertise")
    @classmethod
    def _advertised_address(cls, value: str | None) -> str | None:
        return None if value is None else check_address(value, unspecified_ok=False)

    @model_validator(mode="after")
    def _reachable(self) -> NodeSpec:
        if self.advertise is None and _unspecified(self.host):
            raise ValueError(
                f"host {self.host!r} listens on every interface: set advertise to the "
                "address other nodes and kmctl reach this node at"
            )
        return self

    @property
    def address(self) -> str:
        """Where others reach the node: ``advertise``, else ``host``."""
        return self.advertise or self.host

    def member_record(self) -> dict[str, Any]:
        """The fields this node is committed with as a member (and admitted with)."""
        return {
            "name": self.name,
            "platform_id": self.platform.id,
            "host": self.address,
            "peer_port": self.peer_port,
            "api_port": self.api_port,
        }


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _unspecified(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).is_unspecified
    except ValueError:
        return False


def check_address(value: str, *, unspecified_ok: bool) -> str:
    """``value`` if it is an IP address or a valid host name (RFC 1123); ValueError saying
    why not. An unspecified address (listen everywhere) only where ``unspecified_ok``."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value) or value.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is neither an IP address nor a valid host name") from None
        return value
    if address.is_unspecified and not unspecified_ok:
        raise ValueError(
            f"{value!r} is the unspecified address: nobody can reach a node there (advertise "
            "the address others use, e.g. the machine's IP or DNS name)"
        )
    return value


def _check_measurements(values: list[str]) -> list[str]:
    for value in values:
        if value != CURRENT_MEASUREMENT and not _HEX_MEASUREMENT.match(value):
            raise ValueError(
                f"{value!r} is neither {CURRENT_MEASUREMENT!r} nor 64 lowercase hex digits"
            )
    return values


class PolicySpec(_Strict):
    km_measurements: list[str] = [CURRENT_MEASUREMENT]
    service_measurements: list[str] = [CURRENT_MEASUREMENT]
    min_svn: Annotated[int, Field(ge=0, lt=2**16)] = 1
    accepted_tcb: list[TcbStatus] = [TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED]
    revoked_platforms: list[Name] = []
    max_quote_age_s: Annotated[float, Field(gt=0, le=86400)] = 60.0

    _measurements = field_validator("km_measurements", "service_measurements")(_check_measurements)

    def resolve(self, current: Mapping[EnclaveRole, bytes]) -> Policy:
        """The attestation policy, with ``@current`` replaced by this build's measurements."""

        def measurements(role: EnclaveRole, values: list[str]) -> frozenset[bytes]:
            return frozenset(
                current[role] if v == CURRENT_MEASUREMENT else bytes.fromhex(v) for v in values
            )

        return Policy(
            km_measurements=measurements(EnclaveRole.KM, self.km_measurements),
            service_measurements=measurements(EnclaveRole.SERVICE, self.service_measurements),
            min_svn=self.min_svn,
            accepted_tcb=frozenset(self.accepted_tcb),
            revoked_platforms=frozenset(self.revoked_platforms),
            max_quote_age_s=self.max_quote_age_s,
        )


class RaftSpec(_Strict):
    tick_ms: Annotated[int, Field(ge=1, le=1000)] = 50
    election_ticks: Annotated[int, Field(ge=3, le=1000)] = 10
    heartbeat_ticks: Annotated[int, Field(ge=1, le=100)] = 1
    fsync: bool = True


class LedgerSpec(_Strict):
    """How often the leader's enclave signs the ledger's hash chain (for offline verification)."""

    sign_every_entries: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    #: Also sign after this many seconds if any entry is still unsigned.
    sign_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0


class EnclaveSpec(_Strict):
    """How a node's host and its KM enclave process talk (``kmnode.circuit``)."""

    #: ``switchless``: the enclave writes into the shared ring itself (the default; what CCF
    #: does). ``ocall``: every record the enclave sends costs a modelled world switch, so the
    #: price of an enclave transition is visible end to end.
    circuit: Literal["switchless", "ocall"] = "switchless"
    #: Who holds the peer sockets. ``host`` (the default, what a TEE must do): the host
    #: listens, dials and moves each connection's bytes over the circuit. ``enclave``: the KM
    #: enclave process opens them itself, which saves two circuit crossings per Raft message
    #: (bench/RESULTS.md has the price of each).
    peer_sockets: Literal["host", "enclave"] = "host"
    #: Who holds the node's files (Raft log, snapshots, sealed state). ``host`` (the default,
    #: what a TEE must do): the enclave sends tagged records and sealed blobs over the circuit
    #: and waits for the host's word that they are fsynced. ``enclave``: the KM enclave process
    #: writes them itself (bench/RESULTS.md has the price of each).
    storage: Literal["host", "enclave"] = "host"


class GovernanceSpec(_Strict):
    """What the cluster's governance starts with; later changes are voted proposals."""

    #: Whether the chaos (fault injection) routes are open to admins from genesis. The
    #: development profile of `kmctl up` opens them; otherwise a proposal (chaos.set) does.
    chaos: bool = False
    #: How many recovery shares rebuild the master secret (identities with the ``recovery``
    #: role hold one each); 0 means a majority of the holders. A proposal changes it later.
    recovery_threshold: Annotated[int, Field(ge=0, le=255)] = 0


class MqttSpec(_Strict):
    #: ``mqtt://host:port`` of an external broker; unset means the embedded amqtt broker.
    url: Annotated[str, Field(pattern=r"^mqtts?://[^/:]+(:\d{1,5})?/?$")] | None = None
    #: Where the embedded broker listens and where nodes reach it. Nodes in network namespaces
    #: cannot reach the machine's loopback, so netns clusters use the bridge address here.
    embedded_host: str = "127.0.0.1"
    embedded_port: Port = 18830
    topic_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "kmsim"

    @field_validator("embedded_host")
    @classmethod
    def _ipv4_literal(cls, value: str) -> str:
        # amqtt binds "host:port" and the netns bridge is IPv4: a name or an IPv6 address here
        # would fail later, far from the field that caused it.
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address (e.g. 127.0.0.1)") from None
        return value


class ContractsSpec(_Strict):
    """Confidential contracts (``kmnode.contracts``): the rollback anchor's cadence and each
    service enclave's internal cache. Cache settings may differ between nodes' builds without
    changing any result or root (the roots are of the state, not of how it was cached)."""

    #: The leader commits the state roots after every this many contract operations.
    checkpoint_every: Annotated[int, Field(ge=1, le=100_000)] = 100
    #: The internal cache's bounds (0 entries: no cache, every read goes to the host).
    cache_entries: Annotated[int, Field(ge=0, le=10_000_000)] = 4096
    cache_bytes: Annotated[int, Field(ge=0, le=1 << 34)] = 16 << 20
    #: Write back dirty entries after this many calls (and at every checkpoint).
    flush_every: Annotated[int, Field(ge=1, le=100_000)] = 64
    #: The modelled enclave-memory budget (past it, each page costs a modelled swap).
    epc_budget_bytes: Annotated[int, Field(ge=0, le=1 << 36)] = 64 << 20


#: The largest operator request body any configuration allows: one command's worth (what the
#: KM enclave takes over the circuit in an ``ApiCall``).
API_BODY_CAP = 64 * 1024


class LimitsSpec(_Strict):
    """How much a peer (or a host) can make a node hold or do before it is refused.

    Every connection to the peer port is hostile until its handshake has proved an attested
    member: before that it gets small frames, a small buffer, little time, and only a few such
    connections per address; after it, a Raft frame and its msgpack decoding are bounded too, so
    a compromised member cannot stall a node's event loop or exhaust its memory either.
    """

    #: Largest frame before the handshake completes (HELLO, ANSWER, FINISH: about 2 KiB).
    handshake_frame_bytes: Annotated[int, Field(ge=4096, le=1024 * 1024)] = 16 * 1024
    #: Bytes a connection may have waiting unread before its handshake completes; past it the
    #: connection closes. Room for the handshake and what a peer sends right after FINISH.
    handshake_buffer_bytes: Annotated[int, Field(ge=16 * 1024, le=64 * 1024 * 1024)] = 1024 * 1024
    #: Seconds a connection may take to complete its handshake.
    handshake_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    #: Incomplete inbound handshakes at once from one remote address, and from all together;
    #: a connection past either is closed at once (peer-link counter ``refused_busy``).
    handshakes_per_address: Annotated[int, Field(ge=1, le=4096)] = 8
    handshakes_total: Annotated[int, Field(ge=1, le=65536)] = 64
    #: Largest channel frame after the handshake (one Raft message, sealed).
    frame_bytes: Annotated[int, Field(ge=64 * 1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    #: msgpack decoding of a peer's Raft message: longest bin (entry data, snapshot), str
    #: (node id) and array (entries of an append, members), and arrays plus their elements in
    #: one message altogether (Raft sends at most 512 entries, about 2,000 elements, a message).
    msgpack_max_bin_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 8 * 1024 * 1024
    msgpack_max_str_bytes: Annotated[int, Field(ge=256, le=1024 * 1024)] = 1024
    msgpack_max_array_len: Annotated[int, Field(ge=1024, le=1_000_000)] = 4096
    msgpack_max_items: Annotated[int, Field(ge=4096, le=10_000_000)] = 65_536
    #: Largest operator request body (413 past it, refused by the host before reading it all,
    #: and by the KM enclave again) and deepest JSON nesting in one (400 past it, refused
    #: before parsing, so no body can make the parser recurse).
    api_body_bytes: Annotated[int, Field(ge=1024, le=API_BODY_CAP)] = API_BODY_CAP
    api_json_depth: Annotated[int, Field(ge=4, le=64)] = 32


def _default_nodes(count: int) -> list[NodeSpec]:
    return [
        NodeSpec(
            name=f"km{i}",
            peer_port=7100 + i,
            api_port=7200 + i,
            platform=PlatformSpec(id=f"platform-{i}"),
        )
        for i in range(1, count + 1)
    ]


class ClusterConfig(_Strict):
    cluster: Name = "demo"
    #: Node data directories and the simulated hardware store live here (relative to the file).
    state_dir: Path = Path(".kmsim")
    nodes: Annotated[list[NodeSpec], Field(min_length=1, max_length=64)] = _default_nodes(3)
    policy: PolicySpec = PolicySpec()
    raft: RaftSpec = RaftSpec()
    ledger: LedgerSpec = LedgerSpec()
    enclave: EnclaveSpec = EnclaveSpec()
    mqtt: MqttSpec = MqttSpec()
    #: The genesis operator identities and their roles (``kmctl identity keygen`` prints an
    #: entry); later changes are governance. None listed: `kmctl up` runs the development
    #: profile, with an admin key of its own in the state directory.
    identities: Annotated[list[PublicIdentity], Field(max_length=256)] = []
    governance: GovernanceSpec = GovernanceSpec()
    limits: LimitsSpec = LimitsSpec()
    contracts: ContractsSpec = ContractsSpec()

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise KeyError(f"no node named {name!r} in cluster {self.cluster!r} (nodes: {known})")

    @classmethod
    def default(cls, nodes: int = 3) -> ClusterConfig:
        """The embedded defaults: ``nodes`` KM nodes on 127.0.0.1, one platform each."""
        return cls(nodes=_default_nodes(nodes))


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _cross_field_problems(config: ClusterConfig) -> list[str]:
    problems: list[str] = []
    names: dict[str, int] = {}
    platforms: dict[str, int] = {}
    endpoints: dict[tuple[str, int], str] = {}
    for i, node in enumerate(config.nodes):
        if node.name in names:
            problems.append(f"nodes[{i}].name: {node.name!r} is also nodes[{names[node.name]}]")
        names.setdefault(node.name, i)
        if node.platform.id in platforms:
            problems.append(
                f"nodes[{i}].platform.id: {node.platform.id!r} is also the platform of "
                f"nodes[{platforms[node.platform.id]}] (one platform per node)"
            )
        platforms.setdefault(node.platform.id, i)
        for field_name in ("peer_port", "api_port"):
            # Where the node is reached: nodes listening on 0.0.0.0 on different machines
            # (advertising different names) may use the same ports.
            endpoint = (node.address, getattr(node, field_name))
            here = f"nodes[{i}].{field_name}"
            if endpoint in endpoints:
                problems.append(
                    f"{here}: {endpoint[0]}:{endpoint[1]} is already used by {endpoints[endpoint]}"
                )
            endpoints.setdefault(endpoint, here)
    problems += _netns_problems(config)
    if config.raft.heartbeat_ticks >= config.raft.election_ticks:
        problems.append(
            f"raft.heartbeat_ticks: {config.raft.heartbeat_ticks} must be below "
            f"raft.election_ticks ({config.raft.election_ticks})"
        )
    if not config.policy.accepted_tcb:
        problems.append("policy.accepted_tcb: empty list would refuse every platform")
    problems += _identity_problems(config)
    return problems


def _identity_problems(config: ClusterConfig) -> list[str]:
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, identity in enumerate(config.identities):
        if identity.name in seen:
            problems.append(
                f"identities[{i}].name: {identity.name!r} is also identities[{seen[identity.name]}]"
            )
        seen.setdefault(identity.name, i)
    if config.identities and not any("admin" in i.roles for i in config.identities):
        problems.append("identities: no identity has the admin role: nobody could govern")
    holders = sum(1 for i in config.identities if "recovery" in i.roles)
    wanted = config.governance.recovery_threshold
    if wanted > holders:
        problems.append(
            f"governance.recovery_threshold: {wanted} shares, but only {holders} identities "
            "have the recovery role"
        )
    return problems


def _netns_problems(config: ClusterConfig) -> list[str]:
    """Nodes in network namespaces only reach what is on the namespaces' bridge: their own
    address must be a real IPv4 address there (never loopback, which each namespace has its
    own of), every node must be in one (a node left on the machine's loopback is unreachable
    from the others), one namespace per node, and the embedded broker must be on the bridge."""
    in_netns = [(i, n) for i, n in enumerate(config.nodes) if n.netns is not None]
    if not in_netns:
        return []
    problems: list[str] = []
    first = f"nodes[{in_netns[0][0]}].netns"
    owners: dict[str, int] = {}
    for i, node in enumerate(config.nodes):
        if node.netns is None:
            problems.append(
                f"nodes[{i}].netns: not set, but {first} is: either every node runs in its own "
                "network namespace or none does"
            )
            continue
        if node.netns in owners:
            problems.append(
                f"nodes[{i}].netns: {node.netns!r} is also the namespace of "
                f"nodes[{owners[node.netns]}] (one namespace per node)"
            )
        owners.setdefault(node.netns, i)
        try:
            address = ipaddress.IPv4Address(node.host)
        except ValueError:
            problems.append(
                f"nodes[{i}].host: {node.host!r} is not an IPv4 address; a node in network "
                f"namespace {node.netns!r} needs its address there (e.g. 10.77.0.{11 + i})"
            )
            continue
        if address.is_loopback:
            problems.append(
                f"nodes[{i}].host: {node.host} is a loopback address, reachable only inside "
                f"namespace {node.netns!r} itself; use an address on the namespaces' bridge "
                f"(e.g. 10.77.0.{11 + i})"
            )
    if config.mqtt.url is None and ipaddress.IPv4Address(config.mqtt.embedded_host).is_loopback:
        problems.append(
            f"mqtt.embedded_host: {config.mqtt.embedded_host} is loopback, which nodes in "
            f"network namespaces ({first}) cannot reach; use the bridge address (e.g. 10.77.0.1)"
        )
    return problems


def parse_config(data: Any, source: str = "<config>") -> ClusterConfig:
    """Validate already-loaded YAML data; raise :class:`ConfigError` listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            source, [f"{_path(err['loc'])}: {err['msg']}" for err in exc.errors()]
        ) from None
    problems = _cross_field_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path) -> ClusterConfig:
    """Read and validate a cluster.yaml; a relative ``state_dir`` is taken from its folder."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"YAML syntax error at {where}: {problem}"]) from None
    config = parse_config(data, source)
    if not config.state_dir.is_absolute():
        config = config.model_copy(update={"state_dir": path.parent.resolve() / config.state_dir})
    return config


def find_config(explicit: Path | None, nodes: int | None = None) -> ClusterConfig:
    """The config a command should use: ``-c FILE``, else ./cluster.yaml, else the defaults."""
    if explicit is not None:
        return load_config(explicit)
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    if local.exists():
        return load_config(local)
    config = ClusterConfig.default(nodes or 3)
    return config.model_copy(update={"state_dir": Path.cwd() / config.state_dir})


def config_to_yaml(config: ClusterConfig) -> str:
    """The YAML form of a config (used to write cluster.yaml and the docker manifests)."""
    data = config.model_dump(mode="json")
    for node in data["nodes"]:
        # Only netns runs use namespaces; a ``netns: null`` on every default node is noise.
        if node.get("netns") is None:
            node.pop("netns", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
