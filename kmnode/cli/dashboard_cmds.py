"""`kmctl dashboard`: serve a live, read-only page of the cluster (kmnode.dashboard)."""

from __future__ import annotations

import asyncio
import signal
import webbrowser

import click

from kmnode import supervisor
from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import EXIT_FAILURE, CliError


@click.command("dashboard")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but a loopback address shows the page to the network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port to listen on (0: any free port; the URL is printed).",
)
@click.option(
    "--open/--no-open",
    "open_browser",
    default=False,
    show_default=True,
    help="Open the page in this machine's web browser.",
)
@pass_context
def dashboard(ctx: CliContext, host: str, port: int, open_browser: bool) -> None:
    """Serve a live page of the cluster until Ctrl-C.

    The page shows every node (state, role, leader, term, commit/applied progress, peers,
    service enclave, release and attestation-failure rates, service ring fill), the attested
    links between nodes as a graph, and the last 20 audit records from MQTT. It updates about
    once a second from the nodes' open /v1/status and /metrics routes; nodes that do not
    answer show as down. The page is read-only and holds nothing secret.

    \b
    Example: kmctl dashboard --port 8090 --open
    """
    # Imported here: the server pulls in the Prometheus parser, which no other command needs.
    from kmnode.dashboard.server import is_loopback, serve

    cfg = supervisor.effective_config(ctx.config())
    if not is_loopback(host):
        click.echo(
            f"kmctl: the page is open to anyone who can reach {host}:{port or 'the port'}",
            err=True,
        )

    def ready(url: str) -> None:
        click.echo(f"dashboard of cluster {cfg.cluster!r} at {url} (Ctrl-C stops it)")
        if open_browser:
            webbrowser.open(url)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, host, port, ready, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        raise CliError(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}", EXIT_FAILURE
        ) from None
    click.echo("dashboard stopped", err=True)
