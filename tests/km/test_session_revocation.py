"""A member the cluster removes, or whose platform or build the policy stops allowing, loses
its established links at once, inbound and outbound, and cannot handshake its way back."""

from __future__ import annotations

import asyncio

import pytest

from attest.errors import AttestationError, UnknownPeer
from kmnode.km.enclave import KMEnclave, Purpose
from tests.host import eventually
from tests.km.enclaves import bare_enclave
from tests.km.peer_links import KM_OTHER, Links, commit, platform_of

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0


async def all_linked(links: Links) -> None:
    names = list(links.transports)
    await eventually(
        lambda: all(links.linked(a, b) for a in names for b in names if a != b),
        "every member linked to every other",
    )


async def assert_cut_off(links: Links, gone: str) -> None:
    """``gone`` has no link to a or b any more, cannot make one, and what it sends after the
    change never arrives; a and b still talk to each other."""
    a, b = links.transports["a"], links.transports["b"]
    refused_before = a.stats.refused
    await eventually(
        lambda: not links.linked(gone, "a") and not links.linked(gone, "b"),
        f"{gone}'s links to a and b closing",
    )
    # It keeps dialling (its own state still lists a and b): every attempt is refused.
    await eventually(lambda: a.stats.refused > refused_before, f"a refusing {gone} again")
    assert not links.linked(gone, "a")
    heard = len(links.got("a", gone))
    for i in range(5):
        links.send(gone, "a", 1000 + i)
        links.send("a", "b", 2000 + i)
    await eventually(lambda: len(links.got("b", "a")) >= 5, "a's messages at b")
    await asyncio.sleep(0.2)
    assert links.got("a", gone)[heard:] == []
    assert "a" not in b.attested_peers() or b.attested_peers()["a"] == platform_of("a")


async def test_a_removed_member_loses_both_links_and_cannot_handshake_again() -> None:
    links = Links(["a", "b", "c"])
    await links.start()
    try:
        await all_linked(links)
        links.send("c", "a", 1)
        await eventually(lambda: links.got("a", "c") == [1], "c's message at a")
        for name in ("a", "b"):  # c does not apply its own removal: it keeps trying
            commit(links.enclaves[name], "member.remove", name="c")
            links.transports[name].revalidate()
        a = links.transports["a"]
        # a's outbound link to c and c's inbound link at a both closed.
        assert a.stats.revoked == 2
        assert "c" not in a.attested_peers()
        await assert_cut_off(links, "c")
    finally:
        await links.stop()


async def test_revoking_a_members_platform_closes_its_links() -> None:
    links = Links(["a", "b", "c"])
    await links.start()
    try:
        await all_linked(links)
        for name in ("a", "b"):
            commit(links.enclaves[name], "policy.revoke_platform", platform_id=platform_of("c"))
            assert links.transports[name].revalidate() == 2
        assert links.transports["a"].attested_peers() == {"b": platform_of("b")}
        await assert_cut_off(links, "c")
    finally:
        await links.stop()


async def test_disallowing_a_members_build_closes_its_links_only() -> None:
    links = Links(["a", "b", "c"], identities={"c": KM_OTHER})
    await links.start()
    try:
        await all_linked(links)
        for name in ("a", "b"):
            commit(
                links.enclaves[name],
                "policy.disallow",
                role="km",
                measurement=KM_OTHER.measurement.hex(),
            )
            assert links.transports[name].revalidate() == 2
        await assert_cut_off(links, "c")
        assert links.transports["a"].stats.revoked == 2
    finally:
        await links.stop()


async def test_a_change_not_yet_revalidated_still_refuses_every_frame() -> None:
    """Between the change and ``revalidate``, a send to the revoked peer does not raise into
    Raft: the link closes and the message is dropped."""
    links = Links(["a", "b", "c"])
    await links.start()
    try:
        await all_linked(links)
        commit(links.enclaves["a"], "policy.revoke_platform", platform_id=platform_of("c"))
        dropped = links.transports["a"].stats.dropped_disconnected
        links.send("a", "c", 7)
        assert links.transports["a"].stats.dropped_disconnected == dropped + 1
        assert not links.linked("a", "c")
        await asyncio.sleep(0.2)
        assert links.got("c", "a") == []
    finally:
        await links.stop()


async def test_unchanged_membership_keeps_every_link() -> None:
    links = Links(["a", "b", "c"])
    await links.start()
    try:
        await all_linked(links)
        commit(links.enclaves["a"], "key.create", name="db")
        assert links.transports["a"].revalidate() == 0
        assert links.transports["a"].stats.revoked == 0
        assert set(links.transports["a"].attested_peers()) == {"b", "c"}
    finally:
        await links.stop()


def handshake(initiator: KMEnclave, responder: KMEnclave) -> None:
    """Run a Raft handshake between two enclaves through their entry points."""
    session, hello = initiator.open_initiator(responder.name, Purpose.RAFT)
    accepting = responder.open_responder(Purpose.RAFT)
    answer = responder.handshake_step(accepting, hello, NOW)
    assert answer is not None
    finish = initiator.handshake_step(session, answer, NOW)
    assert finish is not None
    responder.handshake_step(accepting, finish, NOW)


def test_a_member_whose_state_is_not_replayed_yet_ignores_cluster_yaml() -> None:
    """A member restarting (master secret unsealed, log not yet applied) accepts only the
    membership a member sent it, never the bootstrap list: a node the cluster removed may
    still be in cluster.yaml."""
    removed = bare_enclave("n-c", "c")  # in cluster.yaml's bootstrap list
    restarting = bare_enclave("n-a", "a")
    restarting.genesis()  # holds a master secret: it belongs to a cluster
    assert "n-c" not in restarting.directory()
    with pytest.raises(UnknownPeer):
        handshake(removed, restarting)
    # A node that never joined anything still uses cluster.yaml to find the cluster.
    joining = bare_enclave("n-b", "b")
    assert joining.directory() == {"n-a": "a", "n-c": "c"}
    try:
        handshake(removed, joining)
    except AttestationError as exc:  # pragma: no cover - the assertion says what failed
        raise AssertionError(f"a bootstrap peer was refused: {exc}") from exc
