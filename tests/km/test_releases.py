"""Provisioning from the host's side: a key is provisioned once per release, whatever the
service enclave's process does meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from kmnode.km.node import KMNode
from kmnode.km.releases import Releases
from kmnode.service.enclave import ServiceEnclave
from kmnode.service_pipe import ServiceUnavailable
from tests.km.enclaves import joined_pair, release, service


class DyingService:
    """Answers local attestation through a real service enclave, then dies on delivery."""

    def __init__(self, enclave: ServiceEnclave, die_on_delivery: bool) -> None:
        self.enclave = enclave
        self.die_on_delivery = die_on_delivery
        self.delivered: list[bytes] = []

    async def challenge(self, km_measurement: bytes, challenge: bytes) -> bytes:
        return self.enclave.answer_challenge(km_measurement, challenge)

    async def provide_key(self, ciphertext: bytes, vouch: bytes) -> tuple[str, int]:
        if self.die_on_delivery:
            raise ServiceUnavailable("service enclave exited")
        self.delivered.append(ciphertext)
        return self.enclave.accept_key(ciphertext, vouch)


class StubNode:
    def __init__(self, svc: DyingService) -> None:
        self.enclave, _ = joined_pair()
        self.name = self.enclave.name
        self.service = svc

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.ensure_future(coro)


async def test_a_service_that_dies_before_delivery_gets_no_second_provisioning() -> None:
    svc = DyingService(service("a"), die_on_delivery=True)
    node = StubNode(svc)
    releases = Releases(cast(KMNode, node))
    record = node.enclave.state.releases[release(node.enclave)]
    with pytest.raises(ServiceUnavailable, match="could not be delivered"):
        await releases._provision_to_service(record)
    svc.die_on_delivery = False  # the service is back: the same release is not provisioned again
    outcome = await releases._provision_to_service(record)
    assert not outcome.ok and "already handled" in outcome.reason and svc.delivered == []
    releases.close()


async def test_a_release_is_delivered_once() -> None:
    svc = DyingService(service("a"), die_on_delivery=False)
    node = StubNode(svc)
    releases = Releases(cast(KMNode, node))
    record = node.enclave.state.releases[release(node.enclave)]
    outcome = await releases._provision_to_service(record)
    assert outcome.ok and len(svc.delivered) == 1 and svc.enclave.holds("db", 1)
    releases.close()
