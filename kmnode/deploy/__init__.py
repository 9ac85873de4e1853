"""`kmctl deploy render`: docker compose files and Kubernetes manifests made from cluster.yaml.

Rendering is pure: each renderer takes a validated :class:`~kmnode.config.ClusterConfig` (and
whatever randomness or secret it needs, passed in) and returns a :class:`Rendering`, the files
to write with their modes. Writing them, generating passwords and reading the vendor root are
the CLI's (``kmnode.cli.deploy_cmds``), so every renderer is tested without touching a disk.

``containers``: the cluster.yaml the nodes read inside containers, the image's paths and probes;
``mosquitto``: the broker's accounts, password file, ACL and configuration; ``compose`` and
``k8s``: the two targets.
"""

from __future__ import annotations

from kmnode.deploy.files import DeployError, RenderedFile, Rendering

__all__ = ["DeployError", "RenderedFile", "Rendering"]
