"""Sharing caches: URLs, push/pull, remote verify and safety, against real servers on loopback.

An S3 API server (moto's server mode) and an HTTP server honouring Range requests are started
here on 127.0.0.1; a guard refuses every non-loopback connection, in this process and in the
`pipeline` subprocesses (tests/loopback_site/sitecustomize.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import share
from pipeline.errors import UserError
from pipeline.integrity import require_intact, verify
from pipeline.share import JOURNAL, copy_cache
from pipeline.store import ArraySpec, Artifact, CacheStore, ShardWrite
from stages.extract import run_extract
from tests.helpers import ONE_THREAD, TINY_TRAIN, artifact_arrays, run_cli, tiny_extract, toy_index
from tests.servers import guarded_env, loopback, range_http, s3_in_environment


@pytest.fixture(scope="module")
def s3():
    """The loopback S3 server; its endpoint and dummy credentials in the environment; a bucket."""
    with s3_in_environment("team") as served:
        yield served


@pytest.fixture(scope="module")
def extracted(s3, genimage):
    """`extract --cache-dir s3://...`: a real extraction (tiny model) written straight to the bucket."""
    cfg = tiny_extract(genimage, "s3://team/extracted", ensemble=1, size=64, rows_per_shard=8)
    return run_extract(cfg)


def _cli(*args, env, check=True):
    return run_cli(*args, env=env, check=check)


def _flip_byte(fs, path: str) -> None:
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))


def test_loopback_guard_fires_here_and_in_subprocesses(s3):
    with pytest.raises(loopback.NonLoopbackConnection):
        socket.create_connection(("192.0.2.1", 9), timeout=0.5)  # TEST-NET-1: never reached
    code = "import socket; socket.create_connection(('198.51.100.1', 9), timeout=0.5)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **guarded_env()}
    )
    assert proc.returncode != 0 and "refusing a connection to non-loopback 198.51.100.1" in proc.stderr


def test_extract_to_s3_then_pull_push_round_trip_is_bitwise(s3, extracted, tmp_path):
    url = "s3://team/extracted/sdv14.zarr"
    assert verify(CacheStore(url)) == []
    assert s3["fs"].exists("team/extracted/sdv14.zarr/_progress")  # resume records sit beside the data

    pulled = tmp_path / "pulled.zarr"
    first = copy_cache(url, str(pulled), progress=False)
    assert first.copied > 10 and first.skipped == 0
    assert verify(CacheStore(str(pulled))) == []

    push = _cli("cache", "push", str(pulled), "s3://team/shared/sdv14.zarr", env=s3["env"]).stdout
    assert f"{first.copied} objects copied" in push and "0 already there" in push
    again = copy_cache(str(pulled), "s3://team/shared/sdv14.zarr", jobs=2, progress=False)
    assert (again.copied, again.skipped) == (0, first.copied)

    back = tmp_path / "back.zarr"
    copy_cache("s3://team/shared/sdv14.zarr", str(back), progress=False)
    for path in extracted.artifacts.values():
        assert artifact_arrays(back, path) == artifact_arrays(pulled, path)
    assert not (back / "_share").exists()  # the copy journal is gone once the manifest is written
    files = sorted(p.relative_to(pulled) for p in pulled.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(back) for p in back.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "manifest.json":
            assert (pulled / rel).read_bytes() == (back / rel).read_bytes(), rel

    info = _cli("cache", "info", "s3://team/shared/sdv14.zarr", env=s3["env"]).stdout
    assert "subset sdv14" in info and "complete 3/3 shards, 20 rows" in info


def test_push_resumes_after_an_interruption(s3, extracted, monkeypatch):
    src, dst = "s3://team/extracted/sdv14.zarr", "s3://team/resume/sdv14.zarr"
    real_write, real_read, calls = share._Target.write, share._Target.read, []

    def failing_write(self, key, data):
        if key != JOURNAL:
            calls.append(key)
            if len(calls) > 10:
                raise ConnectionError("network went away")
        real_write(self, key, data)

    monkeypatch.setattr(share._Target, "write", failing_write)
    with pytest.raises(ConnectionError):
        copy_cache(src, dst, jobs=1, progress=False)
    monkeypatch.undo()
    assert not s3["fs"].exists(f"{dst[5:]}/manifest.json")  # half-pushed: never taken as complete
    with pytest.raises(UserError, match="no cache at|has no manifest.json"):
        require_intact(dst, check=False)
    assert len(json.loads(s3["fs"].cat_file(f"{dst[5:]}/{JOURNAL}"))["landed"]) == 10

    reads = []
    monkeypatch.setattr(share._Target, "read", lambda self, key: reads.append(key) or real_read(self, key))
    rest = copy_cache(src, dst, jobs=3, progress=False)
    assert rest.skipped == 10 and rest.copied > 0
    assert sorted(reads) == sorted([JOURNAL, "manifest.json"])  # arrival checked by ETag: no read-back
    assert verify(CacheStore(dst)) == [] and not s3["fs"].exists(f"{dst[5:]}/{JOURNAL}")


def test_tampered_remote_cache_is_named_and_refused_then_repaired(s3, extracted):
    src, dst = "s3://team/extracted/sdv14.zarr", "s3://team/tamper/sdv14.zarr"
    copy_cache(src, dst, progress=False)
    manifest = CacheStore(dst).manifest()
    lare = extracted.artifacts["lare"]
    key = next(k for k in manifest["artifacts"][lare]["shards"]["1"]["files"] if "/maps/" in k)
    _flip_byte(s3["fs"], f"{dst[5:]}/{key}")

    bad = _cli("cache", "verify", dst, env=s3["env"], check=False)
    assert bad.returncode == 1 and f"shard 1 of {lare}: {key} does not match its checksum" in bad.stderr
    with pytest.raises(UserError, match=f"failed verification: shard 1 of {lare}: {key}.*--no-verify") as e:
        require_intact(dst)
    assert "\n" not in str(e.value)
    assert require_intact(dst, check=False).url == dst  # --no-verify: the user's call

    assert copy_cache(src, dst, progress=False).copied == 0  # the target's manifest vouches for it
    assert copy_cache(src, dst, progress=False, recheck=True).copied == 1  # --recheck finds and repairs it
    assert verify(CacheStore(dst)) == []


def test_train_from_s3_and_refuse_a_tampered_one(s3, extracted, tmp_path):
    """`pipeline train --from-cache s3://...` trains from the bucket; one flipped byte there: refused."""
    src, dst = "s3://team/extracted/sdv14.zarr", "s3://team/train-tamper/sdv14.zarr"
    env = {**s3["env"], **ONE_THREAD}

    def train(cache, out, *extra, check=True):
        args = ("train", "--from-cache", cache, "--method", "egre", "--epochs", "1", "--batch-size", "4",
                "--out", str(tmp_path / out), "--no-progress", *TINY_TRAIN, *extra)  # fmt: skip
        return _cli(*args, env=env, check=check)

    run = Path(train(src, "runs").stdout.strip())
    assert (run / "done.json").is_file() and (run / "epoch-001.safetensors").is_file()
    trained_on = json.loads((run / "params.json").read_text())["caches"]
    assert [f"lare/{c['lare'][:16]}" for c in trained_on] == [extracted.artifacts["lare"]]

    copy_cache(src, dst, progress=False)
    lare = extracted.artifacts["lare"]
    key = next(
        k for k in CacheStore(dst).manifest()["artifacts"][lare]["shards"]["0"]["files"] if "/maps/" in k
    )
    _flip_byte(s3["fs"], f"{dst[5:]}/{key}")
    refused = train(dst, "tampered", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert (
        f"failed verification: shard 0 of {lare}: {key}" in refused.stderr and "--no-verify" in refused.stderr
    )
    assert not (tmp_path / "tampered").exists()  # refused before anything was written
    assert (Path(train(dst, "tampered", "--no-verify").stdout.strip()) / "done.json").is_file()  # user's call


def test_push_adds_to_a_shared_cache_without_unlisting_others(s3, extracted, tmp_path):
    dst = "s3://team/merged/sdv14.zarr"
    copy_cache("s3://team/extracted/sdv14.zarr", dst, progress=False)
    other = CacheStore(str(tmp_path / "other.zarr"), mode="a", subset="sdv14")
    attrs = {"params": {"t": 9, "size": 16, "dtype": "float32"}, "upstream": {"index": toy_index(other, 4)}}
    art = Artifact("lare", "e" * 64, {"maps": ArraySpec((2, 2, 2), "float32")}, attrs)
    other.open_artifact(art, 4, 4)
    ones = {"maps": np.ones((4, 2, 2, 2), "float32")}
    other.write_shard(ShardWrite(art.path, 0, 0, 4, ones, np.ones(4, "uint8"), [], {}))
    other.write_manifest()
    copy_cache(str(tmp_path / "other.zarr"), dst, progress=False)
    merged = CacheStore(dst)
    assert set(extracted.artifacts.values()) | {art.path} <= set(merged.manifest()["artifacts"])
    assert verify(merged) == []
    with pytest.raises(UserError, match="are the same cache"):
        copy_cache(dst, dst + "/", progress=False)
    with pytest.raises(UserError, match="holds subset 'sdv14', not 'adm'"):
        adm = CacheStore(str(tmp_path / "adm.zarr"), mode="a", subset="adm")
        adm.write_manifest()
        copy_cache(str(tmp_path / "adm.zarr"), dst, progress=False)


def _zip_dir(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    return out


def test_http_with_ranges_and_zip_are_read_only(s3, extracted, tmp_path):
    local = tmp_path / "sdv14.zarr"
    copy_cache("s3://team/extracted/sdv14.zarr", str(local), progress=False)
    _zip_dir(local, tmp_path / "sdv14.zip")
    pixels = extracted.artifacts["pixels"]
    with range_http(tmp_path) as (base, handler):
        remote = CacheStore(f"{base}/sdv14.zarr")
        assert verify(remote) == []
        crops = remote.group[pixels]["crops"]
        assert crops.shards[0] > crops.chunks[0]  # one row is part of a shard: a byte-range read
        np.testing.assert_array_equal(crops[3], CacheStore(str(local)).group[pixels]["crops"][3])
        assert handler.ranges_served > 0

        assert verify(CacheStore(f"{base}/sdv14.zip")) == []  # a zip served over http
        copy_cache(f"{base}/sdv14.zarr", str(tmp_path / "from_http.zarr"), progress=False)
        assert verify(CacheStore(str(tmp_path / "from_http.zarr"))) == []

        refused = _cli("cache", "push", str(local), f"{base}/up.zarr", env=s3["env"], check=False)
        assert refused.returncode == 2 and "is read-only (http)" in refused.stderr
        assert refused.stderr.strip().count("\n") == 0

    zipped = CacheStore(str(tmp_path / "sdv14.zip"))
    assert verify(zipped) == [] and zipped.group[pixels]["crops"].shape[0] == extracted.rows_done
    with pytest.raises(UserError, match="is read-only \\(zip\\)"):
        CacheStore(str(tmp_path / "sdv14.zip"), mode="a")


def test_unsafe_names_and_pickle_codecs_are_refused(s3, extracted, tmp_path):
    local = tmp_path / "sdv14.zarr"
    copy_cache("s3://team/extracted/sdv14.zarr", str(local), progress=False)
    manifest = json.loads((local / "manifest.json").read_text())
    for bad in ("../../outside", "/etc/passwd", "lare//x"):
        evil = {**manifest, "metadata_files": {**manifest["metadata_files"], bad: "0"}}
        s3["fs"].pipe_file("team/evil/sdv14.zarr/manifest.json", json.dumps(evil).encode())
        s3["fs"].pipe_file("team/evil/sdv14.zarr/zarr.json", (local / "zarr.json").read_bytes())
        with pytest.raises(UserError, match="unsafe path"):
            copy_cache("s3://team/evil/sdv14.zarr", str(tmp_path / "victim.zarr"), progress=False)
    assert not (tmp_path / "outside").exists() and not (tmp_path / "victim.zarr" / "manifest.json").exists()

    meta_path = local / extracted.artifacts["lare"] / "maps" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["codecs"].insert(0, {"name": "numcodecs.pickle"})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="codec 'numcodecs.pickle' is not one this pipeline reads safely"):
        CacheStore(str(local))
    with pytest.raises(UserError, match="numcodecs.pickle"):
        copy_cache(str(local), "s3://team/pickled/sdv14.zarr", progress=False)
    assert not s3["fs"].exists("team/pickled")
    (local / "manifest.json").unlink()  # an unfinished cache: its metadata is found by listing
    with pytest.raises(UserError, match="numcodecs.pickle"):
        CacheStore(str(local), mode="a")


def test_an_etag_that_is_not_the_md5_is_checked_by_reading_back(monkeypatch):
    """SSE-KMS and multipart uploads give ETags that are not the md5: the object is read back instead."""
    target = share._Target("memory://etag/sdv14.zarr")
    real_pipe = target.fs.pipe_file

    def pipe_file(path, data, **kwargs):
        real_pipe(path, data, **kwargs)
        return {"ETag": '"0123456789abcdef0123456789abcdef"'}

    monkeypatch.setattr(target.fs, "pipe_file", pipe_file)
    target.write("lare/x/maps/c/0/0/0/0", b"shard bytes")
    assert target.read("lare/x/maps/c/0/0/0/0") == b"shard bytes"
