"""A member that restarts behind the cluster learns the committed membership from another
member (``Joining.refresh_membership``), so it accepts the links of members that joined while it
was down, a new leader among them; and a refresh never turns a non-member into a member."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from attest.errors import AttestationError
from kmnode.km.enclave import JoinReply, JoinRequest, Purpose
from kmnode.km.join import Joining
from tests.km.enclaves import bare_enclave, commit, handshake, km_node

NEWCOMER = {"name": "n-x", "platform_id": "x", "host": "127.0.0.1", "peer_port": 7, "api_port": 8}


def test_a_member_behind_accepts_a_newer_member_only_after_learning_of_it() -> None:
    a = km_node("n-a", "a", genesis=True)
    behind = km_node("n-b", "b", cluster_id=a.cluster_id)  # same first entries as a
    _join(a, behind)  # n-b joined long ago: it holds the secret
    commit(a, "member.add", member=NEWCOMER)  # committed while n-b was down
    newcomer = bare_enclave("n-x", "x")
    with pytest.raises(AttestationError, match="'n-x' is not a known member"):
        handshake(newcomer, behind, Purpose.RAFT)  # n-b's own state does not name n-x yet
    dialled, accepted = handshake(behind, a, Purpose.JOIN)
    request = a.open_join_request(
        accepted, behind.join_request(dialled, "127.0.0.1", 3, 4, refresh=True)
    )
    assert request.refresh is True
    reply = behind.open_join_reply(dialled, a.join_reply(accepted, _admitted()))
    assert reply.status == "admitted"
    assert behind.directory()["n-x"] == "x"
    handshake(newcomer, behind, Purpose.RAFT)  # accepted now
    for n in range(10):  # n-b catches up past the index n-a answered at
        if behind.state.applied_index > a.state.applied_index:
            break
        commit(behind, "key.create", name=f"k{n}")
    assert "n-x" not in behind.directory()  # its own state decides again (no member.add seen)


class FakeNode:
    """What ``Joining.admit`` reads of a node: its state, its Raft view, ``propose``."""

    def __init__(self, leader: bool) -> None:
        self.enclave = km_node("n-a", "a", genesis=True)
        conf = SimpleNamespace(voters={"n-a", "n-b"})
        self.driver = SimpleNamespace(
            is_leader=leader, leader="n-a" if leader else "n-b", status=SimpleNamespace(conf=conf)
        )
        self.proposed: list[bytes] = []

    def raft(self) -> Any:
        return self.driver

    async def propose(self, command: bytes, timeout: float = 5.0) -> Any:
        self.proposed.append(command)
        raise AssertionError("a refresh must not propose anything")


def request(name: str, platform: str, refresh: bool) -> JoinRequest:
    return JoinRequest(name, platform, "127.0.0.1", 9, 10, refresh)


@pytest.mark.parametrize("leader", [True, False])
def test_any_member_answers_a_voter_and_no_refresh_adds_a_member(leader: bool) -> None:
    node = FakeNode(leader)
    joining = Joining(node)  # type: ignore[arg-type]
    admit = joining.admit
    assert asyncio.run(admit(request("n-b", "b", refresh=True))).status == "admitted"
    assert asyncio.run(admit(request("n-b", "b", refresh=False))).status == "admitted"
    stranger = asyncio.run(admit(request("n-z", "x", refresh=True)))
    assert stranger.status == "refused" and "not a voter" in stranger.reason
    impostor = asyncio.run(admit(request("n-b", "x", refresh=True)))  # n-b's name, other CPU
    assert impostor.status == "refused"
    assert node.proposed == []
    if not leader:  # a real join from a newcomer goes to the leader
        assert asyncio.run(admit(request("n-z", "x", refresh=False))).status == "redirect"


def _admitted() -> JoinReply:
    return JoinReply("admitted")


def _join(holder: Any, target: Any) -> None:
    """``target`` joins through ``holder`` (the cluster's secret, sealed on the channel)."""
    dialled, accepted = handshake(target, holder, Purpose.JOIN)
    holder.open_join_request(accepted, target.join_request(dialled, "127.0.0.1", 3, 4))
    target.open_join_reply(dialled, holder.join_reply(accepted, _admitted()))


@pytest.mark.parametrize("flag", ["yes", 1, None, [True]])
def test_a_refresh_flag_that_is_not_a_boolean_is_refused(flag: object) -> None:
    """What a tampered or buggy joiner could seal: the member refuses the request outright (it
    is neither a join nor a refresh) and its state is unchanged."""
    import json

    from kmnode.km.enclave import FrameRefused

    a = km_node("n-a", "a", genesis=True)
    joiner = km_node("n-b", "b", cluster_id=a.cluster_id)
    dialled, accepted = handshake(joiner, a, Purpose.JOIN)
    body = {"name": "n-b", "host": "127.0.0.1", "peer_port": 3, "api_port": 4, "refresh": flag}
    channel = joiner._sessions[dialled].party.result.channel  # as its own enclave would seal
    before = (dict(a.state.members), a.state.applied_index, a.directory())
    with pytest.raises(FrameRefused, match="refresh must be true or false"):
        a.open_join_request(accepted, channel.seal(json.dumps(body).encode()))
    assert (dict(a.state.members), a.state.applied_index, a.directory()) == before
