"""Which code each enclave is, and therefore what its measurement is.

A measurement must change whenever the enclave's code changes, so it is computed from the bytes
of every project module (and compiled extension) that the enclave's entry modules import,
followed transitively (``kmnode.imports``): nobody keeps a list that could forget a module. The
coverage of both is checked against their real processes (``tests/test_enclave_identity``
asks the running enclave which project modules it loaded).
"""

from __future__ import annotations

import os
from functools import cache

from attest.identity import EnclaveIdentity, EnclaveRole, measure_sources, signer_id
from kmnode.imports import import_closure, module_sources

#: Security version of this build's enclaves; raise it when fixing a vulnerability in them.
ENCLAVE_SVN = 1
SIGNER = signer_id("kmsim")
PRODUCT_IDS = {EnclaveRole.KM: 1, EnclaveRole.SERVICE: 2}

#: The modules each enclave starts from; its code is everything they import.
ENCLAVE_ENTRIES: dict[EnclaveRole, tuple[str, ...]] = {
    EnclaveRole.KM: ("kmnode.km.process",),
    EnclaveRole.SERVICE: ("kmnode.service.process",),
}


@cache
def enclave_modules(role: EnclaveRole) -> frozenset[str]:
    """Every project module the enclave of ``role`` loads (its trusted computing base)."""
    return import_closure(ENCLAVE_ENTRIES[role])


def enclave_sources(role: EnclaveRole) -> dict[str, bytes]:
    """Bytes of the enclave's modules, keyed by path relative to the installation."""
    return module_sources(enclave_modules(role))


#: Environment variable naming the release this installation models (unset: the code as it
#: is). A release changes both enclaves' code, so both measurements; a release's service
#: enclave trusts that release's KM enclave. It models an upgrade (issue 16); a patch
#: (``PATCH_VARIABLES``) models a modified build nobody trusts.
RELEASE_VARIABLE = "KMSIM_RELEASE"


@cache
def release_identity(role: EnclaveRole, release: str) -> EnclaveIdentity:
    """The identity of ``role``'s enclave in ``release`` ("" : the installed code alone)."""
    sources = enclave_sources(role)
    if release:
        sources["kmsim-release"] = release.encode()
    return EnclaveIdentity(
        measurement=measure_sources(sources),
        signer=SIGNER,
        product_id=PRODUCT_IDS[role],
        svn=ENCLAVE_SVN,
    )


def current_identity(role: EnclaveRole) -> EnclaveIdentity:
    """This installation's identity for ``role``: its code, in the release it models."""
    return release_identity(role, os.environ.get(RELEASE_VARIABLE, ""))


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
    sources = enclave_sources(role)
    release = os.environ.get(RELEASE_VARIABLE, "")
    if release:
        sources["kmsim-release"] = release.encode()
    sources["kmsim-patch"] = patch.encode()
    return EnclaveIdentity(
        measure_sources(sources), identity.signer, identity.product_id, identity.svn
    )
