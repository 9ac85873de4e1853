"""Signed operator requests for tests that talk to a KM enclave without the HTTP API: an admin
identity to list in a config, and ``ApiCall`` records signed as kmctl signs them."""

from __future__ import annotations

import json
from typing import Any

from kmnode.config import ClusterConfig
from kmnode.identity import IdentityKeys, sign_request
from kmnode.km_messages import ApiCall

#: One operator for every such test (its keys never leave the test process).
ADMIN = IdentityKeys.generate("admin")


def with_admin(cfg: ClusterConfig) -> ClusterConfig:
    """``cfg`` with ``ADMIN`` as its only identity (admin, operator and auditor)."""
    return cfg.model_copy(update={"identities": [ADMIN.public(["admin", "operator", "auditor"])]})


def api_call(method: str, target: str, body: Any = None, keys: IdentityKeys = ADMIN) -> ApiCall:
    """The ``ApiCall`` the host relays for ``method target`` with ``body``, signed by ``keys``."""
    data = b"" if body is None else json.dumps(body).encode()
    headers = {k.lower(): v for k, v in sign_request(keys, method, target, data).items()}
    return ApiCall.model_validate(
        {"method": method, "target": target, "headers": headers, "body": data}
    )
