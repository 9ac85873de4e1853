"""The operator API's routes that the KM enclave serves: what each needs, and how a request
becomes one typed operator request.

One table serves both halves of a node: the host mounts these routes and relays each request
as it was signed (``ApiCall``); the KM enclave verifies the signature and then parses the
request here, from the signed method, path, query and body, so what it acts on is what the
client signed. A malformed request is refused with the field and what is wrong with it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kmnode.config import LimitsSpec
from kmnode.identity import Role
from kmnode.jsondepth import deeper_than
from kmnode.km_messages import (
    AttestRequest,
    AuditRead,
    CallContract,
    ChaosCheck,
    ContractRead,
    CreateKey,
    DataRead,
    DataWrite,
    DeployContract,
    PolicyChange,
    Propose,
    Prove,
    ReadRequest,
    RecoveryRead,
    ReleaseKey,
    RemoveMember,
    Request,
    ResyncContracts,
    RevokePlatform,
    RotateKey,
    SnapshotRead,
    SubmitShare,
    TransferLeader,
    Vote,
    Withdraw,
)

_HEX = re.compile(r"^[0-9a-f]*$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Longest challenge the proof workload takes, in bytes (``kmnode.service_pipe``).
MAX_CHALLENGE = 1024
#: Where the host serves the API's OpenAPI document (``kmnode/openapi.json``, built by
#: ``kmnode.openapi``).
OPENAPI_PATH = "/v1/openapi.json"
#: The limits a node uses unless its cluster.yaml sets others (``limits:``).
DEFAULT_LIMITS = LimitsSpec()


class BadCall(Exception):
    """The request cannot be served as sent: ``status`` 400 (with the field) or 404."""

    def __init__(self, message: str, *, status: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


Params = Mapping[str, str]
Body = dict[str, Any]
Build = Callable[[Params, Params, Body], Request]


@dataclass(frozen=True)
class Route:
    method: str
    #: aiohttp's form: ``/v1/keys/{name}/rotate``.
    path: str
    #: The role a signer needs (``kmnode.identity.PublicIdentity.may``).
    role: Role
    build: Build
    #: The HTTP status of a success.
    status: int = 200
    #: Other roles that may use the route as well (reads data owners and users share).
    also: tuple[Role, ...] = ()

    @property
    def roles(self) -> tuple[Role, ...]:
        return (self.role, *self.also)

    @property
    def pattern(self) -> re.Pattern[str]:
        return _pattern(self.path)


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


def _flag(query: Params, name: str) -> bool:
    return query.get(name) not in (None, "", "0", "false")


def _hex(body: Body, field: str, size: int | None = None) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not _HEX.match(value) or len(value) % 2:
        raise BadCall(f"{field!r} must be a lowercase hex string", field=field)
    if size is not None and len(value) != size * 2:
        raise BadCall(f"{field!r} must be {size} bytes", field=field)
    return value


def _read(what: str, name_from: str | None = None, query_name: str | None = None) -> Build:
    def build(params: Params, query: Params, body: Body) -> Request:
        name = params.get(name_from) if name_from else query.get(query_name or "")
        page: dict[str, object] = {}
        if "after" in query:
            page["after"] = query["after"]
        if "limit" in query:
            if not query["limit"].isdigit():
                raise BadCall("'limit' must be a positive integer", field="limit")
            page["limit"] = int(query["limit"])
        return ReadRequest.model_validate(
            {"what": what, "name": name, "linearizable": _flag(query, "linearizable"), **page}
        )

    return build


def _create_key(params: Params, query: Params, body: Body) -> Request:
    return CreateKey(name=body.get("name"), allowed_service=body.get("allowed_service", []))


def _rotate_key(params: Params, query: Params, body: Body) -> Request:
    return RotateKey(name=params["name"])


def _release_key(params: Params, query: Params, body: Body) -> Request:
    fields = {k: body[k] for k in ("node", "generation", "timeout") if k in body}
    if isinstance(fields.get("timeout"), int) and not isinstance(fields["timeout"], bool):
        fields["timeout"] = float(fields["timeout"])
    return ReleaseKey.model_validate({"key": params["name"], **fields})


def _prove(params: Params, query: Params, body: Body) -> Request:
    challenge = _hex(body, "challenge")
    key, generation = body.get("key"), body.get("generation")
    if not isinstance(key, str) or not isinstance(generation, int) or isinstance(generation, bool):
        raise BadCall("'key' (string) and 'generation' (int) are required")
    if not _KEY_NAME.match(key) or generation < 1:
        raise BadCall("'key' must be a key name, 'generation' >= 1")
    if not 0 < len(challenge) <= 2 * MAX_CHALLENGE:
        raise BadCall(f"'challenge' must be 1..{MAX_CHALLENGE} bytes", field="challenge")
    return Prove(key=key, generation=generation, challenge=bytes.fromhex(challenge))


def _policy_change(change: str) -> Build:
    def build(params: Params, query: Params, body: Body) -> Request:
        measurement = _hex(body, "measurement", 32)
        return PolicyChange.model_validate(
            {"change": change, "role": body.get("role"), "measurement": measurement}
        )

    return build


def _revoke_platform(params: Params, query: Params, body: Body) -> Request:
    return RevokePlatform(platform_id=body.get("platform_id"))


def _remove_member(params: Params, query: Params, body: Body) -> Request:
    return RemoveMember(name=body.get("name"))


def _attest(params: Params, query: Params, body: Body) -> Request:
    return AttestRequest()


def _chaos_check(params: Params, query: Params, body: Body) -> Request:
    return ChaosCheck()


def _propose(params: Params, query: Params, body: Body) -> Request:
    return Propose.model_validate({"actions": body.get("actions")})


def _vote(params: Params, query: Params, body: Body) -> Request:
    return Vote(proposal=params["id"], ballot=body.get("ballot"))


def _withdraw(params: Params, query: Params, body: Body) -> Request:
    return Withdraw(proposal=params["id"])


def _deploy(params: Params, query: Params, body: Body) -> Request:
    return DeployContract(name=body.get("name"), code=body.get("code"))


def _call_contract(params: Params, query: Params, body: Body) -> Request:
    fields = {k: body[k] for k in ("fuel", "timeout") if k in body}
    if isinstance(fields.get("timeout"), int) and not isinstance(fields["timeout"], bool):
        fields["timeout"] = float(fields["timeout"])
    return CallContract.model_validate(
        {
            "contract": params["name"],
            "function": body.get("function"),
            "args": body.get("args"),
            "nonce": body.get("nonce"),
            **fields,
        }
    )


def _contract_read(what: str, name_from: str | None = None) -> Build:
    def build(params: Params, query: Params, body: Body) -> Request:
        name = params.get(name_from) if name_from else None
        return ContractRead.model_validate({"what": what, "name": name})

    return build


def _resync(params: Params, query: Params, body: Body) -> Request:
    return ResyncContracts()


_DATA_READERS: tuple[Role, ...] = ("user", "owner")


def _data_write(command: str, name_field: str | None = None, path_field: str = "name") -> Build:
    """A data command from the body's fields, the path naming ``name_field`` (the dataset, the
    request or the grant); ``timeout`` is the wait, not a field of the command."""

    def build(params: Params, query: Params, body: Body) -> Request:
        fields = {k: v for k, v in body.items() if k != "timeout"}
        if name_field is not None:
            fields[name_field] = params[path_field]
        timeout = body.get("timeout", 10.0)
        if isinstance(timeout, int) and not isinstance(timeout, bool):
            timeout = float(timeout)
        return DataWrite.model_validate({"command": command, "fields": fields, "timeout": timeout})

    return build


_DATA_FILTERS = ("dataset", "user", "grant", "state", "node")


def _data_read(what: str, name_from: str | None = None) -> Build:
    def build(params: Params, query: Params, body: Body) -> Request:
        filters = {k: v for k, v in query.items() if k in _DATA_FILTERS}
        name = params.get(name_from) if name_from else None
        return DataRead.model_validate({"what": what, "name": name, "filters": filters})

    return build


def _recovery_read(what: str) -> Build:
    def build(params: Params, query: Params, body: Body) -> Request:
        return RecoveryRead.model_validate({"what": what})

    return build


def _snapshot(params: Params, query: Params, body: Body) -> Request:
    offset = query.get("offset", "0")
    if not offset.isdigit():
        raise BadCall("'offset' must be a byte offset", field="offset")
    return SnapshotRead.model_validate({"offset": int(offset), "snapshot": query.get("id")})


def _transfer_leader(params: Params, query: Params, body: Body) -> Request:
    fields = {k: body[k] for k in ("to", "timeout") if k in body}
    if isinstance(fields.get("timeout"), int) and not isinstance(fields["timeout"], bool):
        fields["timeout"] = float(fields["timeout"])
    return TransferLeader.model_validate(fields)


def _audit(params: Params, query: Params, body: Body) -> Request:
    fields: dict[str, int] = {}
    for name in ("since", "limit"):
        if name in query:
            if not query[name].isdigit():
                raise BadCall(f"{name!r} must be a non-negative integer", field=name)
            fields[name] = int(query[name])
    return AuditRead.model_validate(fields)


def _submit_share(params: Params, query: Params, body: Body) -> Request:
    return SubmitShare.model_validate(body)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/keys", "auditor", _read("keys")),
    Route("POST", "/v1/keys", "operator", _create_key, status=201),
    Route("GET", "/v1/keys/{name}", "auditor", _read("key", name_from="name")),
    Route("POST", "/v1/keys/{name}/rotate", "operator", _rotate_key),
    Route("POST", "/v1/keys/{name}/release", "operator", _release_key),
    Route("GET", "/v1/releases", "auditor", _read("releases", query_name="key")),
    Route("POST", "/v1/service/prove", "operator", _prove),
    Route("GET", "/v1/policy", "auditor", _read("policy")),
    Route("POST", "/v1/policy/allow", "admin", _policy_change("policy.allow")),
    Route("POST", "/v1/policy/disallow", "admin", _policy_change("policy.disallow")),
    Route("POST", "/v1/policy/revoke-platform", "admin", _revoke_platform),
    Route("GET", "/v1/members", "auditor", _read("members")),
    Route("POST", "/v1/members/remove", "admin", _remove_member),
    Route("GET", "/v1/attest", "auditor", _attest),
    Route("GET", "/v1/proposals", "auditor", _read("proposals")),
    Route("POST", "/v1/proposals", "admin", _propose, status=201),
    Route("GET", "/v1/proposals/{id}", "auditor", _read("proposal", name_from="id")),
    Route("POST", "/v1/proposals/{id}/vote", "admin", _vote),
    Route("POST", "/v1/proposals/{id}/withdraw", "admin", _withdraw),
    Route("GET", "/v1/identities", "auditor", _read("identities")),
    Route("GET", "/v1/contracts", "auditor", _contract_read("contracts")),
    Route("POST", "/v1/contracts", "operator", _deploy, status=201),
    Route("GET", "/v1/contracts/{name}", "auditor", _contract_read("contract", "name")),
    Route("POST", "/v1/contracts/{name}/calls", "user", _call_contract),
    Route("GET", "/v1/contract-input-key", "user", _contract_read("input-key")),
    Route("GET", "/v1/node/contracts", "auditor", _contract_read("node")),
    Route("POST", "/v1/node/contracts/resync", "operator", _resync),
    Route("GET", "/v1/data/keys", "auditor", _data_read("keys"), also=_DATA_READERS),
    Route("GET", "/v1/data/ops", "auditor", _data_read("ops"), also=_DATA_READERS),
    Route("POST", "/v1/data/ops", "operator", _data_write("data.op_register"), status=201),
    Route("GET", "/v1/datasets", "auditor", _data_read("datasets"), also=_DATA_READERS),
    Route("POST", "/v1/datasets", "owner", _data_write("data.register"), status=201),
    Route(
        "GET", "/v1/datasets/{name}", "auditor", _data_read("dataset", "name"), also=_DATA_READERS
    ),
    Route("POST", "/v1/datasets/{name}/grants", "owner", _data_write("data.grant", "dataset")),
    Route("POST", "/v1/datasets/{name}/requests", "user", _data_write("data.request", "dataset")),
    Route(
        "POST", "/v1/datasets/{name}/computations", "user", _data_write("data.compute", "dataset")
    ),
    Route("GET", "/v1/data/grants", "auditor", _data_read("grants"), also=_DATA_READERS),
    Route(
        "POST",
        "/v1/data/grants/{grant}/revoke",
        "owner",
        _data_write("data.revoke", "grant", "grant"),
    ),
    Route("GET", "/v1/data/requests", "auditor", _data_read("requests"), also=_DATA_READERS),
    Route(
        "POST",
        "/v1/data/requests/{request}/approve",
        "owner",
        _data_write("data.approve", "request", "request"),
    ),
    Route(
        "POST",
        "/v1/data/requests/{request}/deny",
        "owner",
        _data_write("data.deny", "request", "request"),
    ),
    Route("GET", "/v1/data/tokens", "auditor", _data_read("tokens"), also=_DATA_READERS),
    Route(
        "GET",
        "/v1/data/tokens/{token}",
        "auditor",
        _data_read("token", "token"),
        also=_DATA_READERS,
    ),
    Route("GET", "/v1/data/tokens/{token}/result", "user", _data_read("result", "token")),
    Route("GET", "/v1/node/data", "auditor", _data_read("node")),
    Route("GET", "/v1/recovery", "auditor", _recovery_read("status"), also=("recovery",)),
    Route("GET", "/v1/recovery/key", "auditor", _recovery_read("key"), also=("recovery",)),
    Route("POST", "/v1/recovery/shares", "recovery", _submit_share),
    Route("GET", "/v1/snapshot", "operator", _snapshot),
    Route("POST", "/v1/members/transfer-leader", "admin", _transfer_leader),
    Route("GET", "/v1/audit", "auditor", _audit),
)
#: What a node in recovery mode serves besides its status (``kmnode.km.recovery_feed``).
RECOVERY_PATHS = frozenset({"/v1/recovery", "/v1/recovery/key", "/v1/recovery/shares"})
#: The chaos routes (``kmnode.host.chaos_api``): the host serves them, once the KM enclave has
#: checked the request like any other (``ChaosCheck``: admin to inject, auditor to look, and
#: only while governance has chaos enabled).
CHAOS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/chaos/rules", "auditor", _chaos_check),
    *(
        Route("POST", f"/v1/chaos/{name}", "admin", _chaos_check)
        for name in (
            "rules",
            "heal",
            "ring-stall",
            "service-crash",
            "poison",
            "tamper-state",
            "tamper-blob",
        )
    ),
)
_COMPILED = tuple((route, route.pattern) for route in (*ROUTES, *CHAOS_ROUTES))


def parse_body(raw: bytes, max_depth: int = DEFAULT_LIMITS.api_json_depth) -> Body:
    """A request body: empty, or a JSON object (not nested deeper than ``max_depth``)."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadCall("body is not UTF-8") from None
    if deeper_than(text, max_depth):
        raise BadCall(f"body is nested deeper than {max_depth}")
    try:
        body = json.loads(text)
    except ValueError:
        raise BadCall("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadCall("body must be a JSON object")
    return body


def parse_call(
    method: str, target: str, raw_body: bytes, limits: LimitsSpec = DEFAULT_LIMITS
) -> tuple[Route, Request]:
    """The route ``method target`` names and the typed request it asks for, within the
    node's ``limits`` (body size: 413; JSON depth: 400)."""
    if len(raw_body) > limits.api_body_bytes:
        raise BadCall(
            f"body of {len(raw_body)} bytes exceeds the limit of {limits.api_body_bytes}",
            status=413,
        )
    split = urllib.parse.urlsplit(target)
    path = urllib.parse.unquote(split.path)
    query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
    for route, pattern in _COMPILED:
        match = pattern.match(path)
        if match is None or route.method != method:
            continue
        body = parse_body(raw_body, limits.api_json_depth) if method == "POST" else {}
        try:
            return route, route.build(match.groupdict(), query, body)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise BadCall(f"{field!r}: {error['msg']}", field=field) from None
    raise BadCall(f"no route {method} {path}", status=404)
