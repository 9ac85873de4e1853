"""Free loopback ports for the clusters the benchmarks (and the tests) start.

Ports a run needs together are chosen together: every socket stays bound until all are
picked, so two roles never get the same port (picking them one at a time can hand the same
just-released port out twice)."""

from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports
