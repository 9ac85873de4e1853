"""The repository's promises about itself: README commands, CI script, Dockerfile."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_first_screen() -> str:
    return "\n".join((REPO / "README.md").read_text().splitlines()[:12])


def test_readme_first_screen_has_install_and_test_commands() -> None:
    screen = readme_first_screen()
    assert "pip install -e '.[dev]'" in screen
    assert "python -m pytest" in screen


def test_ci_installs_and_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert "set -euo pipefail" in ci
    assert "apt-get install" in ci and "pip install" in ci
    assert re.search(r"^python3? -m pytest\s*$", ci, re.MULTILINE)


def test_dockerfile_copies_every_package_and_installs_it() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.MULTILINE), package
    for needed in ("pyproject.toml", "setup.py"):
        assert needed in dockerfile
    # Multi-stage: the builder makes the wheels (compiling the ring), the runtime installs them.
    assert re.search(r"^RUN pip wheel .* \.$", dockerfile, re.MULTILINE)
    assert re.search(
        r"pip install .*--no-index --find-links /wheels kmsim$", dockerfile, re.MULTILINE
    )
    assert 'ENTRYPOINT ["kmctl"]' in dockerfile
    assert project["project"]["scripts"]["kmctl"] == "kmnode.cli:main"
