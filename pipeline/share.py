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


class _Journal:
    """What has landed intact at the target, by key (its checksum), and the target's old manifest;
    written to `_share/journal.json` every FLUSH_EVERY objects, so that a rerun skips what landed."""

    def __init__(self, dst: _Target, base: Mapping[str, Any] | None, landed: Mapping[str, str]):
        self.dst = dst
        self.base = base
        self.landed: dict[str, str] = dict(landed)
        self.lock = threading.Lock()

    @classmethod
    def open(cls, dst: _Target, manifest: Mapping[str, Any], src_url: str) -> _Journal:
        """The target's journal; a complete target's manifest is first checked against the source's
        and moved into it: from here on the target is not a complete cache."""
        journal = parse_json(dst.read(JOURNAL) or "null", f"{dst.url}/{JOURNAL}") or {}
        old = dst.read(MANIFEST)
        if old is None:
            return cls(dst, journal.get("base"), journal.get("landed", {}))
        base = parse_json(old, f"{dst.url}/{MANIFEST}")
        if base.get("subset") not in (None, manifest.get("subset")):
            raise UserError(f"{dst.url} holds subset '{base['subset']}', not '{manifest.get('subset')}'")
        if base.get("schema_version") not in (None, manifest.get("schema_version")):
            raise UserError(
                f"{dst.url} is a schema-{base['schema_version']} cache and {src_url} schema "
                f"{manifest.get('schema_version')}: one cache holds one schema; copy to a new location"
            )
        manifest_files(base)  # refuse unsafe keys before trusting anything in it
        opened = cls(dst, base, {k: d for k, (d, _) in manifest_files(base).items()})
        opened.flush()
        dst.delete(MANIFEST)
        return opened

    def land(self, key: str, digest: str) -> None:
        with self.lock:
            self.landed[key] = digest

    def flush(self) -> None:
        with self.lock:
            snapshot = {"base": self.base, "landed": dict(self.landed)}
        self.dst.write_json(JOURNAL, snapshot)


@dataclass
class _Copy:
    """One object's copy: read from the source, checked against its checksum, written where it differs."""

    src: CacheStore
    dst: _Target
    src_url: str
    wanted: Mapping[str, str]  # key -> the source manifest's checksum
    present: Mapping[str, int]  # key -> size of what the target already holds
    journal: _Journal
    recheck: bool

    def todo(self) -> tuple[list[str], int]:
        """The manifest's keys to copy (zarr metadata first), and how many the journal vouches for."""
        todo, skipped = [], 0
        for key in sorted(self.wanted, key=lambda k: (not k.endswith("zarr.json"), k)):
            if not self.recheck and key in self.present and self.journal.landed.get(key) == self.wanted[key]:
                skipped += 1
            else:
                todo.append(key)
        return todo, skipped

    def __call__(self, key: str) -> tuple[bool, int]:
        """(whether it was written, its size)."""
        data = self.src.read_bytes(key)
        digest = checksum_bytes(data)
        if key in self.wanted and digest != self.wanted[key]:
            raise UserError(
                f"source {self.src_url}: {key} does not match its checksum; verify the source first"
            )
        cheap = self.dst.local or self.recheck or key not in self.wanted  # a local read, or a small record
        copied = not (cheap and self.present.get(key) == len(data) and self.dst.read(key) == data)
        if copied:
            self.dst.write(key, data)
        self.journal.land(key, digest)
        return copied, len(data)


def _copy_all(copy: _Copy, passes: list[list[str]], report: CopyReport, jobs: int, bar: tqdm) -> None:
    """Copy each pass's keys on `jobs` threads, a pass after the other; the journal is flushed every
    FLUSH_EVERY objects and on an error (what landed so far is kept: a rerun skips it)."""
    pool = ThreadPoolExecutor(max(1, jobs))
    try:
        for keys in passes:
            for copied, n in pool.map(copy, keys):
                report.copied += copied
                report.skipped += not copied
                report.bytes_copied += n if copied else 0
                bar.update()
                if (report.copied + report.skipped) % FLUSH_EVERY == 0:
                    copy.journal.flush()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):  # the first error is the one to report
            copy.journal.flush()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()


def _write_manifest(
    dst: _Target, base: Mapping[str, Any] | None, manifest: Mapping[str, Any], src_url: str
) -> None:
    """The merged manifest, last, and the journal gone: the target is a complete cache again."""
    merged = merge_manifests(base, {**manifest, "copied_from": src_url, "copied_at": now()})
    if (
        merged["indexes"].keys() != manifest.get("indexes", {}).keys()
        or merged["artifacts"].keys() != manifest.get("artifacts", {}).keys()
    ):
        # The source's root zarr.json consolidates the source's tree only: describe the merged one.
        target = CacheStore(dst.url, mode="a")
        target.consolidate()
        merged["metadata_files"]["zarr.json"] = target.checksum("zarr.json")
    dst.write_json(MANIFEST, merged)
    dst.delete(JOURNAL)


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
    journal = _Journal.open(dst, manifest, src_url)
    present = list_objects(dst.fs, dst.root)  # size of every object already there, by key
    copy = _Copy(src, dst, src_url, wanted, present, journal, recheck)
    todo, skipped = copy.todo()
    records = _progress_keys(src)  # in a second pass: a resume record never lands before its shard
    report = CopyReport(skipped=skipped)
    bar = tqdm(
        total=len(todo) + len(records),
        desc=f"copy to {dst_url}",
        unit="obj",
        disable=not progress,
        leave=False,
    )
    _copy_all(copy, [todo, records], report, jobs, bar)
    _write_manifest(dst, journal.base, manifest, src_url)
    report.seconds = time.perf_counter() - start
    return report
