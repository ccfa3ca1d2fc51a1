"""The cache store: one Zarr v3 group per subset, written in whole shards, described by a manifest.

Layout (cache_schema.md is the contract, checked by pipeline.schema; this module is its only writer):

    <subset>.zarr/
      zarr.json                       root group, attrs: schema_version, subset
      index/<fp16>/{id,path,...}      the index the artifacts' rows refer to
      <kind>/<fp16>/<array>           an artifact (kind: lare, pixels), named by its fingerprint
      <kind>/<fp16>/status            per row: 0 not computed, 1 ok, 2 failed
      _progress/<kind>/<fp16>/<shard>.json   written AFTER the shard's data: the resume record
      manifest.json                   written atomically, last: what a reader trusts

Zarr loses data silently when two writers touch one shard, so every array is created once at its
full shape and a writer only ever writes whole shards of it.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.array_spec import ArrayConfigParams

from pipeline.errors import UserError
from pipeline.fingerprint import checksum_bytes
from pipeline.schema import (
    LEGACY_SCHEMAS,
    MANIFEST,
    MIGRATES,
    PROGRESS,
    SCHEMA_VERSION,
    STATUS_OK,
    STATUS_PENDING,
    ArtifactAttrs,
    ArtifactOrigin,
    FailedRow,
    IndexAttrs,
    Manifest,
    ManifestArtifact,
    ShardRecord,
    WriterInfo,
    check_codecs,
    check_layout,
)
from pipeline.storage import is_local, list_objects, now, open_fs, parse_json, safe_key, write_object

PACKAGES = ("lare-pipeline", "torch", "diffusers", "transformers", "zarr", "numpy", "pillow")


# every chunk object exists once written (cache_schema.md), so the manifest can list it
# (zarr's TypedDict marks its keys NotRequired only for Python >= 3.11: a gap in its stubs under 3.10)
WRITE_EMPTY_CHUNKS: ArrayConfigParams = {"write_empty_chunks": True}  # type: ignore[typeddict-item]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def latest(entries: Mapping[str, IndexAttrs]) -> str | None:
    """The key of the entry created last (by its `created_at` stamp); None when there is none."""
    return max(entries, key=lambda k: entries[k].get("created_at", ""), default=None)


@contextlib.contextmanager
def _plain_objects_expected() -> Iterator[None]:
    """zarr warns about the plain objects a cache keeps beside its arrays (records, manifest, locks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        yield


@dataclass(frozen=True)
class ArraySpec:
    """One per-row array of an artifact: each row has `row_shape`; chunks hold about 1 MiB."""

    row_shape: tuple[int, ...]
    dtype: str
    chunk_bytes: int = 1 << 20
    fill_value: Any = 0
    compressor: str = "zstd"  # "zstd" (fast, for pixels) or "blosc-shuffle" (floats)

    def chunk_rows(self, rows_per_shard: int) -> int:
        """The largest divisor of the shard's rows whose chunk stays within `chunk_bytes`."""
        row_bytes = int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize
        target = max(1, self.chunk_bytes // max(row_bytes, 1))
        return max(d for d in range(1, min(target, rows_per_shard) + 1) if rows_per_shard % d == 0)

    def codec(self):
        if self.compressor == "blosc-shuffle":
            return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        return ZstdCodec(level=1)


@dataclass
class Artifact:
    """A stage output stored in the cache: its kind, fingerprint, arrays and what made it."""

    kind: str
    fingerprint: str
    arrays: dict[str, ArraySpec]
    # params, model, upstream, code version (empty only for the bare artifacts of tests)
    attrs: ArtifactOrigin = field(default_factory=lambda: cast(ArtifactOrigin, {}))

    @property
    def path(self) -> str:
        return f"{self.kind}/{self.fingerprint[:16]}"


@dataclass
class ShardWrite:
    """Everything one finished shard puts in the store."""

    artifact: str  # Artifact.path
    shard: int
    start: int
    stop: int
    data: dict[str, np.ndarray]
    status: np.ndarray
    failed: list[FailedRow]
    info: WriterInfo


class CacheStore:
    """A cache at a local path or an fsspec URL; zarr for arrays, plain JSON objects for records."""

    def __init__(self, url: str, mode: str = "r", subset: str | None = None):
        if mode not in ("r", "a"):
            raise ValueError(mode)
        self.url = str(url)
        self.read_only = mode == "r"
        self.fs, self.root = open_fs(self.url, writable=not self.read_only)
        self.local = is_local(self.fs)
        self._check_safe(missing_ok=not self.read_only)
        self.zstore: zarr.storage.StoreLike
        if self.local:
            self.zstore = zarr.storage.LocalStore(self.root, read_only=self.read_only)
        else:
            self.zstore = zarr.storage.FsspecStore.from_mapper(
                self.fs.get_mapper(self.root), read_only=self.read_only
            )
        self._open_root(subset)

    def _check_safe(self, missing_ok: bool) -> None:
        """Before zarr parses anything: the cache exists, and no metadata names an unsafe codec.

        The metadata objects are those the manifest lists (every zarr.json), so a remote cache needs
        no listing; the root zarr.json is checked in any case (it may hold consolidated metadata).
        With a manifest, every array's metadata is then checked against the schema (check_layout).
        """
        self.metadata: dict[str, Any] = {}
        try:
            root_meta = json.loads(self.read_bytes("zarr.json"))
        except (FileNotFoundError, NotADirectoryError):
            if missing_ok:  # a new cache, about to be created
                return
            raise UserError(f"no cache at {self.url}") from None
        except ValueError:
            raise UserError(f"{self.url} is not a readable Zarr cache (bad zarr.json)") from None
        check_codecs(root_meta, f"{self.url}/zarr.json")
        manifest = self.read_json(MANIFEST)
        if manifest is not None:
            keys = [safe_key(k) for k in manifest.get("metadata_files", {}) if k != "zarr.json"]
        else:  # an unfinished cache: whatever metadata a listing finds (none where it cannot list)
            try:
                keys = [k for k in self.list_keys("") if k.endswith("/zarr.json")]
            except (OSError, NotImplementedError, ValueError):
                keys = []
        # one batch: concurrent requests on an object store; a missing object is verify's to report
        found = self.fs.cat([self._full(k) for k in keys], on_error="omit") if keys else {}
        head = self._full("").rstrip("/") + "/"
        parsed = {}
        for path, data in found.items():
            try:
                metadata = json.loads(data)
            except ValueError:
                raise UserError(f"refusing {path}: not JSON") from None
            check_codecs(metadata, path)
            parsed[path[len(head) :] if path.startswith(head) else path] = metadata
        self.metadata = parsed  # key -> parsed zarr.json, for check_layout
        if manifest is not None:
            check_layout(manifest, parsed, self.url)

    # ---- root group and schema ---------------------------------------------------------------
    def _open_root(self, subset: str | None) -> None:
        try:
            # Our own reads and writes go to the tree itself: consolidated metadata is for plain readers
            # (see consolidate) and may be older than the shards a running extraction adds.
            self.group = zarr.open_group(
                self.zstore, mode="r" if self.read_only else "a", use_consolidated=False
            )
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.url} is not a readable Zarr cache ({e})") from None
        found: Any = self.group.attrs.get("schema_version")  # anything: a stranger's cache
        if found is None:
            with _plain_objects_expected():  # our plain `_locks/` folder may precede the group
                members = list(self.group.keys())
            if self.read_only or members:
                raise UserError(f"{self.url} is not a cache made by this pipeline (no schema_version)")
            self.group.attrs.update({"schema_version": SCHEMA_VERSION, "subset": subset, "created_at": now()})
        elif found != SCHEMA_VERSION and found not in LEGACY_SCHEMAS and found not in MIGRATES:
            raise UserError(
                f"{self.url} has cache schema version {found}; this pipeline reads versions "
                f"{', '.join(map(str, sorted([*LEGACY_SCHEMAS, *MIGRATES, SCHEMA_VERSION])))} and has no "
                "migration for it (see cache_schema.md)"
            )
        elif found in LEGACY_SCHEMAS and not self.read_only:
            raise UserError(
                f"{self.url} is a schema-{found} cache ({LEGACY_SCHEMAS[found]}): it is read as it is, "
                f"never extended; extract into a new --cache-dir to compute schema-{SCHEMA_VERSION} values"
            )
        elif subset is not None and self.group.attrs.get("subset") not in (None, subset):
            raise UserError(f"{self.url} holds subset '{self.group.attrs['subset']}', not '{subset}'")

    def migrate(self) -> str | None:
        """Bring an older cache of a migratable schema (MIGRATES) to this one, in place: its root's
        `schema_version` (its data stays as it is and reads as MIGRATES says). Only extraction calls
        this, before it writes; returns a line saying what was done, or None when nothing was."""
        found = self.schema_version
        if found == SCHEMA_VERSION or found not in MIGRATES:
            return None
        self.group.attrs.update({"schema_version": SCHEMA_VERSION, "migrated_from": found})
        return (
            f"note: {self.url}: schema {found} -> {SCHEMA_VERSION} in place ({MIGRATES[found]}; read as such)"
        )

    @property
    def subset(self) -> str | None:
        subset = self.group.attrs.get("subset")
        return subset if isinstance(subset, str) else None

    @property
    def schema_version(self) -> int:
        return int(cast(int, self.group.attrs["schema_version"]))  # checked on opening (_open_root)

    def _group(self, path: str) -> zarr.Group:
        node = self.group[path]
        if not isinstance(node, zarr.Group):
            raise UserError(f"{self.url}/{path} is not a group (see cache_schema.md)")
        return node

    def array(self, path: str) -> zarr.Array:
        """The array at `path` (e.g. `lare/<fp16>/maps`)."""
        node = self.group[path]
        if not isinstance(node, zarr.Array):
            raise UserError(f"{self.url}/{path} is not an array (see cache_schema.md)")
        return node

    # ---- plain objects (records, manifest) -----------------------------------------------------
    def _full(self, key: str) -> str:
        return posixpath.join(self.root, key) if key else self.root

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._full(safe_key(key)))

    def read_json(self, key: str) -> dict[str, Any] | None:
        try:
            data = self.read_bytes(key)
        except FileNotFoundError:
            return None
        return parse_json(data, f"{self.url}/{key}")

    def write_json(self, key: str, obj: Any) -> None:
        """Atomic: a reader sees the old object or the new one, never half of one."""
        write_object(self.fs, self._full(safe_key(key)), json.dumps(obj, indent=1, sort_keys=True).encode())

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(list_objects(self.fs, self.root, prefix))

    def checksum(self, key: str) -> str:
        return checksum_bytes(self.read_bytes(key))

    # ---- tables (the index) ------------------------------------------------------------------
    def write_table(self, path: str, columns: dict[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
        """Write a table of per-row columns once; its checksums go in its attrs, written last."""
        group = self.group.require_group(path)
        files = {}
        for name, values in columns.items():
            n = len(values)
            is_str = values.dtype == object
            arr = group.create_array(
                name,
                shape=(n,),
                dtype=str if is_str else values.dtype,
                chunks=(min(max(n, 1), 1 << 16),),
                overwrite=True,
                config=WRITE_EMPTY_CHUNKS,
            )
            arr[:] = values
            for key in self._array_keys(f"{path}/{name}", arr):
                files[key] = self.checksum(key)
        group.attrs.update({**attrs, "files": files, "complete": True})

    def read_table(self, path: str) -> tuple[dict[str, np.ndarray], IndexAttrs]:
        """The table's columns and attrs; the columns are named by its `files` attr where it has one.

        A store that cannot list (a zip served by fsspec lists nothing inside a group) still reads a
        table whose attrs name its objects; listing is the fallback for tables written without them.
        """
        group = self._group(path)
        attrs = cast(IndexAttrs, dict(group.attrs))
        names = sorted({key[len(path) + 1 :].split("/")[0] for key in attrs.get("files", {})})
        if not names:
            names = [name for name, _ in group.arrays()]
        return {name: np.asarray(self.array(f"{path}/{name}")[:]) for name in names}, attrs

    def _subgroups(self, path: str | None = None) -> list[tuple[str, zarr.Group]]:
        """Child groups (our plain objects beside them are skipped quietly)."""
        group = self.group if path is None else self._group(path)
        with _plain_objects_expected():
            return list(group.groups())

    def tables(self, prefix: str) -> dict[str, IndexAttrs]:
        """attrs of each complete table under `prefix` (e.g. every index), by path."""
        if prefix not in self.group:
            return {}
        out = {}
        for name, sub in self._subgroups(prefix):
            if sub.attrs.get("complete"):
                out[f"{prefix}/{name}"] = cast(IndexAttrs, dict(sub.attrs))
        return out

    # ---- artifacts ---------------------------------------------------------------------------
    def open_artifact(self, artifact: Artifact, n_rows: int, rows_per_shard: int) -> int:
        """Create the artifact's arrays at full shape, or reopen them; returns the rows per shard in force.

        Rows per shard is a layout knob: an artifact already started keeps its own layout.
        """
        path = artifact.path
        if path in self.group:
            attrs = self.group[path].attrs
            if attrs.get("n_rows") != n_rows:
                raise UserError(f"{self.url}/{path} has {attrs.get('n_rows')} rows, expected {n_rows}")
            return int(cast(int, attrs["rows_per_shard"]))
        group = self.group.require_group(path)
        for name, spec in artifact.arrays.items():
            group.create_array(
                name,
                shape=(n_rows, *spec.row_shape),
                dtype=spec.dtype,
                shards=(rows_per_shard, *spec.row_shape),
                chunks=(spec.chunk_rows(rows_per_shard), *spec.row_shape),
                fill_value=spec.fill_value,
                compressors=spec.codec(),
                config=WRITE_EMPTY_CHUNKS,
            )
        group.create_array(
            "status",
            shape=(n_rows,),
            dtype="uint8",
            chunks=(rows_per_shard,),
            fill_value=STATUS_PENDING,
            config=WRITE_EMPTY_CHUNKS,
        )
        record: ArtifactAttrs = {
            "kind": artifact.kind,
            "fingerprint": artifact.fingerprint,
            "n_rows": n_rows,
            "rows_per_shard": rows_per_shard,
            "n_shards": -(-n_rows // rows_per_shard),
            "arrays": sorted([*artifact.arrays, "status"]),
            "created_at": now(),
            "packages": package_versions(),
            **artifact.attrs,
        }
        group.attrs.update(cast(dict[str, Any], record))
        return rows_per_shard

    def artifacts(self) -> dict[str, ArtifactAttrs]:
        """attrs of every artifact in the cache, by path (`<kind>/<fp16>`)."""
        out = {}
        for kind, _ in self._subgroups():
            if kind == "index":
                continue
            for name, art in self._subgroups(kind):
                if "fingerprint" in art.attrs:
                    out[f"{kind}/{name}"] = cast(ArtifactAttrs, dict(art.attrs))
        return out

    def _array_keys(self, array_path: str, arr: zarr.Array) -> Iterator[str]:
        grid = (
            arr.cdata_shape
            if arr.shards is None
            else tuple(-(-s // c) for s, c in zip(arr.shape, arr.shards, strict=True))
        )
        for coords in np.ndindex(*grid):
            yield f"{array_path}/{arr.metadata.encode_chunk_key(coords)}"

    def shard_keys(self, artifact_path: str, shard: int) -> list[str]:
        """The store objects that hold one shard: one per array (a sharded array's shard, or a chunk)."""
        group = self._group(artifact_path)
        keys = []
        for name in cast(ArtifactAttrs, group.attrs)["arrays"]:
            arr = self.array(f"{artifact_path}/{name}")
            coords = (shard,) + (0,) * (arr.ndim - 1)
            keys.append(f"{artifact_path}/{name}/{arr.metadata.encode_chunk_key(coords)}")
        return keys

    def write_shard(self, w: ShardWrite) -> ShardRecord:
        """Write one whole shard of every array, then its progress record: the record means 'done'."""
        keys = self.shard_keys(w.artifact, w.shard)
        # zarr reads a shard object back before rewriting it: a torn one from a killed writer would fail
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._full(key))
        for name, values in w.data.items():
            self.array(f"{w.artifact}/{name}")[w.start : w.stop] = values
        self.array(f"{w.artifact}/status")[w.start : w.stop] = w.status
        record: ShardRecord = {
            "shard": w.shard,
            "rows": [w.start, w.stop],
            "files": {key: self.checksum(key) for key in keys},
            "n_ok": int((w.status == STATUS_OK).sum()),
            "failed": w.failed,
            "written_at": now(),
            **w.info,
        }
        self.write_json(f"{PROGRESS}/{w.artifact}/{w.shard:06d}.json", record)
        return record

    def done_shards(self, artifact_path: str) -> dict[int, ShardRecord]:
        """Progress records of the shards finished so far, by shard number."""
        out = {}
        for key in self.list_keys(f"{PROGRESS}/{artifact_path}"):
            if key.endswith(".json"):
                record = cast(ShardRecord, self.read_json(key))  # listed: it exists
                out[int(record["shard"])] = record
        return out

    # ---- manifest ----------------------------------------------------------------------------
    def build_manifest(self) -> Manifest:
        """What the cache holds, with a checksum of every object, assembled from the store itself."""
        indexes = self.tables("index")
        artifacts: dict[str, ManifestArtifact] = {}
        for path, attrs in self.artifacts().items():
            shards = self.done_shards(path)
            failed = [f for s in sorted(shards) for f in shards[s]["failed"]]
            artifacts[path] = {
                **attrs,
                "shards_done": len(shards),
                "complete": len(shards) == attrs["n_shards"],
                "n_failed": len(failed),
                "failed": failed,
                "shards": {
                    str(s): {"rows": r["rows"], "files": r["files"], "n_ok": r["n_ok"]}
                    for s, r in sorted(shards.items())
                },
            }
        metadata = {key: self.checksum(key) for key in self.list_keys("") if key.endswith("zarr.json")}
        return {
            "schema_version": self.schema_version,
            "subset": self.subset,
            "updated_at": now(),
            "packages": package_versions(),
            "latest_index": latest(indexes),
            "indexes": indexes,
            "artifacts": artifacts,
            "metadata_files": metadata,
        }

    def consolidate(self) -> None:
        """Write the tree's metadata into the root zarr.json (Zarr's consolidated metadata).

        A plain zarr reader then walks the cache from it, without listing the store: our plain
        objects (manifest, progress records, lock, share journal) are not Zarr nodes, and a listing
        walk warns about each. Written with the manifest, so both describe the same cache.
        """
        with _plain_objects_expected(), warnings.catch_warnings():
            # zarr-python's note that consolidation is its convention, not yet the v3 spec's: known
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            zarr.consolidate_metadata(self.zstore)

    def write_manifest(self) -> Manifest:
        self.consolidate()  # before the checksums: the root zarr.json changes
        manifest = self.build_manifest()
        self.write_json(MANIFEST, manifest)
        return manifest

    def read_manifest(self) -> Manifest | None:
        """The stored manifest (None: none yet), as every reader takes it."""
        return cast("Manifest | None", self.read_json(MANIFEST))  # checked on opening (check_layout)

    def manifest(self) -> Manifest:
        manifest = self.read_manifest()
        if manifest is None:
            raise UserError(
                f"{self.url} has no {MANIFEST}: the run that wrote it did not finish (rerun it); "
                "train and eval read its finished shards with --no-verify"
            )
        return manifest
