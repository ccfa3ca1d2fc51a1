"""Where cache objects live: cache URLs as fsspec filesystems, safe object keys, and the one way an
object is written whole (a local file atomically and fsynced, an object-store PUT in one piece).

The store (pipeline.store), sharing (pipeline.share), run checkpoints and the weight-hash cache
all write through write_object / atomic_write, so a crash never leaves half an object behind.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import threading
import time
from typing import Any

import fsspec

from pipeline.errors import UserError

READ_ONLY_PROTOCOLS = ("http", "https", "zip")
_ZIP_PATH = re.compile(r"^(?P<archive>.+?\.zip)(?:/(?P<inner>.*))?$", re.IGNORECASE)


def fsspec_url(url: str) -> str:
    """The fsspec URL for a cache location; a `.zip` in the path is read inside the archive.

    `a/b.zip/c` -> `zip://c::a/b.zip` (also over http or s3: `zip://c::s3://bkt/b.zip`). A local
    directory that happens to end in `.zip` stays a directory.
    """
    m = _ZIP_PATH.match(url)
    if "::" in url or m is None or os.path.isdir(m["archive"]):
        return url
    return f"zip://{m['inner'] or ''}::{m['archive']}"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def open_fs(url: str, writable: bool) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for a cache URL; http(s) and zip are read-only: writing to them is refused."""
    full = fsspec_url(str(url))
    try:
        fs, root = fsspec.core.url_to_fs(full)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open {url}: {e}") from None
    protocols = _protocols(fs)
    if writable and set(protocols) & set(READ_ONLY_PROTOCOLS):
        raise UserError(f"{url} is read-only ({protocols[0]}); write to a local folder or an object store")
    return fs, root.rstrip("/")


def write_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> Any:
    """Write one object whole at `path` of `fs`: a reader sees the old bytes or the new, never half.

    Local: atomic_write. Elsewhere: one PUT (object stores replace whole objects atomically); its
    response (an S3 ETag, say) is returned for a caller that checks what landed.
    """
    if is_local(fs):
        atomic_write(path, data)
        return None
    return fs.pipe_file(path, data)


def atomic_write(path: str, data: bytes) -> None:
    """Write a local file whole: a reader sees the old content or the new, never half (even after a crash)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"  # unique per writing thread
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_objects(fs: fsspec.AbstractFileSystem, root: str, prefix: str = "") -> dict[str, int]:
    """Every object under `root/prefix`, keyed relative to `root`, with its size: one fresh listing."""
    fs.invalidate_cache()  # zarr writes through its own (async) instance: listings may be stale
    base = posixpath.join(root, prefix) if prefix else root
    if not fs.exists(base):
        return {}
    head = root.rstrip("/") + "/"
    return {
        p[len(head) :] if p.startswith(head) else p: int(info.get("size") or 0)
        for p, info in fs.find(base, detail=True).items()
    }


def parse_json(data: bytes | str, where: str) -> Any:
    """JSON from a cache object; a damaged one (truncated, tampered) is a one-line UserError."""
    try:
        return json.loads(data)
    except ValueError:
        raise UserError(
            f"{where} is damaged (not valid JSON); rerun what wrote it, or pull it again"
        ) from None


def safe_key(key: str) -> str:
    """Refuse store keys that could escape the cache root (a manifest from a stranger).

    Absolute paths, `..`, backslashes, empty or `.` parts and anything with a `:` (a URL scheme, a
    drive letter) are refused.
    """
    norm = posixpath.normpath(key)
    if key.startswith("/") or "\\" in key or norm.startswith("..") or norm != key or ":" in key:
        raise UserError(f"refusing unsafe path in cache manifest: '{key}'")
    return key


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
