"""A synchronous client of the operator API (docs/operator-api.md), for kmctl and the supervisor.

Synchronous ``urllib`` on purpose: kmctl makes a handful of requests per invocation, and a
blocking client keeps every command a plain function. Proxies from the environment are
ignored, because the API listens on cluster-internal addresses that a proxy cannot reach.

Every failure becomes a :class:`~kmnode.errors.KmsimError` with one line and an exit code
that follows the API's status: 409 refused → 1, 400/404 → 2, 421 (twice)/503/504/other → 3.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kmnode.config import ClusterConfig, NodeSpec
from kmnode.errors import EXIT_FAILURE, EXIT_REFUSED, EXIT_USAGE, KmsimError
from kmnode.identity import (
    DEV_IDENTITY,
    IdentityError,
    IdentityKeys,
    dev_key_path,
    find_key,
    sign_request,
)

DEFAULT_TIMEOUT = 10.0
#: How long to wait before the single retry when a follower does not know the leader yet.
NO_LEADER_PAUSE = 0.5

_EXIT_BY_STATUS = {
    400: EXIT_USAGE,
    401: EXIT_REFUSED,
    403: EXIT_REFUSED,
    404: EXIT_USAGE,
    409: EXIT_REFUSED,
}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NodeUnreachable(KmsimError):
    """The node could not be connected to: the request never reached it, so trying another
    node (or starting the cluster) is safe."""

    def __init__(self, node: str, address: str) -> None:
        super().__init__(
            f"node {node} at {address} is not reachable: is the cluster up? (kmctl up)",
            EXIT_FAILURE,
        )
        self.node = node


class ApiError(KmsimError):
    """The node answered with an error; ``status`` and ``code`` are the API's."""

    def __init__(self, node: str, status: int, code: str, message: str) -> None:
        exit_code = _EXIT_BY_STATUS.get(status, EXIT_FAILURE)
        prefix = "refused: " if status == 409 else ""
        hint = " (sign as an identity: --as NAME, or KMSIM_IDENTITY)" if code == "unsigned" else ""
        super().__init__(f"{prefix}{message}{hint} (HTTP {status} {code} from {node})", exit_code)
        self.node = node
        self.status = status
        self.code = code


def base_url(node: NodeSpec) -> str:
    return f"http://{node.address}:{node.api_port}"


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Any


def default_signer(config: ClusterConfig) -> IdentityKeys | None:
    """Whose key signs requests when a command names none: ``$KMSIM_IDENTITY`` (a name or a
    key file), else the development profile's admin key in the cluster's state directory if
    `kmctl up` made one, else nobody (the nodes then answer 401 ``unsigned``)."""
    named = os.environ.get("KMSIM_IDENTITY")
    return load_signer(config, named) if named else _dev_signer(config)


def load_signer(config: ClusterConfig, name_or_path: str) -> IdentityKeys:
    """The key file ``name_or_path`` names (``kmnode.identity.find_key``), loaded."""
    try:
        return IdentityKeys.load(find_key(name_or_path, config.state_dir))
    except IdentityError as exc:
        raise KmsimError(str(exc), EXIT_USAGE) from None


def _dev_signer(config: ClusterConfig) -> IdentityKeys | None:
    path = dev_key_path(config.state_dir)
    dev_listed = any(i.name == DEV_IDENTITY for i in config.identities)
    if (config.identities and not dev_listed) or not path.is_file():
        return None
    try:
        return IdentityKeys.load(path)
    except IdentityError as exc:
        raise KmsimError(str(exc), EXIT_USAGE) from None


@dataclass
class NodeClient:
    """Requests to one node's API, following a 421 to the leader once; each request signed by
    ``signer`` when there is one."""

    name: str
    url: str
    timeout: float = DEFAULT_TIMEOUT
    signer: IdentityKeys | None = None

    @classmethod
    def for_node(
        cls, node: NodeSpec, timeout: float = DEFAULT_TIMEOUT, signer: IdentityKeys | None = None
    ) -> NodeClient:
        return cls(node.name, base_url(node), timeout, signer)

    @property
    def address(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The decoded JSON body of a 2xx answer; anything else raises a KmsimError."""
        wait = self.timeout if timeout is None else timeout
        answer = _send(self.name, self.url, method, path, body, query, wait, self.signer)
        if answer.status != 421:
            return _result(self.name, answer)
        leader = answer.body if isinstance(answer.body, dict) else {}
        leader_name, leader_api = leader.get("leader"), leader.get("leader_api")
        if isinstance(leader_name, str) and isinstance(leader_api, str) and leader_api:
            target, url = leader_name, leader_api.rstrip("/")
        else:
            time.sleep(NO_LEADER_PAUSE)
            target, url = self.name, self.url
        try:
            retried = _send(target, url, method, path, body, query, wait, self.signer)
        except NodeUnreachable as exc:
            # Not NodeUnreachable: this node did answer, so trying others would mislead.
            raise KmsimError(
                f"{self.name} named {target} as the leader, but {exc.message}", EXIT_FAILURE
            ) from None
        if retried.status == 421:
            raise KmsimError(
                f"{target} is not the leader either (leadership is changing, or no leader is "
                "elected yet): retry shortly",
                EXIT_FAILURE,
            )
        return _result(target, retried)


def _send(
    node: str,
    url: str,
    method: str,
    path: str,
    body: Mapping[str, Any] | None,
    query: Mapping[str, str] | None,
    timeout: float,
    signer: IdentityKeys | None = None,
) -> _Answer:
    target = path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    full = url + target
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if signer is not None:
        headers.update(sign_request(signer, method, target, data or b""))
    request = urllib.request.Request(full, data=data, method=method, headers=headers)
    address = urllib.parse.urlsplit(url).netloc
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return _Answer(response.status, _decode(node, response.status, response.read()))
    except urllib.error.HTTPError as exc:
        with exc:
            return _Answer(exc.code, _decode(node, exc.code, exc.read()))
    except urllib.error.URLError as exc:
        # urllib raises URLError only while connecting and sending: the node never got it.
        raise NodeUnreachable(node, address) from exc
    except TimeoutError:
        raise KmsimError(
            f"node {node} at {address} did not answer {method} {path} within {timeout:g}s "
            "(a write may still commit)",
            EXIT_FAILURE,
        ) from None
    except OSError as exc:
        raise KmsimError(
            f"node {node} at {address} dropped the connection during {method} {path}: {exc}",
            EXIT_FAILURE,
        ) from None
    except http.client.HTTPException as exc:
        raise KmsimError(
            f"{address} (node {node}) did not answer in HTTP: {type(exc).__name__} "
            "(is another program on that port?)",
            EXIT_FAILURE,
        ) from None


def _decode(node: str, status: int, raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise KmsimError(
            f"node {node} answered HTTP {status} with a body that is not JSON", EXIT_FAILURE
        ) from None


def _result(node: str, answer: _Answer) -> Any:
    if 200 <= answer.status < 300:
        return answer.body
    body = answer.body if isinstance(answer.body, dict) else {}
    message = str(body.get("error") or f"HTTP {answer.status} without an error message")
    code = str(body.get("code") or "unknown")
    raise ApiError(node, answer.status, code, message)


@dataclass
class ClusterClient:
    """Talks to ``node`` if given, else to the first node of the config that accepts a
    connection; it stays on that node for the rest of the command."""

    config: ClusterConfig
    node: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: Whose key signs the requests; unset: ``default_signer(config)``.
    signer: IdentityKeys | None = None
    #: API URLs to use instead of the config's nodes (``--endpoint``, ``KMSIM_ENDPOINTS``):
    #: a cluster reached without its file. The leader is still found and followed.
    endpoints: Sequence[str] = ()
    _chosen: NodeClient | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.signer is None:
            self.signer = default_signer(self.config)
        if self.node is not None:
            try:
                spec = self.config.node(self.node)
            except KeyError as exc:
                raise KmsimError(str(exc.args[0]), EXIT_USAGE) from None
            self._chosen = NodeClient.for_node(spec, self.timeout, self.signer)

    @property
    def candidates(self) -> Sequence[NodeClient]:
        if self._chosen is not None:
            return [self._chosen]
        if self.endpoints:
            return [
                NodeClient(
                    urllib.parse.urlsplit(url).netloc, url.rstrip("/"), self.timeout, self.signer
                )
                for url in self.endpoints
            ]
        return [NodeClient.for_node(n, self.timeout, self.signer) for n in self.config.nodes]

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        if self._chosen is not None:
            return self._chosen.request(method, path, body, query, timeout)
        tried: list[str] = []
        for candidate in self.candidates:
            try:
                result = candidate.request(method, path, body, query, timeout)
            except NodeUnreachable:
                tried.append(f"{candidate.name} at {candidate.address}")
                continue
            self._chosen = candidate
            return result
        if self.endpoints:
            raise KmsimError(
                f"no endpoint answers ({', '.join(tried)}): check --endpoint/KMSIM_ENDPOINTS",
                EXIT_FAILURE,
            )
        raise KmsimError(
            f"no node of cluster {self.config.cluster!r} is reachable ({', '.join(tried)}): "
            "is the cluster up? (kmctl up)",
            EXIT_FAILURE,
        )

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(
        self, path: str, body: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        return self.request("POST", path, body=body if body is not None else {}, timeout=timeout)

    @property
    def chosen(self) -> str | None:
        """The node that answered (None before the first request)."""
        return self._chosen.name if self._chosen is not None else None


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def upload_blob(node: NodeSpec, digest: str, data: bytes, timeout: float = 30.0) -> bool:
    """PUT a dataset blob (ciphertext) to ``node``'s host store under its sha256; True if it
    was stored now, False if the node held it already. Unsigned: the host's own route
    (``kmnode.host.blob_host``), for bytes every reader checks by digest."""
    request = urllib.request.Request(
        f"{base_url(node)}/v1/node/data/blobs/{digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream", "Accept": "application/json"},
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return bool(response.status == 201)
    except urllib.error.HTTPError as exc:
        with exc:
            answer = _Answer(exc.code, _decode(node.name, exc.code, exc.read()))
        _result(node.name, answer)  # raises ApiError with the node's message
        raise AssertionError("unreachable") from None
    except (urllib.error.URLError, OSError):
        raise NodeUnreachable(node.name, f"{node.address}:{node.api_port}") from None
