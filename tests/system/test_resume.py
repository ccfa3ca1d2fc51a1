"""kill -9 a real `pipeline extract` mid-run, twice; the resumed cache is bitwise the uninterrupted one."""

import os
import re
import signal
import subprocess
import time

import pytest

from stages.genimage.synthetic import make_genimage
from tests.helpers import PIPELINE, assert_same_cache, extract_args, run_cli


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    make_genimage(root, "sdv14", {"train": 30, "val": 10}, seed=3)
    return root


def _args(data, cache):
    return extract_args(data, cache, "--batch-size", "2", "--size", "64", "--no-progress")


def _done(cache, kind, name="sdv14"):
    base = cache / f"{name}.zarr" / "_progress" / kind
    return [f for d in base.glob("*") for f in d.glob("*.json")] if base.exists() else []


def _kill_after(args, cache, shards, name="sdv14", cwd=None):
    proc = subprocess.Popen([PIPELINE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    deadline = time.time() + 120
    while len(_done(cache, "lare", name)) < shards and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_kill9_then_resume_is_bitwise_equal(bigger, tmp_path):
    reference = tmp_path / "reference"
    run_cli(*_args(bigger, reference))
    n_shards = 20  # 80 rows / 4

    killed = tmp_path / "killed"
    for stop_after in (3, 9):
        proc = _kill_after(_args(bigger, killed), killed, stop_after)
        assert proc.returncode == -signal.SIGKILL
        done = len(_done(killed, "lare"))
        assert stop_after <= done < n_shards, f"run was not interrupted mid-way ({done} shards done)"
    done_rows = 4 * len(_done(killed, "lare"))
    pixel_rows = 4 * len(_done(killed, "pixels"))

    resumed = run_cli(*_args(bigger, killed))
    # only the missing shards are computed
    m = re.search(r"(\d+) rows done", resumed.stderr)
    assert m and int(m.group(1)) == 80 - min(done_rows, pixel_rows), resumed.stderr

    assert_same_cache(killed / "sdv14.zarr", reference / "sdv14.zarr")
    assert run_cli("cache", "verify", str(killed / "sdv14.zarr")).returncode == 0


def test_kill9_then_resume_a_manifest_dataset_is_bitwise_equal(tmp_path):
    """The same guarantee for a dataset named by a manifest (issue 27): 40 rows, killed mid-run."""
    from tests.helpers import make_folder

    rows = ["path,label,generator"]
    for k, (gen, fake) in enumerate((("real", False), ("flux", True), ("sd3", True))):
        for p in make_folder(tmp_path / "data" / "images" / gen, 14 if gen == "real" else 13, fake, k):
            rows.append(f"images/{gen}/{p.name},{int(fake)},{gen}")
    (tmp_path / "data" / "list.csv").write_text("\n".join(rows) + "\n")

    def args(cache):
        return ["extract", "--manifest", "data/list.csv", "--dataset", "mixed", "--cache-dir", str(cache),
                "--model", "tiny", "--device", "cpu", "--rows-per-shard", "4", "--batch-size", "2",
                "--size", "64", "--no-progress"]  # fmt: skip

    run_cli(*args(tmp_path / "reference"), cwd=tmp_path)
    killed = tmp_path / "killed"
    proc = _kill_after(args(killed), killed, 3, "mixed", cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL
    assert 3 <= len(_done(killed, "lare", "mixed")) < 10, "run was not interrupted mid-way"
    resumed = run_cli(*args(killed), cwd=tmp_path)
    assert re.search(r"mixed: (\d+) rows done", resumed.stderr), resumed.stderr
    assert_same_cache(killed / "mixed.zarr", tmp_path / "reference" / "mixed.zarr")
