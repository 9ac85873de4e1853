"""What every kmctl command needs: the validated cluster config, loaded once per invocation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from kmnode import supervisor
from kmnode.cli.output import EXIT_USAGE, CliError
from kmnode.client import ClusterClient, default_signer, load_signer
from kmnode.config import DEFAULT_CONFIG_NAME, ClusterConfig, ConfigError, find_config
from kmnode.identity import IdentityKeys


@dataclass
class CliContext:
    config_path: Path | None
    #: ``--as``: the identity (a name or a key file) whose key signs API requests.
    identity: str | None = None
    #: ``--endpoint``/``KMSIM_ENDPOINTS``: API URLs that reach the cluster without its file.
    endpoints: tuple[str, ...] = ()
    #: Whether the fall-back to the embedded defaults was announced (once per invocation).
    _told: bool = False

    def signer(self, config: ClusterConfig) -> IdentityKeys | None:
        """The key that signs this invocation's requests (``kmnode.client.default_signer``
        when ``--as`` is not given)."""
        if self.identity:
            return load_signer(config, self.identity)
        return default_signer(config)

    def client(self, node: str | None = None, as_identity: str | None = None) -> ClusterClient:
        """The API client of this invocation: the running cluster's config, signed as
        ``signer`` (or as the command's own ``--as``), talking to ``node`` (default: the
        first reachable)."""
        cfg = supervisor.effective_config(self.config())
        signer = load_signer(cfg, as_identity) if as_identity else self.signer(cfg)
        if self.endpoints:
            return ClusterClient(cfg, None, signer=signer, endpoints=self.endpoints)
        return ClusterClient(cfg, node, signer=signer)

    def config(self) -> ClusterConfig:
        local = Path.cwd() / DEFAULT_CONFIG_NAME
        if (
            self.config_path is None
            and not local.exists()
            and not self._told
            and not self.endpoints
        ):
            click.echo(
                f"kmctl: no -c FILE, no $KMSIM_CONFIG and no ./{DEFAULT_CONFIG_NAME}: "
                "using the embedded defaults",
                err=True,
            )
            self._told = True
        try:
            return find_config(self.config_path)
        except ConfigError as exc:
            lines = "\n  ".join(exc.problems)
            raise CliError(f"invalid configuration {exc.source}:\n  {lines}", EXIT_USAGE) from None


pass_context = click.make_pass_decorator(CliContext)
