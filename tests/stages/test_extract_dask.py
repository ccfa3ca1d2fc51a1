"""Extraction on a dask cluster is bitwise a single-process run, also when a worker dies; one run per cache.

CPU thread count moves the last bits of the maps, so the reference runs with one torch thread, as each
dask worker does (one thread per worker, OMP_NUM_THREADS=1 from dask's nanny).
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.lock import EXTRACT_LOCK, extract_lock
from pipeline.store import ArraySpec, Artifact, CacheStore, ShardWrite
from stages import extract_dask
from stages.configs import ExtractConfig
from stages.extract import plan_extract, run_extract
from stages.genimage.synthetic import make_genimage
from tests.helpers import PIPELINE, assert_same_cache, lines_said, run_cli, tiny_extract, torch_threads

SHARDS = 8  # one row each: small, so that the tests stay fast, and many, so that a kill lands mid-run


@pytest.fixture(scope="module")
def genimage(tmp_path_factory):
    """8 images (this module's own: the session's set would cost 2.5 times the compute)."""
    root = tmp_path_factory.mktemp("genimage-small")
    make_genimage(root, "sdv14", {"train": 2, "val": 2}, seed=5)
    return root


def _cfg(genimage, cache_dir, **overrides) -> ExtractConfig:
    return tiny_extract(genimage, cache_dir, **{"rows_per_shard": 1, "batch_size": 1, **overrides})


def _cli_args(genimage, cache_dir) -> list[str]:
    return ["extract", "--data-root", str(genimage), "--subset", "sdv14", "--cache-dir", str(cache_dir),
            "--model", "tiny", "--device", "cpu", "--rows-per-shard", "1", "--batch-size", "1",
            "--no-progress"]  # fmt: skip


def _on(client):
    """What `--scheduler ADDRESS` runs: a client of the module's cluster, made for the run."""
    return extract_dask.cluster_compute(None, client.scheduler.address)


def _assert_same_cache(cache: Path, reference: Path) -> None:
    assert_same_cache(cache / "sdv14.zarr", reference / "sdv14.zarr")


@pytest.fixture(scope="module")
def reference(genimage, tmp_path_factory):
    """A single-process, one-thread run."""
    cache_dir = tmp_path_factory.mktemp("single")
    with torch_threads(1):
        run_extract(_cfg(genimage, cache_dir))
    return cache_dir


@pytest.fixture(scope="module")
def client():
    """Two CPU worker processes, started by the code behind `--workers 2`."""
    with extract_dask.connect("cpu", 2, None) as c:
        c.wait_for_workers(2)
        yield c


def test_two_workers_write_the_bytes_of_a_single_process_run(reference, client, genimage, tmp_path):
    result = run_extract(_cfg(genimage, tmp_path), compute=_on(client))
    assert result.rows_done == SHARDS and result.failed == 0
    _assert_same_cache(tmp_path, reference)
    records = list((tmp_path / "sdv14.zarr" / "_progress" / result.artifacts["lare"]).glob("*.json"))
    assert len(records) == SHARDS and {json.loads(r.read_text())["threads"] for r in records} == {1}


def _gone(pid: int, timeout: float = 10) -> bool:
    """The process has exited and been reaped (by its nanny)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_is_rescheduled_and_the_cache_is_identical(reference, client, genimage, tmp_path):
    job = plan_extract(_cfg(genimage, tmp_path))
    pids = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker(rows: int) -> None:
        if killed:
            return
        busy = [w for w, keys in client.processing().items() if keys and w in pids]
        if busy:
            killed["pid"] = pids[busy[0]]
            os.kill(killed["pid"], signal.SIGKILL)

    reports = extract_dask.run_on_cluster(client, job, job.plan.shards(), kill_a_busy_worker)
    CacheStore(job.cache_url, mode="a").write_manifest()
    assert killed, "no worker was busy after the first shard"
    assert _gone(killed["pid"])
    assert sorted(r["shard"] for r in reports) == list(range(SHARDS))
    assert {r["loads"] for r in reports} == {1}  # the model is loaded once per worker, not per task
    _assert_same_cache(tmp_path, reference)
    client.wait_for_workers(2)  # the nanny restarts the killed worker


def test_a_half_written_shard_is_recomputed_on_the_cluster(reference, client, genimage, tmp_path):
    cache = tmp_path / "sdv14.zarr"
    shutil.copytree(reference / "sdv14.zarr", cache)
    lare = next(p.name for p in (cache / "lare").iterdir() if p.is_dir())
    (cache / "_progress" / "lare" / lare / "000003.json").unlink()  # killed between data and record
    shard = cache / "lare" / lare / "maps" / "c" / "3" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:40])  # and torn
    # with a decode process, as on a GPU: the cluster's workers must be allowed children (not daemonic)
    cfg = _cfg(genimage, tmp_path, loader_workers=1)
    result = run_extract(cfg, compute=_on(client))
    assert result.rows_done == 1
    _assert_same_cache(tmp_path, reference)


def test_a_torn_shard_object_is_replaced_not_read_back(tmp_path):
    store = CacheStore(str(tmp_path / "t.zarr"), mode="a", subset="sdv14")
    art = Artifact("lare", "f" * 64, {"maps": ArraySpec((4,), "float16", fill_value=float("nan"))})
    store.open_artifact(art, 10, 4)

    def write(shard: int, value: float) -> None:
        start, stop = shard * 4, min(shard * 4 + 4, 10)
        rows = np.full((stop - start, 4), value, dtype="float16")
        status = np.ones(stop - start, "u1")
        store.write_shard(ShardWrite(art.path, shard, start, stop, {"maps": rows}, status, [], {}))

    for shard in (1, 2):  # a full shard and the short last one
        write(shard, 1.0)
        obj = tmp_path / "t.zarr" / art.path / "maps" / "c" / str(shard) / "0"
        obj.write_bytes(obj.read_bytes()[:30])
        write(shard, 2.0)
    assert (store.group[art.path]["maps"][4:] == 2.0).all()


def test_a_worker_with_other_code_refuses_the_job(client, genimage, tmp_path):
    job = plan_extract(_cfg(genimage, tmp_path))
    lare = job.artifacts["lare"]
    forged = dataclasses.replace(lare, fingerprint="0" * 64, attrs={**lare.attrs, "code_version": "f" * 16})
    job.artifacts["lare"] = forged
    with pytest.raises(UserError, match="other code than the client"):
        extract_dask.run_on_cluster(client, job, job.plan.shards()[:1])


def test_bad_scheduler_address_is_one_line_after_a_short_timeout(genimage, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_dask, "CONNECT_TIMEOUT_S", 1)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the dask scheduler at tcp://127.0.0.1:9"):
        run_extract(_cfg(genimage, tmp_path),
                    compute=extract_dask.cluster_compute(None, "tcp://127.0.0.1:9"))  # fmt: skip
    assert time.perf_counter() - t0 < 20


def test_a_malformed_scheduler_address_is_one_line(genimage, tmp_path):
    with pytest.raises(UserError, match="--scheduler host-without-port: missing port number"):
        run_extract(_cfg(genimage, tmp_path),
                    compute=extract_dask.cluster_compute(None, "host-without-port"))  # fmt: skip


def test_a_numbered_gpu_is_refused_on_a_cluster():
    for workers, scheduler in ((2, None), (None, "tcp://127.0.0.1:9")):
        with (
            pytest.raises(UserError, match="pass --device cuda, not cuda:1"),
            extract_dask.connect("cuda:1", workers, scheduler),
        ):
            pass


def test_workers_and_scheduler_exclude_each_other(genimage, tmp_path):
    proc = run_cli(*_cli_args(genimage, tmp_path), "--workers", "2", "--scheduler", "tcp://x:1", check=False)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sdv14.zarr").exists()


def test_gpu_workers_get_one_device_each_and_the_gpu_resource():
    spec = extract_dask.gpu_cluster_spec(["2", "5"])
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in spec.values()] == ["2", "5"]
    assert all(w["options"]["resources"] == {"GPU": 1} for w in spec.values())
    assert all(w["options"]["nthreads"] == 1 for w in spec.values())


def test_a_held_lock_refuses_a_second_extraction_naming_the_holder(genimage, tmp_path):
    cache_url = str(tmp_path / "sdv14.zarr")
    with extract_lock(cache_url), pytest.raises(UserError, match=f"being extracted by pid {os.getpid()}"):
        run_extract(_cfg(genimage, tmp_path))
    holder = json.loads((tmp_path / "sdv14.zarr" / EXTRACT_LOCK).read_text())
    assert holder["pid"] == os.getpid()


_HOLD_FORK_AND_DIE = """
import os, signal, sys, time
from pipeline.lock import extract_lock
with extract_lock(sys.argv[1]):
    started, tell = os.pipe()
    if os.fork() == 0:  # a DataLoader decode worker, still busy when its parent is killed
        os.write(tell, b"1")
        time.sleep(10)
        os._exit(0)
    os.read(started, 1)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_run(tmp_path):
    cache_url = str(tmp_path / "sdv14.zarr")
    proc = subprocess.run([sys.executable, "-c", _HOLD_FORK_AND_DIE, cache_url], stdout=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    with extract_lock(cache_url):  # at once: the resume of a killed run is never refused
        pass


def test_two_extractions_at_once_one_refuses_nothing_is_lost(reference, client, genimage, tmp_path):
    """Both start together; whichever takes the lock is frozen while the other tries, then finishes."""
    args = [*_cli_args(genimage, tmp_path), "--scheduler", client.scheduler.address]
    procs = [subprocess.Popen([PIPELINE, *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]  # fmt: skip
    lock = tmp_path / "sdv14.zarr" / EXTRACT_LOCK
    by_pid = {p.pid: p for p in procs}
    deadline = time.time() + 120
    holder = None
    while holder is None and time.time() < deadline:
        try:
            holder = by_pid.get(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.005)
    assert holder is not None, "neither run took the lock"
    holder.send_signal(signal.SIGSTOP)  # so that the other surely meets the lock held
    other = procs[1] if holder is procs[0] else procs[0]
    try:
        _, err = other.communicate(timeout=120)
    finally:
        holder.send_signal(signal.SIGCONT)
    assert other.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("Error: ") and f"pid {holder.pid}" in err
    _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    _assert_same_cache(tmp_path, reference)


def test_an_object_store_cache_is_not_locked_and_the_user_is_told():
    with lines_said() as notes, extract_lock("memory://bucket/caches/sdv14.zarr"):
        pass
    assert len(notes) == 1 and "cannot be locked" in notes[0]
