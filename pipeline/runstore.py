"""Runs at any URL, with the guarantees of caches: a run manifest, verify, push / pull, and the local
folder a command reads a run from.

A run is a directory of JSON and safetensors files (stages.runs.checkpoint lists them). Its manifest,
`run-manifest.json`, is written last and lists every other file with its xxh3 checksum and size:

    {"kind": "lare-pipeline run", "version": 1, "run": "<run directory name>",
     "fingerprint": "<params.json's>", "written_at": "...",
     "files": {"params.json": {"xxh3": "...", "size": 1234}, "epoch-003.safetensors": {...}, ...}}

`train` writes it when a run finishes (`seal`); whatever later writes into a finished run (the model
card of `eval`, `calibrate`) updates the entries of the files it wrote, and only those: a file damaged
since keeps its old checksum and is still refused. A run without a manifest (still training, or made
before manifests existed) is read as before, unchecked; `run push` seals it first.

Reading a run at a URL (`--checkpoint s3://...`, `https://.../run.zip`) copies into a temporary
folder what the command needs: every JSON record, the card, and the weights of the epochs asked for
(not the optimizer state, not the curves), each checked against the manifest as it arrives; the
folder is removed when the command ends. A local folder (or `file://`) is read where it is.
Nothing is executed: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import fsspec
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.fingerprint import checksum_bytes, checksum_file
from pipeline.share import CopyReport, _Target
from pipeline.storage import atomic_write, fsspec_url, now, open_fs, parse_json, safe_key

MANIFEST = "run-manifest.json"
KIND = "lare-pipeline run"
VERSION = 1
_TMP = re.compile(r"\.tmp\d+\.\d+$")  # atomic_write's temporary files (left only by a crash)
# The names of the run files sharing reads, defined here once: stages.runs.checkpoint, through which
# every stage builds a run's paths, takes them from here (pipeline/ imports no stage).
PARAMS = "params.json"
DONE = "done.json"
_WEIGHTS = re.compile(r"epoch-(\d{3})\.safetensors")


def weights_file(epoch: int) -> str:
    """The name of epoch `epoch`'s weights (done.json's "final" names the last one)."""
    return f"epoch-{epoch:03d}.safetensors"


class FileEntry(TypedDict):
    xxh3: str
    size: int


class _RunManifest(TypedDict):
    kind: str
    version: int
    run: str
    fingerprint: str
    written_at: str
    files: dict[str, FileEntry]


class RunManifest(_RunManifest, total=False):
    """`run-manifest.json`: every file of the run but itself, with its checksum; written last."""

    copied_from: str


# ---- a local run: sealing ---------------------------------------------------------------------
def _local_files(run: Path) -> list[str]:
    return sorted(
        p.relative_to(run).as_posix()
        for p in run.rglob("*")
        if p.is_file() and p.name != MANIFEST and not _TMP.search(p.name)
    )


def _write(run: Path, manifest: RunManifest) -> None:
    import json

    atomic_write(str(run / MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def seal(run: Path) -> RunManifest:
    """Write a local run's manifest from the files as they are now (a finished run, by `train`)."""
    import json

    params = json.loads((run / PARAMS).read_text())
    files = {
        key: FileEntry(xxh3=checksum_file(run / key), size=(run / key).stat().st_size)
        for key in _local_files(run)
    }
    manifest = RunManifest(
        kind=KIND,
        version=VERSION,
        run=run.name,
        fingerprint=params["fingerprint"],
        written_at=now(),
        files=files,
    )
    _write(run, manifest)
    return manifest


def reseal(run: Path, written: list[str]) -> None:
    """After writing `written` (paths relative to the run) into a sealed local run: their entries
    updated, every other one kept, so a file damaged since is not blessed. No manifest: nothing."""
    if not (run / MANIFEST).is_file():
        return
    manifest = read_manifest(_local_fs(), str(run), str(run))
    for key in written:
        if (run / key).is_file():
            manifest["files"][safe_key(key)] = FileEntry(
                xxh3=checksum_file(run / key), size=(run / key).stat().st_size
            )
    manifest["written_at"] = now()
    _write(run, manifest)


def _local_fs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


# ---- a run anywhere ------------------------------------------------------------------------------
def read_manifest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> RunManifest:
    """The manifest of the run at `root`, its paths checked (none may leave the run)."""
    try:
        data = fs.cat_file(posixpath.join(root, MANIFEST))
    except FileNotFoundError:
        raise UserError(
            f"{url} has no {MANIFEST} (not a run, or one still training or made before run manifests: "
            "`pipeline run push` writes one)"
        ) from None
    manifest = parse_json(data, f"{url}/{MANIFEST}")
    if (
        not isinstance(manifest, dict)
        or manifest.get("kind") != KIND
        or not isinstance(manifest.get("files"), dict)
    ):
        raise UserError(f"{url}/{MANIFEST} is not a run manifest")
    for key in manifest["files"]:
        try:
            safe_key(key)
        except UserError:
            raise UserError(f"refusing unsafe path in run manifest of {url}: '{key}'") from None
    name = str(manifest.get("run", ""))
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"{url}/{MANIFEST} names no usable run ('{name}')")
    return manifest  # type: ignore[return-value]


def locate(url: str, writable: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root) of the run at `url`; a zip may hold the run's files or its one folder."""
    fs, root = open_fs(url, writable)
    here = (posixpath.join(root, name) for name in (MANIFEST, PARAMS))
    if writable or any(fs.exists(p) for p in here):
        return fs, root
    with contextlib.suppress(FileNotFoundError, NotImplementedError):
        inner = [
            p["name"].rstrip("/")
            for p in fs.ls(root, detail=True)
            if p.get("type") == "directory" and fs.exists(posixpath.join(p["name"].rstrip("/"), MANIFEST))
        ]
        if len(inner) == 1:
            return fs, inner[0]
    return fs, root


def local_dir(url: str) -> Path | None:
    """The folder `url` names on this machine (a path or file://), or None for a URL or a zip."""
    path = url[len("file://") :] if url.startswith("file://") else url
    return Path(path) if "://" not in path and fsspec_url(path) == path else None


def verify(url: str, jobs: int = 8, progress: bool = False) -> list[str]:
    """Every file the run's manifest lists, read and checked: one line per problem (empty: intact)."""
    fs, root = locate(url)
    manifest = read_manifest(fs, root, url)

    def check(item: tuple[str, FileEntry]) -> str | None:
        key, entry = item
        try:
            data = fs.cat_file(posixpath.join(root, key))
        except FileNotFoundError:
            return f"{key} is missing"
        return None if checksum_bytes(data) == entry["xxh3"] else f"{key} does not match its checksum"

    files = sorted(manifest["files"].items())
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = tqdm(pool.map(check, files), total=len(files), desc="verify", disable=not progress)
        return [p for p in results if p]


def _damaged(url: str, key: str) -> UserError:
    return UserError(
        f"{url}: {key} does not match its checksum in {MANIFEST} (damaged or altered); "
        "pull or push the run again"
    )


def needed_epochs(done: dict[str, Any] | None, choice: str, listed: list[int]) -> list[int]:
    """The epochs whose weights `--epoch choice` reads (best, last, N, last5); none when the choice
    cannot be read (stages.runs.checkpoint.select_epochs then says why)."""
    if done is None:
        return []
    last = int(done.get("epochs", 0))
    if choice == "best":
        return [int(done["best"])] if "best" in done else []
    if choice == "last":
        return [last]
    if choice == "last5":
        return [e for e in listed if e <= last][-5:]
    return [int(choice)] if choice.isdigit() else []


@contextlib.contextmanager
def opened(url: str | Path, epoch: str | int = "best") -> Iterator[Path]:
    """The local folder a command reads the run at `url` from (see the module docstring).

    A local run folder is itself, its manifest (if any) checked for the files the command reads (one
    without a manifest, or no run at all, is left to the command to judge, as before); a URL is
    copied, checked, into a temporary folder named like the run, removed on the way out."""
    url = str(url)
    local = local_dir(url)
    if local is not None and not (local / MANIFEST).is_file():
        yield local  # unsealed: read as before
        return
    fs, root = (_local_fs(), str(local)) if local is not None else locate(url)
    manifest = read_manifest(fs, root, url)
    files = manifest["files"]
    records = {k for k in files if k.endswith(".json") or k == "README.md"}  # not the curves
    done = None
    if DONE in files:
        done = parse_json(_checked(fs, root, url, DONE, files[DONE]), f"{url}/{DONE}")
    listed = sorted(int(m[1]) for k in files if (m := _WEIGHTS.fullmatch(k)))
    wanted = records | {weights_file(e) for e in needed_epochs(done, str(epoch), listed)}
    wanted &= set(files)
    if local is not None:
        for key in sorted(wanted):
            if not (local / key).is_file():
                raise UserError(f"{url}: {key} is missing (listed in {MANIFEST})")
            if checksum_file(local / key) != files[key]["xxh3"]:
                raise _damaged(url, key)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="lare-run-") as tmp:
        view = Path(tmp) / manifest["run"]
        for key in sorted(wanted):
            atomic_write(str(view / key), _checked(fs, root, url, key, files[key]))
        _write(view, manifest)
        yield view


def _checked(fs: fsspec.AbstractFileSystem, root: str, url: str, key: str, entry: FileEntry) -> bytes:
    try:
        data = fs.cat_file(posixpath.join(root, key))
    except FileNotFoundError:
        raise UserError(f"{url}: {key} is missing (listed in {MANIFEST})") from None
    if checksum_bytes(data) != entry["xxh3"]:
        raise _damaged(url, key)
    return data


def require_writable(url: str | Path, what: str) -> None:
    """One line when `what` would write into a read-only run (http(s), a zip)."""
    if local_dir(str(url)) is None:
        try:
            open_fs(str(url), writable=True)
        except UserError:
            raise UserError(
                f"{what} writes into the run and {url} is read-only: "
                f"`pipeline run pull {url} DIR`, then {what} DIR"
            ) from None


# ---- push / pull ---------------------------------------------------------------------------------
def copy_run(
    src_url: str, dst_url: str, jobs: int = 4, progress: bool = True, origin: str | None = None
) -> CopyReport:
    """Copy the run at src_url to dst_url: files missing or different only, the manifest last.

    The target's manifest is removed first, so an interrupted copy is never taken for a run (rerun
    to resume). A file is skipped unread where the target's old manifest lists it with the source's
    checksum and its size matches; elsewhere it is compared where it lies (a local read, or the
    object store's md5 ETag). Every file read is checked against the source manifest; every file
    written is checked where it lands."""
    start = time.perf_counter()
    local = local_dir(src_url)
    if local is not None and not (local / MANIFEST).is_file():
        if not (local / PARAMS).is_file():
            raise UserError(f"{src_url} is not a run directory (no {PARAMS})")
        if not (local / DONE).is_file():
            raise UserError(f"{src_url} has not finished training (no {DONE}): only finished runs are shared")
        seal(local)
    src_fs, src_root = locate(src_url)
    manifest = read_manifest(src_fs, src_root, src_url)
    dst = _Target(dst_url)
    if type(dst.fs) is type(src_fs) and dst.root == src_root:
        raise UserError(f"{src_url} and {dst_url} are the same run")
    old_raw = dst.read(MANIFEST)
    old: dict[str, Any] = {}
    if old_raw is not None:
        base = parse_json(old_raw, f"{dst_url}/{MANIFEST}")
        if isinstance(base, dict) and base.get("fingerprint") not in (None, manifest["fingerprint"]):
            raise UserError(
                f"{dst_url} holds another run (fingerprint {str(base['fingerprint'])[:12]}); choose "
                "another location"
            )
        old = read_manifest(dst.fs, dst.root, dst_url)["files"]  # type: ignore[assignment]
        dst.delete(MANIFEST)  # from here on the target is not a complete run
    present = {k: int(v.get("size") or 0) for k, v in _listing(dst.fs, dst.root).items()}
    report = CopyReport()
    files = sorted(manifest["files"].items())

    def same_there(key: str, entry: FileEntry, data: bytes) -> bool:
        if present.get(key) != entry["size"]:
            return False
        if dst.local:
            return checksum_file(dst.full(key)) == entry["xxh3"]
        with contextlib.suppress(Exception):
            etag = str(dst.fs.info(dst.full(key)).get("ETag", "")).strip('"')
            if etag:
                return etag == hashlib.md5(data).hexdigest()
        return dst.read(key) == data

    def copy_one(item: tuple[str, FileEntry]) -> tuple[bool, int]:
        key, entry = item
        if present.get(key) == entry["size"] and old.get(key, {}).get("xxh3") == entry["xxh3"]:
            return False, 0
        data = _checked(src_fs, src_root, src_url, key, entry)
        if same_there(key, entry, data):
            return False, 0
        dst.write(key, data)
        return True, len(data)

    bar = tqdm(total=len(files), desc=f"copy to {dst_url}", unit="file", disable=not progress, leave=False)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for copied, n in pool.map(copy_one, files):
            report.copied += copied
            report.skipped += not copied
            report.bytes_copied += n
            bar.update()
    bar.close()
    dst.write_json(MANIFEST, {**manifest, "copied_from": origin or src_url})
    report.seconds = time.perf_counter() - start
    return report


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    head = root.rstrip("/") + "/"
    return {
        (p[len(head) :] if p.startswith(head) else p): info for p, info in fs.find(root, detail=True).items()
    }
