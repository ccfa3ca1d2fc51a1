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
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import xxhash


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_version(*parts: ModuleType | type | Callable) -> str:
    """Hash of the code of the modules (or single top-level functions and classes) that decide a
    stage's values.

    Taken over the syntax tree without docstrings, so editing a comment or a docstring does not
    invalidate a week of GPU work, while any change to what the code does gives a new artifact.
    A function or class alone lets a module hold code that does not decide the values beside it.
    """
    h = hashlib.sha256()
    for part in parts:
        tree = _strip_docstrings(ast.parse(inspect.getsource(part)))
        name = part.__name__ if isinstance(part, ModuleType) else f"{part.__module__}.{part.__qualname__}"
        h.update(name.encode())
        h.update(ast.dump(tree, annotate_fields=False, include_attributes=False).encode())
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
        stat_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = stat_cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, stat_cache)
    return h.hexdigest()
