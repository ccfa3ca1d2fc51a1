"""Shared fixtures: a private tool home (the tiny SD model is built once per session), synthetic data."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.genimage.synthetic import make_genimage

PIPELINE = shutil.which("pipeline", path=os.path.dirname(sys.executable)) or "pipeline"


# ---- `make test-fast`: the suite without the tests marked slow --------------------------------------
# A test that starts a process (the `pipeline` command through run_cli, any subprocess, or a local
# dask cluster's workers) is marked `cli` and `slow` here, whether it does so itself, through a
# fixture, or through a helper of its module or of this file; a test that trains for long is marked
# `slow` where it is written.
STARTS_A_PROCESS = re.compile(r"\b(subprocess\.(run|Popen|call|check_\w+)|extract_dask\.connect)\(")


def _callers(functions: dict[str, str], known: set[str]) -> set[str]:
    """The names among `functions` (name -> source) that start a process, directly or by calling one
    of `known` or of each other (to a fixed point)."""
    found = set(known)
    while True:
        calls = re.compile(rf"\b({'|'.join(map(re.escape, sorted(found)))})\(") if found else None
        more = {
            name
            for name, src in functions.items()
            if name not in found and (STARTS_A_PROCESS.search(src) or (calls and calls.search(src)))
        }
        if not more:
            return found
        found |= more


def _module_functions(module) -> dict[str, str]:
    return {
        name: inspect.getsource(f)
        for name, f in vars(module).items()
        if inspect.isfunction(f) and f.__module__ == module.__name__
    }


def pytest_collection_modifyitems(config, items):
    here = _callers(_module_functions(sys.modules[__name__]), set())
    per_module: dict[str, set[str]] = {}
    for item in items:
        module = item.module
        if module.__name__ not in per_module:
            per_module[module.__name__] = _callers(_module_functions(module), here)
        names = per_module[module.__name__]
        calls = re.compile(rf"\b({'|'.join(map(re.escape, sorted(names)))})\(")
        defs = getattr(item, "_fixtureinfo", None)
        fixtures = [d.func for ds in (defs.name2fixturedefs.values() if defs else ()) for d in ds]
        sources = [inspect.getsource(f) for f in [item.function, *fixtures] if _has_source(f)]
        if any(STARTS_A_PROCESS.search(src) or calls.search(src) for src in sources):
            item.add_marker(pytest.mark.cli)
            item.add_marker(pytest.mark.slow)


def _has_source(f) -> bool:
    try:
        inspect.getsource(f)
    except (OSError, TypeError):
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def pipeline_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("pipeline-home")
    os.environ["PIPELINE_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return home


@pytest.fixture(scope="session")
def genimage(tmp_path_factory) -> Path:
    """A small synthetic GenImage root (nested archive folders) holding sdv14; read-only for tests."""
    root = tmp_path_factory.mktemp("genimage")
    make_genimage(root, "sdv14", {"train": 6, "val": 4}, seed=1)
    return root


def run_cli(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed `pipeline` command as a user types it."""
    proc = subprocess.run(
        [PIPELINE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def toy_index(store, n: int, fp: str = "e" * 64) -> str:
    """A schema-conformant index table of `n` rows (ids and splits only) for hand-made toy artifacts;
    returns its fingerprint, for the artifacts' `upstream`."""
    store.write_table(
        f"index/{fp[:16]}",
        {
            "id": np.array([f"{i:032x}" for i in range(n)], dtype=object),
            "split": np.full(n, "train", dtype=object),
        },
        {"fingerprint": fp, "subset": store.subset, "n_rows": n, "splits": ["train"], "created_at": "2020"},
    )
    return fp


def extract_args(data: Path, cache: Path, *extra: str, subset: str = "sdv14") -> list[str]:
    """`pipeline extract` arguments for the tiny model on CPU, 4 rows per shard."""
    return [
        "extract", "--data-root", str(data), "--subset", subset, "--cache-dir", str(cache),
        "--model", "tiny", "--device", "cpu", "--rows-per-shard", "4", *extra,
    ]  # fmt: skip


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Two <subset>.zarr caches hold the same complete artifacts, bitwise, and the first one verifies."""
    import json

    from pipeline.integrity import verify
    from pipeline.store import CacheStore

    ref = json.loads((reference / "manifest.json").read_text())
    got = json.loads((cache / "manifest.json").read_text())
    assert got["artifacts"].keys() == ref["artifacts"].keys()
    for path, art in ref["artifacts"].items():
        assert got["artifacts"][path]["complete"]
        assert artifact_arrays(cache, path) == artifact_arrays(reference, path)
        assert {s: i["files"] for s, i in got["artifacts"][path]["shards"].items()} == {
            s: i["files"] for s, i in art["shards"].items()
        }  # the stored objects themselves are byte-identical
    assert verify(CacheStore(str(cache))) == []


def artifact_arrays(cache: Path, artifact: str) -> dict[str, bytes]:
    """Raw bytes of every array of an artifact, for bitwise comparison (NaN-safe)."""
    import zarr

    group = zarr.open_group(str(cache), mode="r")[artifact]
    return {name: np.ascontiguousarray(arr[:]).tobytes() for name, arr in group.arrays()}


# ---- training and evaluation (issue 3) ---------------------------------------------------------
TINY_TRAIN = ("--backbone", "tiny-RN", "--backbone-weights", "random", "--crop-size", "32", "--lr", "1e-3")


def extract_cache(data_root: Path, cache_dir: Path, subset: str = "sdv14", **kw) -> Path:
    """Extract a subset with the tiny SD model (64 px, crop geometry: LaRE aligned with the pixels);
    `kw`: other ExtractConfig fields (e.g. perturb)."""
    from stages.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data_root=str(data_root), subset=subset, cache_dir=str(cache_dir), model="tiny", device="cpu",
        size=64, pixel_size=64, preprocess="crop", rows_per_shard=16, progress=False, **kw,
    )  # fmt: skip
    return Path(run_extract(cfg, log=lambda m: None).cache)


@pytest.fixture(scope="session")
def learn_set(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, cache) of a synthetic sdv14 set: 24 train + 16 val images per class."""
    root = tmp_path_factory.mktemp("learn")
    make_genimage(root / "data", "sdv14", {"train": 24, "val": 16}, seed=3)
    return root / "data", extract_cache(root / "data", root / "cache")


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Tiny models on a shared 2-core machine: one torch thread is several times faster than two (and
    one is what each dask worker has). The count before is restored on the way out."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """`torch_threads(1)` around a test (the modules that train tiny models use it throughout)."""
    with torch_threads(1):
        yield


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same for the `pipeline` subprocesses


def tiny_run(cache: Path, out: Path, method: str, epochs: int) -> Path:
    """A short run (tiny backbone, batch 16, lr 1e-3, 32 px crops) on one thread."""
    from stages.train import TrainConfig, run_train

    cfg = TrainConfig(
        caches=[str(cache)], method=method, out=str(out), epochs=epochs, batch_size=16, lr=1e-3,
        crop_size=32, backbone="tiny-RN", backbone_weights="random", progress=False,
    )  # fmt: skip
    with torch_threads(1):
        return run_train(cfg, log=lambda m: None)


@pytest.fixture(scope="session")
def egre_run(learn_set, tmp_path_factory) -> Path:
    """A short EGRE run (tiny backbone, 2 epochs) on `learn_set`, for evaluation and detection tests."""
    return tiny_run(learn_set[1], tmp_path_factory.mktemp("runs"), "egre", epochs=2)
