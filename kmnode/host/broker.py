"""The embedded MQTT broker for `kmctl up`, and where a node finds its broker.

The broker is amqtt run in its own OS process (``python -m kmnode.host.broker --port P``) rather
than inside a node, so that killing or crashing a node (which chaos runs do on purpose) never
takes the event stream of the other nodes down with it. It listens on ``mqtt.embedded_host``
(loopback unless the nodes run in network namespaces, which reach it on their bridge address)
and allows anonymous clients: it is a single-machine convenience, and ``mqtt.url`` in
cluster.yaml points at a real broker (mosquitto) for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from kmnode import logsetup
from kmnode.config import MqttSpec

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MQTT_PORT = 1883
MQTTS_PORT = 8883
#: Written to the broker log once the listener is bound; the parent waits for it, because a
#: port that accepts connections could belong to some other process.
READY_MARKER = "kmsim-broker-ready"
_LOG_TAIL_LINES = 20


class BrokerAddress(NamedTuple):
    host: str
    port: int
    tls: bool


class BrokerStartError(RuntimeError):
    """The embedded broker did not come up; the message carries the end of its log."""


def parse_mqtt_url(url: str) -> BrokerAddress:
    """Split ``mqtt://host[:port]`` (or ``mqtts://``); raise ValueError naming what is wrong.

    Anything the publisher would silently ignore (a path, credentials, a query) is refused, so a
    typo in cluster.yaml is not mistaken for a broker that just does not answer.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad MQTT URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"bad MQTT URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"bad MQTT URL {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"bad MQTT URL {url!r}: credentials in the URL are not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad MQTT URL {url!r}: only mqtt://host:port is allowed")
    if port == 0:
        raise ValueError(f"bad MQTT URL {url!r}: port 0 is not a broker port")
    tls = parts.scheme == "mqtts"
    default = MQTTS_PORT if tls else MQTT_PORT
    return BrokerAddress(parts.hostname, port if port is not None else default, tls)


def broker_address(spec: MqttSpec) -> BrokerAddress:
    """The broker a node or kmctl should use: ``mqtt.url`` if set, else the embedded one."""
    if spec.url:
        return parse_mqtt_url(spec.url)
    return BrokerAddress(spec.embedded_host, spec.embedded_port, False)


def start_embedded_broker(
    port: int, log_path: Path, *, host: str = LOOPBACK, timeout: float = 15.0
) -> subprocess.Popen[bytes]:
    """Start the broker process and return once it serves ``host``:``port``.

    The process gets its own session, so a Ctrl-C aimed at the command that started it does not
    kill the event stream of a running cluster; `stop_broker` is how it ends. This blocks while
    it waits (from asyncio code, run it with ``asyncio.to_thread``).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmnode.host.broker", "--host", host, "--port", str(port)],
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise BrokerStartError(
                f"embedded MQTT broker on {host}:{port} exited with code {code}; "
                f"end of {log_path}:\n{_log_tail(log_path, start_offset)}"
            )
        if _logged_ready(log_path, start_offset) and answers_mqtt(host, port):
            log.info("embedded MQTT broker pid %d on %s:%d", proc.pid, host, port)
            return proc
        if time.monotonic() >= deadline:
            stop_broker(proc)
            raise BrokerStartError(
                f"embedded MQTT broker on {host}:{port} not ready after {timeout:g}s; "
                f"end of {log_path}:\n{_log_tail(log_path, start_offset)}"
            )
        time.sleep(0.05)


def _child_env() -> dict[str, str]:
    """The child must import this very kmnode, even when it is not installed (a source tree)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def stop_broker(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM (the broker closes its sessions), then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("MQTT broker pid %d ignored SIGTERM for %gs; killing it", proc.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)
    return proc.returncode


def answers_mqtt(host: str, port: int) -> bool:
    """One MQTT 3.1.1 CONNECT/CONNACK/DISCONNECT exchange.

    A bare TCP probe would show up in the broker log as a client error on every start.
    """
    client_id = b"kmsim-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    connect = bytes([0x10, len(variable)]) + variable
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(connect)
            connack = b""
            while len(connack) < 4:
                chunk = sock.recv(4 - len(connack))
                if not chunk:
                    return False
                connack += chunk
            sock.sendall(b"\xe0\x00")
            return connack == b"\x20\x02\x00\x00"
    except OSError:
        return False


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _logged_ready(path: Path, offset: int) -> bool:
    return READY_MARKER in _read_from(path, offset)


def _log_tail(path: Path, offset: int) -> str:
    lines = _read_from(path, offset).splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(f"  | {line}" for line in lines) or "  | (empty)"


def broker_config(port: int, host: str = LOOPBACK) -> dict[str, object]:
    """amqtt settings: one TCP listener on ``host``, anonymous clients, no $SYS, no websockets."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(port: int, host: str = LOOPBACK) -> int:
    """Run the broker until SIGTERM or SIGINT; return the process exit code."""
    from amqtt.broker import Broker
    from amqtt.errors import BrokerError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(broker_config(port, host))
    try:
        await broker.start()
    except BrokerError as exc:
        log.error("cannot start MQTT broker on %s:%d: %s", host, port, exc)
        return 1
    log.info("%s: listening on %s:%d (pid %d)", READY_MARKER, host, port, os.getpid())
    await stop.wait()
    log.info("shutting down")
    await broker.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kmnode.host.broker",
        description="Embedded MQTT broker of a kmsim cluster (one local address, anonymous).",
    )
    parser.add_argument(
        "--host",
        default=LOOPBACK,
        help="IPv4 address to listen on (default %(default)s; a netns bridge address for "
        "clusters in network namespaces)",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port on --host")
    parser.add_argument(
        "--verbose", action="store_true", help="amqtt's own INFO logs (connections, sessions)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a TCP port")
    logsetup.configure("broker", "broker", stream=sys.stdout)
    # amqtt logs packets at DEBUG and session churn at INFO; neither belongs in a default log,
    # and payloads must never reach one.
    logging.getLogger("amqtt").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    return asyncio.run(serve(args.port, args.host))


if __name__ == "__main__":
    sys.exit(main())
