"""Which code each enclave is, and therefore what its measurement is.

A measurement must change whenever the enclave's code changes, so it is computed from the
source bytes of the modules the enclave runs, read from this installation. The lists below are
the enclave's trusted computing base: anything added to an enclave belongs here.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

from attest.identity import EnclaveIdentity, EnclaveRole, measure_sources, signer_id

#: Security version of this build's enclaves; raise it when fixing a vulnerability in them.
ENCLAVE_SVN = 1
SIGNER = signer_id("kmsim")
PRODUCT_IDS = {EnclaveRole.KM: 1, EnclaveRole.SERVICE: 2}

#: Modules (a package means all of its .py files) that make up each enclave.
ENCLAVE_MODULES: dict[EnclaveRole, tuple[str, ...]] = {
    EnclaveRole.KM: ("attest", "kmnode.km"),
    EnclaveRole.SERVICE: (
        "attest.errors",
        "attest.identity",
        "attest.local",
        "attest.sealing",
        "attest.wire",
        "kmnode.service",
    ),
}


def enclave_sources(modules: tuple[str, ...]) -> dict[str, bytes]:
    """Source bytes of ``modules``, keyed by module-relative path."""
    sources: dict[str, bytes] = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"enclave module {module!r} is not installed")
        origin = Path(spec.origin)
        if spec.submodule_search_locations is not None:
            root = origin.parent
            files = sorted(root.rglob("*.py"))
            base = root.parent
        else:
            files = [origin]
            base = origin.parent.parent
        for file in files:
            sources[file.relative_to(base).as_posix()] = file.read_bytes()
    return sources


@cache
def current_identity(role: EnclaveRole) -> EnclaveIdentity:
    """This installation's identity for ``role`` (computed once per process)."""
    return EnclaveIdentity(
        measurement=measure_sources(enclave_sources(ENCLAVE_MODULES[role])),
        signer=SIGNER,
        product_id=PRODUCT_IDS[role],
        svn=ENCLAVE_SVN,
    )


def current_measurements() -> dict[EnclaveRole, bytes]:
    return {role: current_identity(role).measurement for role in EnclaveRole}


#: Environment variables that model a modified enclave build, per role (see ``build_identity``).
PATCH_VARIABLES = {EnclaveRole.KM: "KMSIM_KM_PATCH", EnclaveRole.SERVICE: "KMSIM_SERVICE_PATCH"}


def build_identity(role: EnclaveRole) -> EnclaveIdentity:
    """The identity this process's enclave of ``role`` runs with.

    Normally the installation's code (``current_identity``). If the role's patch variable is
    set, its text is measured together with the code, modelling a modified enclave build: the
    hardware then reports a different measurement, which tests and chaos runs use to show
    that such an enclave can neither join nor receive keys.
    """
    identity = current_identity(role)
    patch = os.environ.get(PATCH_VARIABLES[role])
    if not patch:
        return identity
    sources = enclave_sources(ENCLAVE_MODULES[role])
    sources["kmsim-patch"] = patch.encode()
    return EnclaveIdentity(
        measure_sources(sources), identity.signer, identity.product_id, identity.svn
    )
