"""The rule for tests that need something a newcomer's machine may lack: skip there, with the
reason and the install command; fail under CI or when asked for by name."""

from __future__ import annotations

import pytest

from tests.requirements import required, unavailable


def test_a_missing_package_skips_on_a_newcomers_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("KMSIM_REQUIRE_THING", raising=False)
    assert not required("THING")
    with pytest.raises(pytest.skip.Exception, match=r"no thing \(install: apt-get install thing\)"):
        unavailable("THING", "no thing", "apt-get install thing")


@pytest.mark.parametrize(
    ("name", "value"), [("CI", "true"), ("CI", "1"), ("KMSIM_REQUIRE_THING", "1")]
)
def test_under_ci_or_when_asked_a_missing_package_fails(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv(name, value)
    assert required("THING")
    with pytest.raises(pytest.fail.Exception, match="required here"):
        unavailable("THING", "no thing", "apt-get install thing")
