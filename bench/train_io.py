"""Training-batch I/O: samples/s from the Zarr cache vs one .pt file per image (the LaRE reference's
layout) vs decoding the original image files, on the same machine in the same run.

A synthetic GenImage-layout set is extracted with the tiny model (pixel crops 256 px, LaRE maps at
64 px: the crops are 96% of the bytes either way). Each reader delivers the same thing, a uint8
crop (3, 256, 256) and a float32 map per row, in a shuffled order, in one process.

    python bench/train_io.py [--per-class 150] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.configs import ExtractConfig
from stages.extract import run_extract
from stages.features.pixels import crop_tiled, decode_rgb
from stages.genimage.synthetic import make_genimage
from stages.runs.cachedata import CacheData


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def training_cache(
    tmp: Path,
    per_class: dict[str, int],
    model: str = "tiny",
    device: str = "cpu",
    size: int = 64,
    rows_per_shard: int = 128,
    batch_size: int = 16,
) -> str:
    """A synthetic sdv14 set (images per class per split) extracted into tmp/cache: 256 px pixel crops,
    LaRE maps at `size` (64: the crops are 96% of the bytes, as at 256 px with the real model)."""
    make_genimage(tmp / "data", "sdv14", per_class, seed=0)
    cfg = ExtractConfig(
        data_root=str(tmp / "data"), subset="sdv14", cache_dir=str(tmp / "cache"), model=model, device=device,
        splits=tuple(per_class), size=size, pixel_size=256, rows_per_shard=rows_per_shard,
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    return run_extract(cfg).cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="train-io-"))
    cache = training_cache(tmp, {"train": args.per_class})
    data = CacheData([cache])
    rows = data.rows("train")
    n = len(rows)
    order = np.random.default_rng(0).permutation(n)
    shuffled = type(rows)(rows.source[order], rows.row[order], rows.label[order])
    crops, maps = data.load(rows, progress=False)

    # the reference's layout: one .pt file per image (here holding crop and map), and the image files
    pt = tmp / "pt"
    pt.mkdir()
    for k in range(n):
        torch.save({"crop": torch.from_numpy(crops[k]), "map": torch.from_numpy(maps[k])}, pt / f"{k}.pt")
    src = data.sources[0]
    files = [
        str(Path(data.stores[0].read_table(src.index)[1]["root"]) / p) for p in src.columns["path"][rows.row]
    ]

    def read_zarr() -> None:
        data.load(shuffled, progress=False)

    def read_pt() -> None:
        for k in order:
            torch.load(pt / f"{k}.pt", weights_only=True)

    def read_images() -> None:
        for k in order:
            with open(files[k], "rb") as f:
                crop_tiled(decode_rgb(f.read()), 256)
            torch.load(pt / f"{k}.pt", weights_only=True)["map"]  # the reference also reads its map file

    figures = {
        "zarr_first_read": rate(read_zarr, n),
        "zarr_repeat": rate(read_zarr, n),
        "pt_per_image": rate(read_pt, n),
        "decode_image_files": rate(read_images, n),
    }
    figures = {k: round(v, 1) for k, v in figures.items()}
    ratios = {
        "zarr_first_vs_pt": round(figures["zarr_first_read"] / figures["pt_per_image"], 2),
        "zarr_repeat_vs_pt": round(figures["zarr_repeat"] / figures["pt_per_image"], 2),
        "zarr_first_vs_decode": round(figures["zarr_first_read"] / figures["decode_image_files"], 2),
        "zarr_repeat_vs_decode": round(figures["zarr_repeat"] / figures["decode_image_files"], 2),
    }
    result = {
        "rows": n,
        "samples_per_s": figures,
        "ratios": ratios,
        "host": platform.node(),
        "cpus": torch.get_num_threads(),
        "note": "one process, no loader workers; OS page cache warm after extraction (same for all readers)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_io-cpu.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Training-batch I/O, {n} rows (crop 3x256x256 uint8 + LaRE map), CPU, one process",
        "",
        "| reader | samples/s |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in figures.items()),
        "",
        "| ratio | x |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in ratios.items()),
    ]
    (out / "train_io-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
