"""A chaos run with contracts needs an identity that may deploy and call; without one it says
so and runs without them, instead of failing at its first call."""

from __future__ import annotations

from kmnode.chaos.runner import contracts_unavailable
from kmnode.config import ClusterConfig
from kmnode.identity import IdentityKeys

KEYS = IdentityKeys.generate("ops")


def listed(*roles: str) -> ClusterConfig:
    return ClusterConfig.default().model_copy(
        update={"identities": [KEYS.public(list(roles))]}  # type: ignore[arg-type]
    )


def test_the_roles_decide() -> None:
    assert contracts_unavailable(listed("operator", "user"), KEYS) == ""
    assert "lacks the operator or user role" in contracts_unavailable(
        listed("admin", "operator", "auditor"), KEYS
    )
    assert "lacks" in contracts_unavailable(listed("user"), KEYS)
    assert contracts_unavailable(ClusterConfig.default(), KEYS) == ""  # not listed: dev profile
    assert "no signing identity" in contracts_unavailable(ClusterConfig.default(), None)
