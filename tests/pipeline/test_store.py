import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import UserError
from pipeline.integrity import verify
from pipeline.schema import STATUS_FAILED, STATUS_OK
from pipeline.storage import safe_key
from pipeline.store import ArraySpec, Artifact, CacheStore, ShardWrite
from tests.helpers import toy_index


def _artifact(store, n=10):
    """A toy LaRE artifact (2 channels, 4 x 4 maps of 32 px images) on a toy index of `n` rows."""
    spec = ArraySpec((2, 4, 4), "float16", fill_value=float("nan"), compressor="blosc-shuffle")
    params = {"t": 1, "size": 32, "dtype": "float16"}
    return Artifact(
        "lare", "f" * 64, {"maps": spec}, {"params": params, "upstream": {"index": toy_index(store, n)}}
    )


def _write(store, art, shard, rows_per_shard=4, n=10):
    start, stop = shard * rows_per_shard, min((shard + 1) * rows_per_shard, n)
    data = {"maps": np.full((stop - start, 2, 4, 4), shard, dtype=np.float16)}
    status = np.full(stop - start, STATUS_OK, dtype=np.uint8)
    failed = []
    if shard == 1:
        status[0] = STATUS_FAILED
        data["maps"][0] = np.nan
        failed = [{"row": start, "path": "x.png", "reason": "empty file (0 bytes)"}]
    return store.write_shard(
        ShardWrite(art.path, shard, start, stop, data, status, failed, {"batch_size": 2})
    )


def test_chunk_rows_divides_the_shard_and_bounds_bytes():
    spec = ArraySpec((4, 32, 32), "float16")  # 8 KiB a row
    assert spec.chunk_rows(512) == 128
    assert spec.chunk_rows(100) == 100 and 100 % spec.chunk_rows(100) == 0
    assert ArraySpec((3, 256, 256), "uint8").chunk_rows(512) == 4  # 192 KiB rows -> 768 KiB chunks


def test_artifact_arrays_full_shape_whole_shard_writes(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    art = _artifact(store)
    assert store.open_artifact(art, 10, 4) == 4
    maps = store.group[art.path]["maps"]
    assert maps.shape == (10, 2, 4, 4) and maps.shards == (4, 2, 4, 4)
    assert np.isnan(maps[:]).all()  # nothing computed reads as NaN, never as zeros
    record = _write(store, art, 1)
    assert set(record["files"]) == set(store.shard_keys(art.path, 1))
    for key, digest in record["files"].items():
        assert os.path.exists(tmp_path / "c.zarr" / key) and store.checksum(key) == digest
    assert list(store.done_shards(art.path)) == [1]
    assert store.group[art.path]["status"][4:8].tolist() == [STATUS_FAILED, 1, 1, 1]
    # a layout knob: reopening with another rows-per-shard keeps the artifact's own
    assert store.open_artifact(art, 10, 8) == 4
    with pytest.raises(UserError, match="has 10 rows, expected 11"):
        store.open_artifact(art, 11, 4)


def test_manifest_lists_shards_failures_and_verify_detects_tampering(tmp_path):
    path = tmp_path / "c.zarr"
    store = CacheStore(str(path), mode="a", subset="sdv14")
    art = _artifact(store)
    store.open_artifact(art, 10, 4)
    for shard in range(3):
        _write(store, art, shard)
    manifest = store.write_manifest()
    entry = manifest["artifacts"][art.path]
    assert entry["complete"] and entry["shards_done"] == 3 and entry["n_failed"] == 1
    assert entry["failed"][0]["reason"] == "empty file (0 bytes)"
    assert entry["params"]["t"] == 1 and "torch" in manifest["packages"]
    assert verify(CacheStore(str(path))) == []

    key = next(iter(entry["shards"]["2"]["files"]))
    data = bytearray((path / key).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / key).write_bytes(bytes(data))
    problems = verify(CacheStore(str(path)))
    assert problems == [f"shard 2 of {art.path}: {key} does not match its checksum"]
    os.remove(path / key)
    assert "is missing" in verify(CacheStore(str(path)))[0]


def test_manifest_is_replaced_atomically(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    store.write_manifest()
    names = os.listdir(tmp_path / "c.zarr")
    assert "manifest.json" in names and not [n for n in names if ".tmp" in n]


def test_unsafe_manifest_keys_are_refused(tmp_path):
    for bad in ("../outside", "/etc/passwd", "a/../../b", "s3://bucket/x", "a\\b"):
        with pytest.raises(UserError, match="unsafe path"):
            safe_key(bad)
    assert safe_key("lare/abc/maps/c/0/0/0/0") == "lare/abc/maps/c/0/0/0/0"
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    manifest = store.write_manifest()
    manifest["metadata_files"]["../../escape"] = "0"
    store.write_json("manifest.json", manifest)
    with pytest.raises(UserError, match="unsafe path"):
        verify(CacheStore(str(tmp_path / "c.zarr")))


def test_a_damaged_manifest_is_one_line_not_a_traceback(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    store.write_manifest()
    (tmp_path / "c.zarr" / "manifest.json").write_text('{"trunc')
    with pytest.raises(UserError, match="manifest.json is damaged \\(not valid JSON\\)"):
        CacheStore(str(tmp_path / "c.zarr"))


def test_schema_version_and_foreign_groups_are_refused(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    store.group.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99.*no migration"):
        CacheStore(str(tmp_path / "c.zarr"))
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.create_array("x", shape=(1,), dtype="uint8")
    with pytest.raises(UserError, match="not a cache made by this pipeline"):
        CacheStore(str(tmp_path / "other.zarr"))
    with pytest.raises(UserError, match="no cache at"):
        CacheStore(str(tmp_path / "missing.zarr"))
    with pytest.raises(UserError, match="holds subset 'sdv14', not 'adm'"):
        CacheStore(str(tmp_path / "c2.zarr"), mode="a", subset="sdv14") and CacheStore(
            str(tmp_path / "c2.zarr"), mode="a", subset="adm"
        )


def test_no_pickle_anywhere(tmp_path):
    store = CacheStore(str(tmp_path / "c.zarr"), mode="a", subset="sdv14")
    art = _artifact(store)
    store.open_artifact(art, 10, 4)
    _write(store, art, 0)
    store.write_manifest()
    for dirpath, _, files in os.walk(tmp_path / "c.zarr"):
        for name in files:
            data = Path(dirpath, name).read_bytes()
            assert not data.startswith(b"\x80"), f"{name} looks like a pickle"
            if name.endswith(".json"):
                json.loads(data)
