"""What the tests share besides fixtures (tests/conftest.py holds those): running the installed
`pipeline` command, tiny extractions and runs, bitwise cache comparison (`from tests.helpers import ...`:
tests/ is a package, so its folders may mirror pipeline/ and stages/ without shadowing them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the repository
PIPELINE = shutil.which("pipeline", path=os.path.dirname(sys.executable)) or "pipeline"


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


TINY_TRAIN = ("--backbone", "tiny-RN", "--backbone-weights", "random", "--crop-size", "32", "--lr", "1e-3")


def tiny_extract(data_root: Path | str, cache_dir: Path | str, subset: str = "sdv14", **kw):
    """The ExtractConfig of an in-process extraction with the tiny SD model on CPU, without progress
    bars; `kw`: its other fields, these three included (the command's defaults otherwise)."""
    from stages.configs import ExtractConfig

    tiny = {"model": "tiny", "device": "cpu", "progress": False}
    return ExtractConfig(data_root=str(data_root), subset=subset, cache_dir=str(cache_dir), **{**tiny, **kw})


def extract_cache(data_root: Path, cache_dir: Path, subset: str = "sdv14", **kw) -> Path:
    """Extract a subset with the tiny SD model (64 px, crop geometry: LaRE aligned with the pixels);
    `kw`: other ExtractConfig fields (e.g. perturb)."""
    from stages.extract import run_extract

    geometry = {"size": 64, "pixel_size": 64, "preprocess": "crop", "rows_per_shard": 16}
    cfg = tiny_extract(data_root, cache_dir, subset, **{**geometry, **kw})
    return Path(run_extract(cfg).cache)


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


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same for the `pipeline` subprocesses


def tiny_run(cache: Path, out: Path, method: str, epochs: int) -> Path:
    """A short run (tiny backbone, batch 16, lr 1e-3, 32 px crops) on one thread."""
    from stages.configs import TrainConfig
    from stages.train import run_train

    cfg = TrainConfig(
        caches=[str(cache)], method=method, out=str(out), epochs=epochs, batch_size=16, lr=1e-3,
        crop_size=32, backbone="tiny-RN", backbone_weights="random", progress=False,
    )  # fmt: skip
    with torch_threads(1):
        return run_train(cfg)


def add_bad_files(split_dir: str | Path) -> dict[str, str]:
    """Drop one of each kind of bad file into a label folder; returns file name -> expected reason prefix."""
    import io

    from PIL import Image

    from stages.genimage.synthetic import encode_image

    d = Path(split_dir)
    good = encode_image(np.full((64, 64, 3), 128, dtype=np.uint8), "PNG")
    (d / "bad_truncated.png").write_bytes(good[: len(good) // 2])
    (d / "bad_empty.png").write_bytes(b"")
    (d / "bad_text.jpg").write_bytes(b"this is not an image, it is a text file\n" * 4)
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    (d / "bad_bomb.png").write_bytes(bomb.getvalue())
    return {
        "bad_truncated.png": "corrupt or truncated",
        "bad_empty.png": "empty file",
        "bad_text.jpg": "not an image",
        "bad_bomb.png": "decompression bomb",
    }


def make_folder(
    folder: str | Path, count: int, generated: bool, seed: int = 0, fmt: str | None = None, size: int = 64
) -> list[Path]:
    """`count` images of one class in one folder (any layout is made of such folders: the tests build
    each dataset shape of the README with it); `fmt` JPEG or PNG, else drawn per image."""
    from stages.genimage.synthetic import encode_image, make_image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for k in range(count):
        kind = fmt or ("JPEG" if rng.random() < 0.5 else "PNG")
        path = out / f"{'fake' if generated else 'real'}_{seed}_{k:04d}{'.jpg' if kind == 'JPEG' else '.png'}"
        path.write_bytes(encode_image(make_image(rng, size, size, generated), kind))
        written.append(path)
    return written


def save_random_clip(arch: str, path: str | Path, seed: int = 0, image_size: int = 224) -> Path:
    """Write a randomly initialised open_clip model's weights (safetensors): a stand-in for a real file."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from stages.detectors import backbone

    backbone._register_configs()  # the tiny configs, as the loader registers them
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None, force_image_size=image_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


@contextlib.contextmanager
def lines_said():
    """The progress lines the stages and pipeline modules say (their loggers, INFO and up) inside."""
    import logging

    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    keep = Keep()
    loggers = [logging.getLogger(name) for name in ("stages", "pipeline")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.setLevel(logging.INFO)
    try:
        yield said
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(keep)
            lg.setLevel(level)
