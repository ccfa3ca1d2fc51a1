"""Copy a cache between places (a folder, s3://, any writable fsspec store): `cache push` / `cache pull`.

Only what is missing or different at the target is copied, every object is checked against the
source manifest's checksum as it is read and again where it lands, and the manifest is written
last: a half-copied cache has no manifest, so no reader mistakes it for a complete one.

Resuming: the target's old manifest is moved aside into a journal before anything is written
(`_share/journal.json`), and the journal records each object known to have landed intact. A rerun
after an interruption skips those; after a kill -9 at most the last unflushed batch is copied again.
The new manifest merges the target's old one by artifact, so a push adds to a shared cache
without unlisting what others put there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.fingerprint import checksum_bytes
from pipeline.integrity import manifest_files
from pipeline.schema import MANIFEST, PROGRESS
from pipeline.storage import is_local, list_objects, now, open_fs, parse_json, safe_key, write_object
from pipeline.store import CacheStore

JOURNAL = "_share/journal.json"
FLUSH_EVERY = 32  # objects between journal writes (one small PUT each)


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0

    def line(self, verb: str, src: str, dst: str) -> str:
        mb = self.bytes_copied / 1e6
        return (
            f"{verb} {src} -> {dst}: {self.copied} objects copied ({mb:.1f} MB), "
            f"{self.skipped} already there, in {self.seconds:.1f} s; manifest written last"
        )


class _Target:
    """The writable end: plain objects under a root, written whole, checked where they land."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = open_fs(url, writable=True)
        self.local = is_local(self.fs)

    def full(self, key: str) -> str:
        return posixpath.join(self.root, safe_key(key))

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.full(key))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        """Write one whole object and check it landed: the store's md5 (S3 ETag) or a read-back."""
        response = write_object(self.fs, self.full(key), data)
        etag = str(response.get("ETag", "")).strip('"') if isinstance(response, dict) else ""
        # A plain single-part upload's ETag is the md5 of its bytes. Multipart and SSE-KMS ETags are
        # not, some stores return none, and a local file has none: those are read back instead.
        if etag == hashlib.md5(data).hexdigest():
            return
        if self.read(key) != data:
            raise UserError(f"{self.url}/{key} did not arrive intact (read-back differs); rerun to retry")

    def write_json(self, key: str, obj: Any) -> None:
        self.write(key, json.dumps(obj, indent=1, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.full(key))
        if self.local:  # no empty folder left behind (object stores have none)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.full(key)))  # only if empty


def _progress_keys(src: CacheStore) -> list[str]:
    """Per-shard resume records, so that extraction can go on at the target; none where unlistable."""
    try:
        return [k for k in src.list_keys(PROGRESS) if k.endswith(".json")]
    except (NotImplementedError, FileNotFoundError, ValueError):
        return []


def merge_manifests(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The source manifest, plus what only the target's old manifest listed (other artifacts, indexes)."""
    if not old:
        return dict(new)
    merged = dict(new)
    for part in ("indexes", "artifacts", "metadata_files"):
        merged[part] = {**old.get(part, {}), **new.get(part, {})}
    return merged


def copy_cache(
    src_url: str,
    dst_url: str,
    jobs: int = 4,
    progress: bool = True,
    recheck: bool = False,
) -> CopyReport:
    """Copy the cache at src_url to dst_url: missing or different objects only, manifest last.

    An object the target's manifest (or journal) already vouches for with the source's checksum is
    skipped unread; `recheck` reads it back instead (to repair a target damaged since).
    """
    start = time.perf_counter()
    src = CacheStore(src_url, mode="r")
    manifest = src.manifest()
    wanted = {key: digest for key, (digest, _) in manifest_files(manifest).items()}
    dst = _Target(dst_url)
    if type(dst.fs) is type(src.fs) and dst.root == src.root:
        raise UserError(f"{src_url} and {dst_url} are the same cache")

    journal = parse_json(dst.read(JOURNAL) or "null", f"{dst_url}/{JOURNAL}") or {}
    old = dst.read(MANIFEST)
    if old is not None:  # moved aside first: from here on the target is not a complete cache
        base = parse_json(old, f"{dst_url}/{MANIFEST}")
        if base.get("subset") not in (None, manifest.get("subset")):
            raise UserError(f"{dst_url} holds subset '{base['subset']}', not '{manifest.get('subset')}'")
        if base.get("schema_version") not in (None, manifest.get("schema_version")):
            raise UserError(
                f"{dst_url} is a schema-{base['schema_version']} cache and {src_url} schema "
                f"{manifest.get('schema_version')}: one cache holds one schema; copy to a new location"
            )
        manifest_files(base)  # refuse unsafe keys before trusting anything in it
        journal = {"base": base, "landed": {k: d for k, (d, _) in manifest_files(base).items()}}
        dst.write_json(JOURNAL, journal)
        dst.delete(MANIFEST)
    landed: dict[str, str] = dict(journal.get("landed", {}))
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            snapshot = {"base": journal.get("base"), "landed": dict(landed)}
        dst.write_json(JOURNAL, snapshot)

    present = list_objects(dst.fs, dst.root)  # size of every object already there, by key
    report = CopyReport()
    todo = []
    for key in sorted(wanted, key=lambda k: (not k.endswith("zarr.json"), k)):  # zarr metadata first
        if not recheck and key in present and landed.get(key) == wanted[key]:
            report.skipped += 1
        else:
            todo.append(key)
    records = _progress_keys(src)  # in a second pass: a resume record never lands before its shard

    def copy_one(key: str) -> tuple[bool, int]:
        data = src.read_bytes(key)
        digest = checksum_bytes(data)
        if key in wanted and digest != wanted[key]:
            raise UserError(f"source {src_url}: {key} does not match its checksum; verify the source first")
        cheap = dst.local or recheck or key not in wanted  # a local read, or a small record
        copied = not (cheap and present.get(key) == len(data) and dst.read(key) == data)
        if copied:
            dst.write(key, data)
        with lock:
            landed[key] = digest
        return copied, len(data)

    total = len(todo) + len(records)
    bar = tqdm(total=total, desc=f"copy to {dst_url}", unit="obj", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max(1, jobs))
    try:
        for keys in (todo, records):
            for copied, n in pool.map(copy_one, keys):
                report.copied += copied
                report.skipped += not copied
                report.bytes_copied += n if copied else 0
                bar.update()
                if (report.copied + report.skipped) % FLUSH_EVERY == 0:
                    flush()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):  # the first error is the one to report
            flush()  # what landed so far is kept: a rerun skips it
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()

    merged = merge_manifests(journal.get("base"), {**manifest, "copied_from": src_url, "copied_at": now()})
    if (
        merged["indexes"].keys() != manifest.get("indexes", {}).keys()
        or merged["artifacts"].keys() != manifest.get("artifacts", {}).keys()
    ):
        # The source's root zarr.json consolidates the source's tree only: describe the merged one.
        target = CacheStore(dst_url, mode="a")
        target.consolidate()
        merged["metadata_files"]["zarr.json"] = target.checksum("zarr.json")
    dst.write_json(MANIFEST, merged)
    dst.delete(JOURNAL)
    report.seconds = time.perf_counter() - start
    return report
