"""One round of questions to every node: ``GET /v1/status`` and ``GET /metrics``, unsigned.

Both routes are open (for probes and scrapers), so the dashboard needs no identity. Every answer
is bounded in time and size: a node that does not answer within the timeout is shown down, and
an answer larger than any real one is refused rather than read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
from pydantic import ValidationError

from kmnode.client import base_url
from kmnode.config import NodeSpec
from kmnode.dashboard.model import NodeSample, NodeStatus, parse_metrics

MAX_STATUS_BYTES = 256 << 10
MAX_METRICS_BYTES = 2 << 20
TIMEOUT_S = 2.0


class _Unanswered(Exception):
    """A request got no usable answer; ``down``: none at all (not reachable, too slow)."""

    def __init__(self, reason: str, down: bool) -> None:
        super().__init__(reason)
        self.reason, self.down = reason, down


async def _fetch(session: aiohttp.ClientSession, url: str, limit: int, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise _Unanswered(f"answered HTTP {response.status}", down=False)
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 << 10):
                    body += chunk
                    if len(body) > limit:
                        raise _Unanswered(f"answered more than {limit} bytes", down=False)
    except TimeoutError:
        raise _Unanswered(f"no answer within {timeout:g}s", down=True) from None
    except aiohttp.ClientError as exc:
        raise _Unanswered(f"not reachable ({type(exc).__name__})", down=True) from None
    return bytes(body)


async def sample_node(
    session: aiohttp.ClientSession, node: NodeSpec, timeout: float = TIMEOUT_S
) -> NodeSample:
    """What ``node`` answers now; a node whose status cannot be read is down or in error."""
    at = time.monotonic()
    url = base_url(node)
    status_body, metrics_body = await asyncio.gather(
        _fetch(session, f"{url}/v1/status", MAX_STATUS_BYTES, timeout),
        _fetch(session, f"{url}/metrics", MAX_METRICS_BYTES, timeout),
        return_exceptions=True,
    )
    if isinstance(status_body, _Unanswered):
        return NodeSample(node.name, at, error=status_body.reason, down=status_body.down)
    if isinstance(status_body, BaseException):
        raise status_body
    try:
        status = NodeStatus.model_validate_json(status_body)
    except ValidationError:
        return NodeSample(node.name, at, error="answered a /v1/status of another shape")
    if status.node is not None and status.node != node.name:
        return NodeSample(node.name, at, error=f"answers as node {status.node!r}")
    figures = None
    if isinstance(metrics_body, bytes):
        try:
            figures = parse_metrics(metrics_body.decode("utf-8"))
        except ValueError:  # not UTF-8 or not the Prometheus format: no rates for this poll
            figures = None
    elif not isinstance(metrics_body, _Unanswered):
        raise metrics_body
    return NodeSample(node.name, at, status=status, figures=figures)


async def sample_all(
    session: aiohttp.ClientSession, nodes: Sequence[NodeSpec], timeout: float = TIMEOUT_S
) -> dict[str, NodeSample]:
    """Every node at once: a round takes as long as the slowest node, at most ``timeout``."""
    samples = await asyncio.gather(*(sample_node(session, n, timeout) for n in nodes))
    return {s.name: s for s in samples}
