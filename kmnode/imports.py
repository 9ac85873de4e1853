"""The project modules a piece of code can load: the transitive closure of its imports.

An enclave's measurement must cover every project module (and compiled extension) that the
enclave process loads, and nothing that a hand-kept list could forget. This walks the import
statements of the enclave's entry modules, recursively, the way the interpreter would resolve
them: ``import a.b`` loads ``a`` and ``a.b``; ``from a import b`` loads ``a`` and, when ``b`` is a
submodule, ``a.b``; relative imports resolve against the importing package. Imports guarded by
``if TYPE_CHECKING:`` are left out (they never run); imports inside functions are kept (they may
run). Only modules of the project's own packages are followed; the standard library and
third-party packages are the simulated enclave's "runtime", outside the measurement.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

#: Top-level packages of this project: their modules are measured, nothing else is.
PROJECT_PACKAGES = ("attest", "consensus", "kmnode")


def _is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


@cache
def module_file(module: str) -> Path | None:
    """The file project module ``module`` loads from (source or extension), or None.

    Found on disk from its top-level package's location, without importing anything:
    ``importlib.util.find_spec("a.b")`` would import package ``a`` (and, for the ring, its
    compiled extension), and measuring must not load code into the process it measures.
    """
    if not _is_project(module):
        return None
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level lookup imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations)))
    parts = rest.split(".") if rest else []
    directory = base.joinpath(*parts[:-1]) if parts else base
    if not parts:
        candidates = [base / "__init__.py"]
    else:
        name = parts[-1]
        candidates = [directory / name / "__init__.py", directory / f"{name}.py"]
        candidates += [directory / f"{name}{suffix}" for suffix in EXTENSION_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


def _parents(module: str) -> Iterator[str]:
    parts = module.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that can run (those under ``if TYPE_CHECKING:`` cannot)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if _type_checking_block(node):
            assert isinstance(node, ast.If)
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def direct_imports(module: str) -> set[str]:
    """Project modules that ``module``'s own import statements load."""
    path = module_file(module)
    if path is None or path.suffix != ".py":
        return set()  # an extension: its imports are found by the import-graph test at run time
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = _resolve(module, is_package, node)
            names = [base]
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if alias.name != "*" and module_file(candidate) is not None:
                    names.append(candidate)
        for name in names:
            if _is_project(name):
                found.add(name)
                found.update(_parents(name))
    return found


def import_closure(entries: Iterable[str]) -> frozenset[str]:
    """Every project module that loading ``entries`` loads (the entries included)."""
    seen: set[str] = set()
    todo = [m for e in entries for m in (*_parents(e), e)]
    while todo:
        module = todo.pop()
        if module in seen or not _is_project(module):
            continue
        if module_file(module) is None:
            raise ModuleNotFoundError(f"module {module!r} is imported but not installed")
        seen.add(module)
        todo.extend(direct_imports(module) - seen)
    return frozenset(seen)


def module_sources(modules: Iterable[str]) -> dict[str, bytes]:
    """The bytes of each module's file, keyed by its path relative to the install root (so
    a file renamed or moved changes the measurement too)."""
    sources: dict[str, bytes] = {}
    for module in sorted(modules):
        path = module_file(module)
        if path is None:
            raise ModuleNotFoundError(f"module {module!r} is not installed")
        depth = module.count(".") + (1 if path.name.startswith("__init__.") else 0)
        root = path.parents[depth]
        sources[path.relative_to(root).as_posix()] = path.read_bytes()
    return sources


def loaded_project_modules() -> list[str]:
    """Project modules in this process, the one run as ``__main__`` by its real name."""
    names = set(sys.modules)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        names.add(spec.name)
    return sorted(m for m in names if m.split(".")[0] in PROJECT_PACKAGES)
