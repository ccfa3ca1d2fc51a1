"""Integrity of a cache: every object the manifest vouches for, checked against its xxh3 checksum.

`pipeline cache verify` and every reader (training, evaluation, detection) go through
require_intact: a copied, downloaded or damaged cache is trusted only once its checksums agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.storage import safe_key
from pipeline.store import CacheStore


def manifest_files(manifest: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Every object a manifest vouches for: key -> (checksum, what it is, for messages)."""
    files: dict[str, tuple[str, str]] = {}
    for key, digest in manifest.get("metadata_files", {}).items():
        files[safe_key(key)] = (digest, "metadata")
    for path, attrs in manifest.get("indexes", {}).items():
        for key, digest in attrs.get("files", {}).items():
            files[safe_key(key)] = (digest, f"index {path}")
    for path, art in manifest.get("artifacts", {}).items():
        for shard, info in art.get("shards", {}).items():
            for key, digest in info["files"].items():
                files[safe_key(key)] = (digest, f"shard {shard} of {path}")
    return files


def verify(
    store: CacheStore, jobs: int = 8, progress: bool = False, share: tuple[int, int] = (0, 1)
) -> list[str]:
    """Recompute every checksum the manifest records; returns one line per problem (empty: intact).

    Objects are read `jobs` at a time: on an object store each read is a round trip. `share` (k, n):
    only every n-th object from the k-th, so that n processes of one job (torchrun) verify a cache
    once between them rather than n times.
    """
    files = sorted(manifest_files(store.manifest()).items())[share[0] :: share[1]]

    def check(item: tuple[str, tuple[str, str]]) -> str | None:
        key, (digest, what) = item
        try:
            actual = store.checksum(key)
        except FileNotFoundError:
            return f"{what}: {key} is missing"
        return None if actual == digest else f"{what}: {key} does not match its checksum"

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = tqdm(pool.map(check, files), total=len(files), desc="verify", disable=not progress)
        return [problem for problem in results if problem]


def require_intact(
    url_or_store: str | CacheStore, check: bool = True, share: tuple[int, int] = (0, 1)
) -> CacheStore:
    """Open a cache for reading; unless check is False, refuse it (UserError) when any checksum differs
    (of the objects of `share`, see verify: the other processes of the job check the rest).

    The one gate every consumer of a cache (training, evaluation, detection) goes through.
    """
    store = url_or_store if isinstance(url_or_store, CacheStore) else CacheStore(str(url_or_store), mode="r")
    if check:
        problems = verify(store, share=share)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"{store.url} failed verification: {problems[0]}{more}; "
                "rerun the extraction or pull it again, or pass --no-verify to use it anyway"
            )
    return store
