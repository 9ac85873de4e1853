"""Test helpers: KM enclaves of one committed cluster, each behind its own attested peer
transport on 127.0.0.1 (port 0: the kernel picks a free one), with what each receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from attest.certs import TcbStatus
from attest.hardware import Platform, VendorRoot
from attest.identity import EnclaveIdentity, measure_sources, signer_id
from attest.policy import Policy
from attest.quote import QuoteVerifier
from consensus.types import Message, MessageType
from kmnode.km.commands import Applied
from kmnode.km.enclave import KMEnclave
from kmnode.km.peer_transport import AttestedTransport
from kmnode.km.peer_wire import DEFAULT_LIMITS, PeerLimits
from kmnode.km.state import encode_command

VENDOR = VendorRoot(b"links-vendor".ljust(32, b"\0"))
KM = EnclaveIdentity(measure_sources({"km": b"code"}), signer_id("t"), 1, 1)
#: Another allowed build: the policy can disallow it without touching ``KM``.
KM_OTHER = dataclasses.replace(KM, measurement=measure_sources({"km": b"other build"}))
POLICY = Policy(km_measurements=frozenset({KM.measurement, KM_OTHER.measurement}), min_svn=1)


def platform_of(name: str) -> str:
    return f"p{name}"


def member_record(name: str) -> dict[str, object]:
    return {
        "name": name,
        "platform_id": platform_of(name),
        "host": "127.0.0.1",
        "peer_port": 1,
        "api_port": 2,
    }


def commit(km: KMEnclave, op: str, **fields: object) -> Applied:
    """Apply a command at the enclave's next index, as a committed entry would be."""
    return km.state.apply(km.state.applied_index + 1, encode_command(op, **fields))


def member_enclave(name: str, members: list[str], identity: EnclaveIdentity = KM) -> KMEnclave:
    """An enclave whose committed state is a cluster of ``members`` under ``POLICY``; its
    bootstrap directory (cluster.yaml) lists them too."""
    platform = Platform(
        platform_of(name), TcbStatus.UP_TO_DATE, name.encode().ljust(32, b"\0"), VENDOR
    )
    km = KMEnclave(
        name,
        platform.enclave(identity),
        QuoteVerifier(VENDOR.public_key),
        bootstrap={m: platform_of(m) for m in members},
    )
    commit(
        km, "cluster.init", cluster="t", policy=POLICY.to_dict(), member=member_record(members[0])
    )
    for other in members[1:]:
        commit(km, "member.add", member=member_record(other))
    return km


class Transports:
    """Attested transports on loopback ports of their own, by node name: all listen first (so
    each knows the others' ports), then all start; stopped together."""

    transports: dict[str, AttestedTransport]
    ports: dict[str, int]
    received: dict[str, list[Message]]

    async def start(self) -> None:
        for name, transport in self.transports.items():
            await transport.listen()
            self.ports[name] = transport.port
        for name, transport in self.transports.items():
            await transport.start(self.received[name].extend)

    async def stop(self) -> None:
        for transport in self.transports.values():
            await transport.stop()


class Links(Transports):
    """One transport per member; each dials the members its own committed state lists."""

    def __init__(
        self,
        names: list[str],
        identities: dict[str, EnclaveIdentity] | None = None,
        limits: PeerLimits = DEFAULT_LIMITS,
    ) -> None:
        identities = identities or {}
        self.ports: dict[str, int] = {}
        self.received: dict[str, list[Message]] = {n: [] for n in names}
        self.enclaves = {n: member_enclave(n, names, identities.get(n, KM)) for n in names}
        self.transports = {
            n: AttestedTransport(
                n,
                km,
                addresses=self._addresses_for(km),
                host="127.0.0.1",
                port=0,
                limits=limits,
                reconnect_max=0.1,
            )
            for n, km in self.enclaves.items()
        }

    def _addresses_for(self, km: KMEnclave) -> Callable[[], dict[str, tuple[str, int]]]:
        def addresses() -> dict[str, tuple[str, int]]:
            return {n: ("127.0.0.1", self.ports[n]) for n in km.state.members if n in self.ports}

        return addresses

    def linked(self, frm: str, to: str) -> bool:
        return to in self.transports[frm].attested_peers()

    def send(self, frm: str, to: str, commit_index: int) -> None:
        self.transports[frm].send(
            Message(MessageType.HEARTBEAT, to=to, frm=frm, term=1, commit=commit_index)
        )

    def got(self, at: str, frm: str) -> list[int]:
        """Commit indexes of the heartbeats ``at`` received from ``frm``."""
        return [m.commit for m in self.received[at] if m.frm == frm]
