"""The on-disk contract of cache_schema.md, checked before anything is read: schema versions, the
codecs a cache may use, and every array's shape, data type and chunking against the manifest.

A stranger's cache is refused here, in one line, before zarr parses a byte of its data: an unsafe
codec could run code, and a zarr.json claiming 10^12 rows would make a reader allocate for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from pipeline.errors import UserError

SCHEMA_VERSION = 3
# The version of the artifacts' VALUES, which enters their fingerprints. Schema 3 changed the index
# only (generator and group columns, a `test` split), so every map and crop computed under schema 2
# keeps its fingerprint: an extraction into a migrated cache finds its artifacts up to date.
VALUES_SCHEMA = 2
# Older versions this reader still reads, each with what its values mean that version 3's do not.
# They are read as they are (train, eval, info, verify, pull) and never extended.
LEGACY_SCHEMAS = {
    1: "its `resize` LaRE maps were resized bilinearly (the reference: bicubic) and its class prompts "
    "used other ImageNet class names",
}
# Older versions read as they are and migrated in place by the first extraction into them (see
# cache_schema.md, Versions): what the newer version adds, and how the older one reads.
MIGRATES = {
    2: "its indexes have no generator and group columns: every row is of one generator, the cache's "
    "subset, with no group",
}
MANIFEST = "manifest.json"
PROGRESS = "_progress"
STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2


# ---- the records of cache_schema.md, as Python types -------------------------------------------------
# Types only: what is on disk is the plain JSON (and Zarr attributes) these describe, written as before.
# A manifest from elsewhere is checked (check_codecs, check_layout) before its fields are trusted.


class Unlabelled(TypedDict):
    count: int
    examples: list[str]  # the first paths, relative to the root


class _IndexAttrs(TypedDict, total=False):
    """Written from schema 3 on: absent in older indexes."""

    layout: str  # how the files were named, in the words of the options
    pairs: dict[str, list[str]]  # generator -> the groups of its real rows (paired folders)
    unlabelled: Unlabelled  # images under no label folder: listed, not indexed


class IndexAttrs(_IndexAttrs):
    """Group attributes of `index/<fp16>/` (cache_schema.md, "Index")."""

    fingerprint: str
    subset: str  # the dataset's name (a GenImage subset's alias)
    root: str  # the folder the rows' paths are relative to, on the machine that scanned it
    splits: list[str]
    n_rows: int
    created_at: str
    files: dict[str, str]  # store key -> xxh3-128 of every chunk object of the table
    complete: bool


class Upstream(TypedDict):
    index: str  # the fingerprint of the index the artifact's rows refer to


class FailedRow(TypedDict):
    row: int
    path: str
    reason: str


class PromptFallback(TypedDict):
    rows: int
    examples: list[str]


class ModelIdentity(TypedDict):
    """The diffusion model a LaRE artifact was computed with (stages.features.sd.ModelRef.identity)."""

    spec: str  # as the user gave it: a hub id (id@revision), a local folder, 'tiny', 'random-sd15'
    source: str  # "hub", "local" or "random"
    revision: str | None
    weights: str  # the hash of the weight files: what enters the fingerprint


class _Origin(TypedDict):
    params: dict[str, Any]
    upstream: Upstream
    code_version: str


class ArtifactOrigin(_Origin, total=False):
    """What made an artifact, as its stage states it (pipeline.store.Artifact.attrs)."""

    model: ModelIdentity  # lare
    prompt_fallback: PromptFallback  # lare with a prompt template: rows without a class


class ArtifactAttrs(ArtifactOrigin):
    """Group attributes of `<kind>/<fp16>/` (cache_schema.md, "Artifacts")."""

    kind: str
    fingerprint: str
    n_rows: int
    rows_per_shard: int
    n_shards: int
    arrays: list[str]
    created_at: str
    packages: dict[str, str]


class ShardEntry(TypedDict):
    """A shard as the manifest lists it."""

    rows: list[int]  # [start, stop)
    files: dict[str, str]  # store key -> xxh3-128
    n_ok: int


class _ShardRecord(ShardEntry):
    shard: int
    failed: list[FailedRow]
    written_at: str


class WriterInfo(TypedDict, total=False):
    """How a shard was computed, recorded with it (stages.extract)."""

    batch_size: int
    device: str
    host: str
    compiled: bool
    threads: int


class ShardRecord(_ShardRecord, WriterInfo):
    """`_progress/<kind>/<fp16>/<shard:06d>.json`, written after the shard's data: the shard is done."""


class ManifestArtifact(ArtifactAttrs):
    """An artifact's entry in the manifest: its attributes and its shards' records."""

    shards_done: int
    complete: bool
    n_failed: int
    failed: list[FailedRow]
    shards: dict[str, ShardEntry]  # shard number (a string: JSON keys) -> its entry


class _Manifest(TypedDict):
    schema_version: int
    subset: str | None
    updated_at: str
    packages: dict[str, str]
    latest_index: str | None  # the path of the index created last
    indexes: dict[str, IndexAttrs]  # by path, index/<fp16>
    artifacts: dict[str, ManifestArtifact]  # by path, <kind>/<fp16>
    metadata_files: dict[str, str]  # every zarr.json: store key -> xxh3-128


class Manifest(_Manifest, total=False):
    """`manifest.json`, written atomically, last: what a reader trusts."""

    copied_from: str  # `pipeline cache push/pull`: the source's URL and when
    copied_at: str


# Codecs a cache may use: plain numeric/string encodings and compressors. Anything else (e.g.
# numcodecs.pickle, an object codec) could run code or is not ours, so the cache is refused before
# zarr reads a byte of its data.
SAFE_CODECS = frozenset(
    {"bytes", "transpose", "sharding_indexed", "zstd", "blosc", "gzip", "crc32c", "vlen-utf8", "vlen-bytes"}
)


def check_codecs(metadata: Any, where: str) -> None:
    """Refuse zarr metadata (a parsed zarr.json, consolidated or not) naming a codec outside SAFE_CODECS."""
    if isinstance(metadata, dict):
        for codec in metadata.get("codecs", []) if isinstance(metadata.get("codecs"), list) else []:
            name = codec.get("name") if isinstance(codec, dict) else codec
            if name not in SAFE_CODECS:
                raise UserError(f"refusing {where}: codec '{name}' is not one this pipeline reads safely")
        for value in metadata.values():
            check_codecs(value, where)
    elif isinstance(metadata, list):
        for value in metadata:
            check_codecs(value, where)


def index_path(index_fp: str) -> str:
    """Where an index table of this fingerprint lives in a cache."""
    return f"index/{index_fp[:16]}"


def index_splits(indexes: Mapping[str, IndexAttrs], art: ArtifactOrigin) -> list[str]:
    """The splits of the index an artifact's rows refer to, as the manifest's `indexes` list them
    (none when it lists no such index)."""
    index = indexes.get(index_path(art["upstream"]["index"]))
    return index.get("splits", []) if index is not None else []


# The index columns and their Zarr data types (cache_schema.md, "Index").
INDEX_COLUMNS = {
    "id": "string", "path": "string", "label": "uint8", "split": "string", "generator": "string",
    "group": "string", "format": "string", "width": "int32", "height": "int32", "jpeg_quality": "int16",
    "size": "int64", "mtime_ns": "int64",
}  # fmt: skip
MAX_LATENT_CHANNELS = 16  # SD v1/v2: 4; SD3 and FLUX VAEs: 16


def _layout_error(where: str, what: str) -> UserError:
    return UserError(f"refusing {where}: {what} (the cache's metadata disagrees with cache_schema.md)")


def _array_meta(metadata: dict[str, Any], key: str) -> dict[str, Any] | None:
    meta = metadata.get(f"{key}/zarr.json")
    return meta if isinstance(meta, dict) else None


def _chunk_shape(meta: dict[str, Any]) -> tuple[list[Any], list[Any] | None]:
    """(outer chunk shape: the shard's where sharded, inner chunk shape or None)."""
    outer = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    inner = None
    for codec in meta.get("codecs", []):
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            inner = codec.get("configuration", {}).get("chunk_shape")
    return outer, inner


def _check_array(meta: dict[str, Any], where: str, shape: list[int], dtype: str, chunk0: int | None) -> None:
    """One array's zarr.json against the shape and dtype the schema and the index imply."""
    if meta.get("node_type") != "array":
        raise _layout_error(where, "not an array")
    if meta.get("shape") != shape:
        raise _layout_error(where, f"shape {meta.get('shape')}, expected {shape}")
    if meta.get("data_type") != dtype:
        raise _layout_error(where, f"data type {meta.get('data_type')}, expected {dtype}")
    outer, inner = _chunk_shape(meta)
    if not isinstance(outer, list) or len(outer) != len(shape) or outer[1:] != shape[1:]:
        raise _layout_error(where, f"chunk shape {outer} does not hold whole rows of {shape[1:]}")
    if chunk0 is not None and outer[0] != chunk0:
        raise _layout_error(where, f"{outer[0]} rows per shard or chunk, expected {chunk0}")
    if not isinstance(outer[0], int) or outer[0] < 1:
        raise _layout_error(where, f"chunk shape {outer}")
    if inner is not None and (
        not isinstance(inner, list) or inner[1:] != shape[1:] or not isinstance(inner[0], int)
        or inner[0] < 1 or outer[0] % inner[0]
    ):  # fmt: skip
        raise _layout_error(where, f"inner chunk shape {inner} does not divide the shard {outer}")


def _n(value: Any, where: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _layout_error(where, f"{what} is {value!r}")
    return value


def check_layout(manifest: Mapping[str, Any], metadata: dict[str, Any], url: str) -> None:
    """Every array the manifest names, checked against the schema and its index's row count.

    Run before anything is read: a stranger's zarr.json claiming 10^12 rows would otherwise make a
    reader allocate for them. A table's row count is tied to the chunk objects its manifest entry
    lists, and a complete artifact's shard count to its shard entries, so a row count cannot be
    inflated without inflating the manifest with it. Arrays whose metadata is missing are left to
    `verify` (it names missing objects).
    """
    rows = {}
    for path, attrs in manifest.get("indexes", {}).items():
        where = f"{url}/{path}"
        n = _n(attrs.get("n_rows"), where, "n_rows")
        files = attrs.get("files", {})
        for name, dtype in INDEX_COLUMNS.items():
            meta = _array_meta(metadata, f"{path}/{name}")
            if meta is None:
                continue
            _check_array(meta, f"{where}/{name}", [n], dtype, None)
            chunk = _chunk_shape(meta)[0][0]
            listed = sum(1 for k in files if k.startswith(f"{path}/{name}/"))
            if files and listed != max(1, -(-n // chunk)):
                raise _layout_error(f"{where}/{name}", f"{n} rows in {chunk}-row chunks, but {listed} listed")
        rows[path] = n
    for path, art in manifest.get("artifacts", {}).items():
        where = f"{url}/{path}"
        index = index_path(str(art.get("upstream", {}).get("index")))
        if index not in rows:
            raise _layout_error(where, f"its index {index} is not in the manifest")
        n = rows[index]
        if art.get("n_rows") != n:
            raise _layout_error(where, f"n_rows {art.get('n_rows')!r}, but its index has {n} rows")
        per_shard = _n(art.get("rows_per_shard"), where, "rows_per_shard") or 1
        if art.get("n_shards") != -(-n // per_shard):
            raise _layout_error(where, f"n_shards {art.get('n_shards')!r} for {n} rows of {per_shard}")
        if art.get("complete") and len(art.get("shards", {})) != art["n_shards"]:
            raise _layout_error(where, "marked complete without a record of every shard")
        params = art.get("params", {})
        for name in art.get("arrays", []):
            meta = _array_meta(metadata, f"{path}/{name}")
            if meta is None:
                continue
            if name == "status":
                _check_array(meta, f"{where}/status", [n], "uint8", per_shard)
            elif art.get("kind") == "lare" and name == "maps":
                side = _n(params.get("size"), where, "params.size") // 8
                channels = meta.get("shape", [0, 0])[1] if len(meta.get("shape", [])) == 4 else 0
                if not isinstance(channels, int) or not 1 <= channels <= MAX_LATENT_CHANNELS:
                    raise _layout_error(f"{where}/maps", f"shape {meta.get('shape')}")
                _check_array(meta, f"{where}/maps", [n, channels, side, side], params.get("dtype"), per_shard)
            elif art.get("kind") == "pixels" and name == "crops":
                side = _n(params.get("size"), where, "params.size")
                _check_array(meta, f"{where}/crops", [n, 3, side, side], "uint8", per_shard)
            else:
                raise _layout_error(f"{where}/{name}", "an array the schema does not name")
