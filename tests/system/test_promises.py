"""Issue 11: the README's promises, one by one, as a user types them (the installed `pipeline`).

One small synthetic sdv14 set is extracted three times into one cache: the full set (float16),
`--split val` alone (a newer artifact on a val-only index), and `--dtype float32` (the newest,
full index). Every test below reads that cache or a copy of it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import zarr

from pipeline.fingerprint import checksum_bytes
from tests.helpers import ONE_THREAD, ROOT, TINY_TRAIN, run_cli
from tests.servers import guarded_env, moto_s3, range_http, s3_env

EXTRACT = ("--model", "tiny", "--device", "cpu", "--rows-per-shard", "4", "--size", "64",
           "--pixel-size", "64", "--preprocess", "crop", "--ensemble", "1", "--no-progress")  # fmt: skip


def _extract(data: Path, cache_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    env = {**ONE_THREAD, **kw.pop("env", {})}
    return run_cli("extract", "--data-root", str(data), "--subset", "sdv14", "--cache-dir", str(cache_dir),
                   *EXTRACT, *extra, env=env, **kw)  # fmt: skip


def _train(cache: str, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli("train", "--from-cache", cache, "--method", "egre", "--out", str(out), *TINY_TRAIN,
                   "--epochs", "1", "--batch-size", "8", "--no-progress", *extra, env=ONE_THREAD,
                   check=check)  # fmt: skip


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error: ")]
    return line


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """The three-artifact cache; its artifact paths by name (full16, val16, full32)."""
    root = tmp_path_factory.mktemp("promises")
    run_cli("synth", str(root / "data"), "--train", "4", "--val", "3")
    _extract(root / "data", root / "cache")
    _extract(root / "data", root / "cache", "--split", "val")
    _extract(root / "data", root / "cache", "--dtype", "float32")
    path = root / "cache" / "sdv14.zarr"
    manifest = json.loads((path / "manifest.json").read_text())
    lare = {
        (len(manifest["indexes"][f"index/{a['upstream']['index'][:16]}"]["splits"]), a["params"]["dtype"]): p
        for p, a in manifest["artifacts"].items()
        if a["kind"] == "lare"
    }
    names = {"full16": lare[2, "float16"], "val16": lare[1, "float16"], "full32": lare[2, "float32"]}
    return {"root": root, "data": root / "data", "path": path, "manifest": manifest, **names}


@pytest.fixture(scope="module")
def run16(cache) -> Path:
    """An EGRE run trained on the float16 maps, chosen with a key=value selector."""
    proc = _train(str(cache["path"]), cache["root"] / "runs", "--lare", "dtype=float16")
    run = Path(proc.stdout.strip())
    assert json.loads((run / "params.json").read_text())["caches"][0]["lare"].startswith(
        cache["full16"].split("/")[1]
    )
    return run


# 1. choosing the artifact ---------------------------------------------------------------------
def test_train_reads_the_train_rows_beside_a_newer_val_only_artifact(cache, run16, tmp_path):
    proc = _train(str(cache["path"]), tmp_path / "runs")  # default: the newest covering split train
    params = json.loads((Path(proc.stdout.strip()) / "params.json").read_text())
    assert params["caches"][0]["lare"].startswith(cache["full32"].split("/")[1])
    sample = json.loads((run16 / "sample.json").read_text())
    assert sample["n"] + sample["n_validation"] == 8  # the training rows and the validation slice
    assert all(p.startswith("train/") for c in sample["caches"] + sample["validation"] for p in c["paths"])


def test_eval_reads_the_maps_the_run_was_trained_on_and_selectors_choose(cache, run16, tmp_path):
    out = tmp_path / "results"
    args = ("eval", "--checkpoint", str(run16), "--from-cache", str(cache["path"]), "--out", str(out),
            "--no-progress")  # fmt: skip
    run_cli(*args, env=ONE_THREAD)  # the newest is float32; the run's own float16 maps are read
    (result,) = (json.loads(p.read_text()) for p in out.glob("*.json"))
    assert result["test_cache"]["lare"].startswith(cache["full16"].split("/")[1])

    # two float16 artifacts cover split val: naming them by a filter is ambiguous, and says so
    line = _error_line(run_cli(*args, "--lare", "dtype=float16", check=False))
    assert "matches 2 artifacts" in line and cache["full16"] in line and cache["val16"] in line
    # `cache info` prints each artifact's fingerprint prefix and its key=value parameters
    info = run_cli("cache", "info", str(cache["path"])).stdout
    assert f"{cache['val16']} " in info and "dtype=float32" in info and "(val)" in info
    run_cli(*args, "--lare", cache["val16"].split("/")[1][:8], env=ONE_THREAD)
    tests = {json.loads(p.read_text())["test_cache"]["lare"][:16] for p in out.glob("*.json")}
    assert tests == {cache["full16"].split("/")[1], cache["val16"].split("/")[1]}
    # the float32 maps are not the run's: refused in one line
    assert "other parameters" in _error_line(run_cli(*args, "--lare", "dtype=float32", check=False))
    for bad, said in (("zz", "fingerprint prefix"), ("colour=red", "no parameter 'colour'"),
                      ("dtype=float64", "matches --lare dtype=float64")):  # fmt: skip
        assert said in _error_line(run_cli(*args, "--lare", bad, check=False))


# 3. report keyed by (run, test cache, split, artifact parameters) ------------------------------
def test_report_keeps_splits_apart_and_merges_artifacts_of_identical_parameters(cache, run16, tmp_path):
    """The val rows scored on the full artifact and on the val-only one (the same parameters, other
    fingerprints: a second extraction) are one cell, the rows-weighted mean; the train split is another."""
    out = tmp_path / "results"
    base = ("eval", "--checkpoint", str(run16), "--from-cache", str(cache["path"]), "--out", str(out),
            "--no-progress")  # fmt: skip
    for extra in (("--split", "train"), ("--split", "val"), ("--lare", cache["val16"].split("/")[1])):
        run_cli(*base, *extra, env=ONE_THREAD)
    results = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert len({r["test_cache"]["lare"] for r in results}) == 2 and len(results) == 3
    rep = run_cli("report", str(out), "--out", str(out / "matrix.png")).stdout
    header, row = rep.splitlines()[1:3]
    assert header.split()[3:] == ["sdv14:train", "sdv14:val", "mean"]
    (train,) = [r["metrics"] for r in results if r["split"] == "train"]
    val = [r["metrics"] for r in results if r["split"] == "val"]
    merged = sum(m["acc"] * m["n"] for m in val) / sum(m["n"] for m in val)
    assert row.split()[1:3] == [f"{100 * train['acc']:.1f}", f"{100 * merged:.1f}"]


# 2. zip caches, local and over http; detect with a run trained on one ------------------------
def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:  # file entries only, as Python's zipfile writes them
        for dirpath, _, files in os.walk(folder):
            for name in files:
                full = Path(dirpath, name)
                z.write(full, full.relative_to(folder).as_posix())
    return out


def test_zip_caches_train_eval_and_detect(cache, run16, tmp_path):
    archive = _zip(cache["path"], tmp_path / "sdv14.zip")
    run = Path(_train(str(archive), tmp_path / "runs", "--lare", "dtype=float16").stdout.strip())
    assert (run / "done.json").is_file()
    # the same artifacts, so the same fingerprint as the run trained on the folder
    assert (
        json.loads((run / "params.json").read_text())["caches"]
        == json.loads((run16 / "params.json").read_text())["caches"]
    )
    with range_http(tmp_path) as (base, _):
        env = {**ONE_THREAD, **guarded_env()}
        for url in (f"{base}/sdv14.zip", f"file://{archive}"):
            out = tmp_path / url.split(":")[0]
            run_cli("eval", "--checkpoint", str(run), "--from-cache", url, "--out", str(out), "--no-progress",
                    env=env)  # fmt: skip
            (result,) = (json.loads(p.read_text()) for p in out.glob("*.json"))
            assert result["metrics"]["n"] == 6
    with moto_s3() as endpoint:  # and a zip on an object store (moto's state is per process: own bucket)
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("promises-zip")
        try:
            fs.put(str(archive), "promises-zip/sdv14.zip")
            out = tmp_path / "s3"
            env = {**ONE_THREAD, **s3_env(endpoint), **guarded_env()}
            run_cli("eval", "--checkpoint", str(run), "--from-cache", "s3://promises-zip/sdv14.zip", "--out",
                    str(out), "--no-progress", env=env)  # fmt: skip
            (result,) = (json.loads(p.read_text()) for p in out.glob("*.json"))
            assert result["metrics"]["n"] == 6
        finally:
            fs.rm("promises-zip", recursive=True)
    images = tmp_path / "images"
    shutil.copytree(next(cache["data"].rglob("val")) / "ai", images)
    proc = run_cli("detect", str(images), "--checkpoint", str(run), "--out", str(tmp_path / "s.csv"),
                   "--device", "cpu", "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert "scored 3 image(s), 0 unreadable" in proc.stdout


# 4. the wheel carries its data ----------------------------------------------------------------
def test_the_wheel_carries_every_data_file_and_works_installed(cache, tmp_path):
    src = tmp_path / "src"  # a copy: building in the source tree would leave build/ there
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "pipeline", "stages"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is
                                          shutil.copytree else {}))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "wheels")], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("lare_pipeline-*.whl")
    data = ROOT / "stages" / "data"
    wanted = {f"stages/data/{p.relative_to(data).as_posix()}" for p in data.rglob("*") if p.is_file()}
    assert "stages/data/open_clip/tiny-RN.json" in wanted
    modules = [p for pkg in ("pipeline", "stages") for p in (ROOT / pkg).rglob("*.py")]
    wanted |= {p.relative_to(ROOT).as_posix() for p in modules}
    wanted.add("pipeline/code_versions.json")  # the declared equivalences, read by every stage
    assert "stages/features/lare.py" in wanted  # and every other module of the subpackages
    assert wanted <= set(zipfile.ZipFile(wheel).namelist())
    # installed from the wheel (not editable), on top of the shared dependencies, run from elsewhere
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import stages; print(stages.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path, check=True)  # fmt: skip
    assert probe.stdout.startswith(str(site))  # the wheel's copy, not the source tree
    proc = subprocess.run([str(site / "bin" / "pipeline"), "train", "--from-cache", str(cache["path"]),
                           "--out", str(tmp_path / "runs"), *TINY_TRAIN, "--epochs", "1", "--no-progress",
                           "--lare", "dtype=float16"],
                          env=env, capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "done.json").is_file()


# 5. the random-weights note -------------------------------------------------------------------
def test_eval_and_detect_say_random_weights(cache, run16, tmp_path):
    ev = run_cli("eval", "--checkpoint", str(run16), "--from-cache", str(cache["path"]), "--out",
                 str(tmp_path / "r"), "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert "random weights" in ev.stdout and "no forensic signal" in ev.stdout
    images = tmp_path / "images"
    shutil.copytree(next(cache["data"].rglob("val")) / "nature", images)
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")  # 10. a broken link is listed
    det = run_cli("detect", str(images), "--checkpoint", str(run16), "--out", str(tmp_path / "s.csv"),
                  "--device", "cpu", "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert "random weights" in det.stderr and "no forensic signal" in det.stderr
    assert "scored 3 image(s), 1 unreadable" in det.stdout
    with open(tmp_path / "s.csv") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["gone.png"]["decision"] == "error"
    assert rows["gone.png"]["error"] == f"broken symbolic link to {tmp_path / 'nowhere.png'}"


# 6. --no-verify on a cache whose first extraction did not finish --------------------------------
def test_no_verify_trains_on_the_finished_shards_of_an_unfinished_cache(cache, tmp_path):
    copy = tmp_path / "sdv14.zarr"
    shutil.copytree(cache["path"], copy)
    art = cache["full16"]
    (copy / "manifest.json").unlink()  # as when the first extraction is killed: no manifest yet
    for kind in ("lare", "pixels"):
        for p in (copy / "_progress" / kind).glob("*/000001.json"):
            p.unlink()  # shard 1 (rows 4-7, train/nature) was being written
    line = _error_line(_train(str(copy), tmp_path / "runs", check=False))
    assert "no manifest.json" in line and "--no-verify" in line
    proc = _train(str(copy), tmp_path / "runs", "--no-verify", "--lare", "dtype=float16")
    assert f"{art} is unfinished (3/4 shards)" in proc.stderr
    sample = json.loads((Path(proc.stdout.strip()) / "sample.json").read_text())
    rows = sorted(sample["caches"][0]["rows"] + sample["validation"][0]["rows"])  # training + validation
    assert (
        rows == [0, 1, 2, 3] and sample["n"] + sample["n_validation"] == 4
    )  # the finished shards' train rows


# 7. storage faults during extract: one line, the count of finished shards, resume --------------
FAULTS = {
    "ENOSPC": "OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))",
    "EACCES": "PermissionError(errno.EACCES, os.strerror(errno.EACCES))",
    "S3": "ClientError({'Error': {'Code': 'SlowDown', 'Message': 'Reduce your request rate'}}, 'PutObject')",
}
INJECT = """
import errno, os
from botocore.exceptions import ClientError
from zarr.storage import LocalStore

_set = LocalStore.set


async def set(self, key, value, *args, **kwargs):
    parts = key.split("/")
    if "c" in parts and int(parts[parts.index("c") + 1]) >= 2:  # shards from the third on
        raise {fault}
    return await _set(self, key, value, *args, **kwargs)


LocalStore.set = set
"""


@pytest.mark.parametrize("fault", FAULTS)
def test_a_storage_fault_during_extract_is_one_line_and_a_rerun_resumes(cache, tmp_path, fault):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT.format(fault=FAULTS[fault]))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    line = _error_line(_extract(cache["data"], tmp_path / "c", env=env, check=False))
    assert "2 of 4 shards are finished and kept" in line and "rerun the same command to resume" in line
    assert {"ENOSPC": "No space left on device", "EACCES": "Permission denied", "S3": "SlowDown"}[
        fault
    ] in line
    if fault == "ENOSPC":
        again = _extract(cache["data"], tmp_path / "c")
        assert "6 rows done" in again.stderr  # the last two shards only: 14 rows, 8 were kept
        run_cli("cache", "verify", str(tmp_path / "c" / "sdv14.zarr"))


def test_a_storage_fault_on_a_dask_worker_is_the_same_one_line(cache, tmp_path):
    """With --workers, the worker's storage error reaches the client as itself: the same one line."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(INJECT.format(fault=FAULTS["ENOSPC"]))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    line = _error_line(_extract(cache["data"], tmp_path / "c", "--workers", "1", env=env, check=False))
    assert "No space left on device" in line and "rerun the same command to resume" in line
    assert re.search(r"\d of 4 shards are finished and kept", line), line


# 8. the README's shapes are the cache's ---------------------------------------------------------
def test_readme_states_the_stored_shapes(cache):
    readme = (ROOT / "README.md").read_text()
    maps, crops = re.search(
        r"Maps are `\((N, [^)]*)\)`.*?pixel crops\s+`\((N, [^)]*)\)`", readme, re.S
    ).groups()
    group = zarr.open_group(str(cache["path"]), mode="r")
    pixels = next(p for p in cache["manifest"]["artifacts"] if p.startswith("pixels/"))
    c, h, w = group[pixels]["crops"].shape[1:]
    scale = 256 // 64  # the README speaks of the default 256 px; this cache is 64 px
    assert crops == f"N, {c}, {h * scale}, {w * scale}"
    c, h, w = group[cache["full16"]]["maps"].shape[1:]
    assert maps == f"N, {c}, {h * scale}, {w * scale}"


# 9. a plain zarr walk warns about nothing --------------------------------------------------------
def _walk(path: Path) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return {name for name, _ in zarr.open_group(str(path), mode="r").members(max_depth=None)}


def test_plain_zarr_walks_the_cache_without_a_warning(cache, tmp_path):
    names = _walk(cache["path"])
    assert {cache["full16"], cache["val16"], cache["full32"], f"{cache['full16']}/maps"} <= names
    # a push that adds to a cache holding other artifacts: the merged cache walks silently, whole
    target = tmp_path / "shared"
    _extract(cache["data"], target, "--split", "val", "--timestep", "100")
    run_cli("cache", "push", str(cache["path"]), str(target / "sdv14.zarr"))
    merged = _walk(target / "sdv14.zarr")
    assert {cache["full16"], cache["val16"], cache["full32"]} <= merged and len(
        {n for n in merged if n.count("/") == 1 and n.startswith("lare/")}
    ) == 4
    run_cli("cache", "verify", str(target / "sdv14.zarr"))


# 11. absurd shapes are refused before anything is read -----------------------------------------
def test_an_absurd_array_shape_is_refused_in_one_line(cache, tmp_path):
    copy = tmp_path / "sdv14.zarr"
    shutil.copytree(cache["path"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for name in ("maps", "status"):
        key = f"{cache['full32']}/{name}/zarr.json"
        meta = json.loads((copy / key).read_text())
        meta["shape"][0] = 10**12
        (copy / key).write_text(json.dumps(meta))
        manifest["metadata_files"][key] = checksum_bytes((copy / key).read_bytes())  # consistent
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for args in (("cache", "verify", str(copy)), ("train", "--from-cache", str(copy), *TINY_TRAIN)):
        line = _error_line(run_cli(*args, check=False))
        assert re.search(rf"{cache['full32']}/(maps|status): shape \[1000000000000", line), line


def test_the_egre_recipe_trains_on_sd_v1_5_like_the_reference_script():
    """README, "Reproduce the papers": `lare2-reference` trains EGRE on the subset the reference's script
    uses (SD v1.5), `lare2` on GenImage's (SD v1.4)."""
    from stages.configs import ReproduceConfig
    from stages.reproduce import make_plan

    readme = (ROOT / "README.md").read_text()
    assert "- `lare2-reference`: the same trained on SD v1.5, as the reference's training script" in readme
    for table, subset in (("lare2-reference", "sdv15"), ("lare2", "sdv14")):
        plan = make_plan(ReproduceConfig(table=table, data_root="d"))
        assert plan.protocol.method == "egre" and [t.subset for t in plan.trainings] == [subset]
