"""`kmctl deploy render compose|k8s`: write container deployments made from cluster.yaml.

The renderers (``kmnode.deploy``) are pure; this module does their I/O: the development
profile's identity, fresh broker passwords, this machine's vendor root when asked for, and
writing the files with their modes, never over existing files unless --force.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
from click.core import ParameterSource

from kmnode.cli.context import CliContext, pass_context
from kmnode.cli.output import EXIT_REFUSED, EXIT_USAGE, CliError, KmctlGroup
from kmnode.config import ClusterConfig
from kmnode.deploy import Rendering
from kmnode.deploy.compose import render_compose
from kmnode.deploy.k8s import render_k8s
from kmnode.deploy.mosquitto import READER, MqttAccount
from kmnode.simhw import HardwareStore, HardwareStoreError

TARGETS = ("compose", "k8s")
DEFAULT_OUTPUT = Path("deploy-out")
#: An image reference as docker takes it (name[:tag][@digest]); only a typo is caught here.
_IMAGE = re.compile(
    r"^[a-z0-9][a-z0-9._:/-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)
#: A Kubernetes storage quantity (binary or decimal suffix).
_QUANTITY = re.compile(r"^[1-9][0-9]*(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def _default_image() -> str:
    try:
        return f"kmsim:{version('kmsim')}"
    except PackageNotFoundError:  # pragma: no cover - only a source tree without metadata
        return "kmsim:latest"


@click.group("deploy", cls=KmctlGroup)
def deploy() -> None:
    """Container deployments (docker compose, Kubernetes) made from the cluster file."""


@deploy.command("render")
@click.argument("target", type=click.Choice(TARGETS))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to write into. Default: ./deploy-out/TARGET.",
)
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@click.option("--image", default=_default_image(), show_default=True, help="The node image.")
@click.option(
    "--storage",
    default="1Gi",
    show_default=True,
    help="k8s: the size of each node's volume (a Kubernetes quantity).",
)
@click.option(
    "--vendor-root",
    "with_vendor_root",
    is_flag=True,
    help="k8s: also write the Secret holding this machine's simulated vendor root (a secret; "
    "the file is owner-only). Without it, create the Secret yourself (the output says how).",
)
@pass_context
def render(
    ctx: CliContext,
    target: str,
    out_dir: Path | None,
    force: bool,
    image: str,
    storage: str,
    with_vendor_root: bool,
) -> None:
    """Write TARGET's files for the cluster file: compose (one service per node, a mosquitto
    broker with an account per node, volumes) or k8s (a StatefulSet and headless Service per
    node, a ConfigMap with the nodes' cluster.yaml, a PodDisruptionBudget; written for
    Kubernetes 1.31).

    In containers every node listens on 0.0.0.0 and is reached at its own name; the nodes'
    cluster.yaml is rendered from yours. With no identities in the file, the development
    profile's admin (its key in your state directory) is the cluster's identity, as with
    `kmctl up`. Prints each file written, then what is left to do.

    \b
    Example: kmctl deploy render compose --image kmsim:0.1.0
    Example: kmctl deploy render k8s -o deploy/k8s --image registry/kmsim:0.1.0 -c cluster.yaml
    """
    click_ctx = click.get_current_context()
    if target == "compose":
        for name in ("storage", "with_vendor_root"):
            if click_ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
                flag = "--" + name.removeprefix("with_").replace("_", "-")
                raise CliError(
                    f"{flag} is for k8s (compose nodes share one hardware volume on one machine)",
                    EXIT_USAGE,
                )
    if not _IMAGE.match(image):
        raise CliError(f"--image {image!r} is not an image reference (name[:tag])", EXIT_USAGE)
    if not _QUANTITY.match(storage):
        raise CliError(f"--storage {storage!r} is not a quantity such as 1Gi or 500Mi", EXIT_USAGE)
    cfg = _with_identities(ctx.config())
    if target == "compose":
        names = [n.name for n in cfg.nodes] + [READER]
        accounts = {name: MqttAccount.new(name) for name in names}
        rendering = render_compose(cfg, image=image, accounts=accounts)
    else:
        vendor = _vendor_root(cfg) if with_vendor_root else None
        rendering = render_k8s(cfg, image=image, storage=storage, vendor_root=vendor)
    root = out_dir if out_dir is not None else DEFAULT_OUTPUT / target
    for path in write_rendering(root, rendering, force=force):
        click.echo(f"wrote {path}")
    for note in rendering.notes:
        click.echo(f"next: {note}")


def _with_identities(cfg: ClusterConfig) -> ClusterConfig:
    # Imported here: the supervisor pulls in the API client, which no other deploy step needs.
    from kmnode.supervisor import with_identities

    return with_identities(cfg, lambda _name, message: click.echo(message, err=True))


def _vendor_root(cfg: ClusterConfig) -> bytes:
    try:
        return HardwareStore(cfg.state_dir / "hardware").export_vendor()
    except HardwareStoreError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None


def write_rendering(root: Path, rendering: Rendering, *, force: bool) -> list[Path]:
    """Write every file of ``rendering`` under ``root`` with its mode; return their paths.

    Nothing is written if a file exists and ``force`` is not set. A file is never written
    through a symbolic link, and an existing file gets the rendered mode (a secret file
    rendered again does not keep a wider mode it was given).
    """
    targets = [(root / Path(*f.path.parts), f) for f in rendering.files]
    existing = [str(path) for path, _ in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        raise CliError(
            f"not overwriting {', '.join(existing)} (use --force to replace them)", EXIT_USAGE
        )
    for relative, mode in rendering.dir_modes.items():
        directory = root / Path(*relative.parts)
        directory.mkdir(parents=True, exist_ok=True, mode=mode)
        directory.chmod(mode)
    written = []
    for path, rendered in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | (0 if force else os.O_EXCL)
        try:
            fd = os.open(path, flags, rendered.mode)
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror}", EXIT_USAGE) from None
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), rendered.mode)
            out.write(rendered.content)
        written.append(path)
    return written
