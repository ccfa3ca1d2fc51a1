"""Content hashes: the fingerprint of a stage output, the code version of a stage, file checksums.

A fingerprint names an artifact by everything that decides its values (DVC's run cache, Snakemake's
between-workflow cache): same fingerprint, same values, so the work is reused; anything else, a new
artifact beside the old one.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import xxhash

from pipeline.storage import atomic_write


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


# The first part of an import path that names this project's own modules: where a module lives in
# the project is not what it does, so moving one (and the imports that follow it) changes no hash.
PROJECT_PACKAGES = ("stages", "pipeline")
_PROJECT_PATH = re.compile(rf"(?:{'|'.join(PROJECT_PACKAGES)})(?:\.[A-Za-z_]\w*)+")


class _Normalise(ast.NodeTransformer):
    """The syntax tree of what code does: docstrings dropped, and imports from this project taken
    out, the names they bind kept aside (`bound`): where the imported module lives, and how the
    imports are grouped, is not what the code does (the imported code is hashed under its own
    declared identity where it decides values). Imports from other libraries stay as written."""

    def __init__(self) -> None:
        self.bound: set[str] = set()

    def _drop_docstring(self, node):
        self.generic_visit(node)
        first = node.body[0] if node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            node.body = node.body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _drop_docstring

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.ImportFrom | None:
        if node.level or (node.module or "").split(".")[0] in PROJECT_PACKAGES:
            self.bound.update(a.asname or a.name for a in node.names)
            return None
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        """A string that names a project module (a registry's list of modules to import) is an import
        path too: kept as package and module name, the subpackages between erased."""
        if isinstance(node.value, str) and _PROJECT_PATH.fullmatch(node.value):
            parts = node.value.split(".")
            return ast.Constant(value=f"{parts[0]}.{parts[-1]}")
        return node

    def visit_Import(self, node: ast.Import) -> ast.Import | None:
        project = [a for a in node.names if a.name.split(".")[0] in PROJECT_PACKAGES]
        self.bound.update(a.asname or a.name.split(".")[-1] for a in project)
        rest = [a for a in node.names if a not in project]
        return ast.Import(names=rest) if rest else None


def code_identity(part: ModuleType | type | Callable) -> str:
    """The name a module (or a function or class, by its module) is hashed under: the module's
    declared CODE_ID, so that moving it to another package keeps every fingerprint. This project's
    modules must declare one; a module from outside (a method registered by a user) is named by its
    import path."""
    module = part if isinstance(part, ModuleType) else sys.modules[part.__module__]
    name = getattr(module, "CODE_ID", None)
    if name is None:
        if module.__name__.split(".")[0] in PROJECT_PACKAGES:
            raise ValueError(f"{module.__name__} decides values but declares no CODE_ID")
        name = module.__name__  # a method registered from outside the project
    return name if isinstance(part, ModuleType) else f"{name}.{part.__qualname__}"


def code_version(*parts: ModuleType | type | Callable) -> str:
    """Hash of the code of the modules (or single top-level functions and classes) that decide a
    stage's values.

    Taken over the syntax tree without docstrings, so editing a comment or a docstring does not
    invalidate a week of GPU work, while any change to what the code does gives a new artifact.
    A function or class alone lets a module hold code that does not decide the values beside it.
    Each part is named by its declared identity (code_identity) and the project's import paths are
    erased, so moving a file never invalidates a cache.
    """
    h = hashlib.sha256()
    for part in parts:
        normalise = _Normalise()
        tree = normalise.visit(ast.parse(inspect.getsource(part)))
        h.update(code_identity(part).encode())
        h.update(ast.dump(tree, annotate_fields=False, include_attributes=False).encode())
        h.update(",".join(sorted(normalise.bound)).encode())
    return h.hexdigest()[:16]


def checksum_bytes(data: bytes) -> str:
    """The checksum a cache records for each stored object: xxh3-128, hex."""
    return xxhash.xxh3_128_hexdigest(data)


def checksum_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def checksum_files(root: Path, paths: list[Path], stat_cache: Path | None = None) -> str:
    """One hash over several files (a model's weights), reusing earlier results by (path, size, mtime).

    Hashing 4 GB of Stable Diffusion weights costs seconds; the stat cache makes a rerun that has
    nothing to do return at once without reading them.
    """
    cache: dict[str, Any] = {}
    if stat_cache is not None and stat_cache.exists():
        try:
            cache = json.loads(stat_cache.read_text())
        except (OSError, ValueError):
            cache = {}
    h = hashlib.sha256()
    changed = False
    for path in sorted(paths):
        st = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if entry is None or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3": checksum_file(path)}
            cache[key] = entry
            changed = True
        h.update(f"{path.relative_to(root).as_posix()}:{entry['xxh3']};".encode())
    if changed and stat_cache is not None:
        atomic_write(str(stat_cache), json.dumps(cache).encode())
    return h.hexdigest()
