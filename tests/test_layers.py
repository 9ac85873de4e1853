"""Imports only go down the layers: a walk over every import statement of the project.

The layers, top to bottom: the CLI (``kmnode.cli``); the chaos tools (``kmnode.chaos``); the
orchestration of nodes (``kmnode.supervisor``, ``kmnode.client``, ``kmnode.netns``); the
untrusted host of a node (``kmnode.host``) and the offline ledger check (``kmnode.ledger``);
the enclaves (``kmnode.km``, ``kmnode.service``); shared pieces (config, ring, simulated
hardware, measurement, errors); and the pure libraries ``consensus`` and ``attest``.

The host must not reach into the enclaves: both run in processes of their own, and the host
reaches them only through the messages of their pipes (``kmnode.km_messages``,
``kmnode.service_pipe``), which live in the shared layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmnode.imports import direct_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attest", "consensus", "kmnode")


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append(".".join(parts))
    return found


MODULES = _modules()


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


#: (importers, what they must not import): each rule is one boundary of the layering.
_BELOW_CHAOS = (
    "attest", "consensus", "kmnode.host", "kmnode.km", "kmnode.service", "kmnode.supervisor",
    "kmnode.client", "kmnode.netns", "kmnode.config", "kmnode.ring", "kmnode.simhw",
    "kmnode.ledger", "kmnode.recovery_client",
)  # fmt: skip
_BELOW_ORCHESTRATION = (
    "attest", "consensus", "kmnode.host", "kmnode.km", "kmnode.service", "kmnode.config",
    "kmnode.ring", "kmnode.simhw", "kmnode.identity", "kmnode.api_routes",
)  # fmt: skip
_ORCHESTRATION = ("kmnode.supervisor", "kmnode.client", "kmnode.netns", "kmnode.recovery_client")
#: What both halves of a node share: configuration, the rings and the messages over them.
_SHARED = (
    "kmnode.config", "kmnode.ring", "kmnode.simhw", "kmnode.enclave_code", "kmnode.imports",
    "kmnode.errors", "kmnode.circuit", "kmnode.km_messages", "kmnode.service_pipe",
    "kmnode.linkfaults", "kmnode.datadir", "kmnode.identity", "kmnode.api_routes",
    "kmnode.jsondepth", "kmnode.histogram", "kmnode.logsetup", "kmnode.procfs",
    "kmnode.metric_families",
)  # fmt: skip

#: (importers, what they must not import): each rule is one boundary of the layering.
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    # Nothing but the CLI imports the CLI.
    (("attest", "consensus", "kmnode"), ("kmnode.cli",)),
    # The chaos tools serve the CLI only.
    (_BELOW_CHAOS, ("kmnode.chaos",)),
    # Orchestration is above the node.
    (_BELOW_ORCHESTRATION, _ORCHESTRATION),
    # The enclaves never depend on the untrusted host (nor on each other).
    (("kmnode.km",), ("kmnode.host", "kmnode.service", "kmnode.ledger")),
    (("kmnode.service",), ("kmnode.host", "kmnode.km", "kmnode.ledger")),
    # The host uses the service enclave only through its process and pipe.
    (("kmnode.host",), ("kmnode.service",)),
    # The host reaches the KM enclave only through the circuit (and serves the OpenAPI document
    # from its file: the builder reads the enclave's types).
    (("kmnode.host",), ("kmnode.km", "kmnode.openapi")),
    # The shared layer sits below both halves of a node.
    (_SHARED, ("kmnode.host", "kmnode.km", "kmnode.service", "kmnode.ledger")),
    # The contract library is pure (the enclave, tests and benchmarks drive it; the CLI: above).
    (("kmnode.contracts",), ("kmnode.host", "kmnode.km", "kmnode.service", "kmnode.chaos")),
    # The data-authorization library is pure (the KM and service enclaves drive it; the CLI: above).
    (("kmnode.dataauth",), ("kmnode.host", "kmnode.km", "kmnode.service", "kmnode.chaos")),
    # The recovery-share library is pure (the KM enclave and the CLI drive it).
    (("kmnode.recovery",), ("kmnode.host", "kmnode.km", "kmnode.service", "kmnode.chaos")),
    # The pure libraries stand alone.
    (("attest",), ("consensus", "kmnode")),
    (("consensus",), ("attest", "kmnode")),
]


def violations() -> list[str]:
    found = []
    for module in MODULES:
        imported = direct_imports(module)
        for importers, forbidden in RULES:
            if not _under(module, importers):
                continue
            for target in sorted(imported):
                if _under(target, forbidden) and not _under(module, forbidden):
                    found.append(f"{module} imports {target}")
    return sorted(set(found))


def test_the_walk_sees_every_module() -> None:
    assert len(MODULES) > 90
    assert "kmnode.host.node" in MODULES and "kmnode.cli" in MODULES
    assert "kmnode.km.enclave" in direct_imports("kmnode.km.node")
    assert "kmnode.host.km_link" in direct_imports("kmnode.host.node")


def test_imports_only_go_down_the_layers() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "target"),
    [("kmnode.host.mqtt", "kmnode.km.enclave"), ("kmnode.chaos.runner", "kmnode.cli.output")],
)
def test_a_violation_is_reported(module: str, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = direct_imports

    def with_extra(name: str) -> set[str]:
        return real(name) | ({target} if name == module else set())

    monkeypatch.setattr(f"{__name__}.direct_imports", with_extra)
    assert violations() == [f"{module} imports {target}"]
