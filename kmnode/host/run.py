"""`kmctl node run NAME`: one node process, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kmnode import logsetup
from kmnode.config import ClusterConfig, config_to_yaml
from kmnode.host.api import OperatorApi
from kmnode.host.node import KMNode, NodeStartError

log = logging.getLogger("kmnode")


class MalformedHttpFilter(logging.Filter):
    """aiohttp answers a malformed request (bad request line, header or URL) with a 400 and
    logs it as an ERROR with a traceback. Anyone who can reach the port can send those, so
    each would put a traceback into the node's log: it becomes one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            reason = " ".join(str(error.message).split())[:200]
            record.msg, record.args = (
                "refused a malformed HTTP request (%s): %s",
                (error.code, reason),
            )
            record.exc_info = record.exc_text = None
        return True


async def serve(config: ClusterConfig, name: str) -> int:
    data_dir = config.state_dir / "nodes" / name
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = data_dir / "cluster.yaml"
    config_path.write_text(config_to_yaml(config))
    node = KMNode(config, config_path, name)
    stop = node.stop_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except NodeStartError as exc:
        # The KM enclave process logged the cause (and, for damage no crash explains, how
        # to replace the node).
        log.error("%s: cannot start: %s", name, exc)
        await node.stop()
        return 1
    runner = web.AppRunner(OperatorApi(node).app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, node.spec.host, node.spec.api_port)
        await site.start()
        log.info("%s: operator API on http://%s:%d", name, node.spec.host, node.spec.api_port)
        await stop.wait()
        log.info("%s: stopping", name)
    finally:
        await runner.cleanup()
        await node.stop()
    return node.exit_code


def run_node(config: ClusterConfig, name: str) -> int:
    """Run node ``name`` of ``config`` in this process; returns the process exit code."""
    config.node(name)
    logsetup.configure(name, "host")
    logging.getLogger("aiohttp.server").addFilter(MalformedHttpFilter())
    return asyncio.run(serve(config, name))


def main() -> None:
    import argparse
    from pathlib import Path

    from kmnode.config import load_config

    parser = argparse.ArgumentParser(description="Run one KM node (what `kmctl node run` does).")
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("name")
    args = parser.parse_args()
    sys.exit(run_node(load_config(args.config), args.name))


if __name__ == "__main__":
    main()
