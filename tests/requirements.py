"""One rule for tests that need something the machine may lack (a system package, root):
they skip with the reason and the command that installs it on a newcomer's machine, and fail
instead wherever it must be there: under CI (``CI=true``, as CI services and `.ci/run`'s clean
clone set it) or when ``KMSIM_REQUIRE_<WHAT>=1`` asks for it by name."""

from __future__ import annotations

import os

import pytest


def required(what: str) -> bool:
    """Whether a missing ``what`` (e.g. ``NETNS``, ``BROWSER``, ``MOSQUITTO``) must fail."""
    if os.environ.get(f"KMSIM_REQUIRE_{what}") == "1":
        return True
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(what: str, reason: str, install: str) -> None:
    """Skip (a newcomer's machine) or fail (CI) because ``what`` is missing; never returns."""
    message = f"{reason} (install: {install})"
    if required(what):
        pytest.fail(f"{message}; this test is required here (CI or KMSIM_REQUIRE_{what}=1)")
    pytest.skip(message)
