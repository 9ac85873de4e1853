"""Free loopback ports for tests that start servers: the benchmarks' chooser (ports needed
together are chosen together, so a config never gets one port twice), and a one-port form."""

from __future__ import annotations

from bench.ports import free_ports

__all__ = ["free_port", "free_ports"]


def free_port() -> int:
    """One free port on 127.0.0.1 (for a server that is the only one a test picks)."""
    return free_ports(1)[0]
