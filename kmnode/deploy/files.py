"""What a renderer returns: files (relative paths, text, modes) and notes for the operator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

import yaml

from kmnode.errors import EXIT_USAGE, KmsimError

#: Ordinary files: the compose file, manifests, the containers' cluster.yaml.
PUBLIC = 0o644
#: Files only their owner may read (a password hash file, the vendor root's Secret).
PRIVATE = 0o600
#: A directory only its owner may enter. Compose bind-mounts a secret file with the mode it has
#: on the host and no way to set another (``uid``/``gid``/``mode`` are swarm-only), so a file a
#: container's non-root user must read is readable by all, and its directory keeps the
#: machine's other users out instead.
PRIVATE_DIR = 0o700


class DeployError(KmsimError):
    """The cluster cannot be rendered for this target; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


@dataclass(frozen=True)
class RenderedFile:
    path: PurePosixPath
    #: The file's text. Secret files hold secrets here: never log or print it.
    content: str = field(repr=False)
    mode: int = PUBLIC


@dataclass(frozen=True)
class Rendering:
    """Everything one ``kmctl deploy render`` writes, and what the operator must do next."""

    files: tuple[RenderedFile, ...]
    #: Directories (relative) created with a mode other than 0755.
    dir_modes: dict[PurePosixPath, int] = field(default_factory=dict)
    #: One line each: what was decided for the operator, and the steps left to them.
    notes: tuple[str, ...] = ()

    def file(self, path: str) -> RenderedFile:
        for rendered in self.files:
            if rendered.path == PurePosixPath(path):
                return rendered
        raise KeyError(path)


class _Dumper(yaml.SafeDumper):
    """Never ``&id001``/``*id001``: a dict used twice is written twice, as people write it."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def dump_yaml(document: object) -> str:
    """YAML as people write it: block style, keys in the order the renderer put them."""
    return dump_yaml_all([document])


def dump_yaml_all(documents: list[object]) -> str:
    return yaml.dump_all(
        documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )
