"""Training batches on the CPU: the loader with 0 vs 2 reading workers, batched vs per-sample batch
preparation, and decode / augment rates per core. Ratios, measured side by side in one run.

- loader: whole epochs of `EpochBatches` + `make_inputs` (EGRE, batch 48), streamed from the cache
  (a small `memory_rows`, so every shard is read during the epoch), with 0 and with 2 loader workers;
  and the in-memory load (every row read once) with 0 and 2 workers.
- prep: `make_inputs` (one gather per batch, masks by broadcasting) against the per-sample Python
  loop it replaced (kept below, verbatim in behaviour, as the baseline), EGRE batch 48, LoL batch 4 and 64.
- decode: images/s per core (PIL, torchvision) for JPEG 500x375 and PNG 512x512, and LoL's augmentation.

    python bench/train_loader.py [--quick] [--out bench/results]

Writes train_loader-cpu.json and .md. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from extract import decode_per_core, make_dataset
from train_io import training_cache

from stages.detectors import backbone, egre, egre_method, lol, lol_method
from stages.runs.batches import EpochBatches, make_inputs
from stages.runs.cachedata import CacheData

METHODS = {"egre": egre_method.METHOD, "lol": lol_method.METHOD}
HP = {"crop_size": 224, "mask_range": [0.6, 0.8], "aspect_range": [0.33, 3.0]}


# ---- the per-sample batch preparation this replaced (the baseline) -----------------------------------
def _old_mask_rect(height, width, r_mask, r_aspect, gen):
    area = height * width * r_mask
    h = max(1, min(height, round(math.sqrt(area * r_aspect))))
    w = max(1, min(width, round(area / h)))
    top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
    return top, left, h, w


def _old_draw_masks(n, height, width, gen, mask_range, aspect_range):
    out = torch.zeros(n, height, width, dtype=torch.bool)
    for i in range(n):
        u = torch.rand(2, generator=gen, dtype=torch.float64)
        r_mask = mask_range[0] + float(u[0]) * (mask_range[1] - mask_range[0])
        r_aspect = aspect_range[0] + float(u[1]) * (aspect_range[1] - aspect_range[0])
        top, left, h, w = _old_mask_rect(height, width, r_mask, r_aspect, gen)
        out[i, top : top + h, left : left + w] = True
    return out


def _old_augment(images, gen):
    flips = torch.rand(len(images), generator=gen) < 0.5
    turns = torch.randint(0, 4, (len(images),), generator=gen)
    out = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    return torch.stack([torch.rot90(x, int(k), dims=(1, 2)) for x, k in zip(out, turns, strict=True)])


def per_sample_inputs(method, hp, crops, maps, gen, aligned=True):
    """The training branch of the former `make_inputs`: a Python list of per-sample windows."""
    c, grid = hp["crop_size"], 8 if aligned else 1
    steps = (crops.shape[-1] - c) // grid + 1
    off = torch.randint(0, steps, (len(crops), 2), generator=gen) * grid
    images = torch.stack([x[:, t : t + c, s : s + c] for x, (t, s) in zip(crops, off.tolist(), strict=True)])
    if method == "egre":
        cc = c // 8
        maps = torch.stack(
            [
                m[:, t // 8 : t // 8 + cc, s // 8 : s // 8 + cc]
                for m, (t, s) in zip(maps, off.tolist(), strict=True)
            ]
        )
        return backbone.normalise(images, egre.IMAGENET_MEAN, egre.IMAGENET_STD), maps
    x = backbone.normalise(_old_augment(images, gen), lol.CLIP_MEAN, lol.CLIP_STD)
    masks = _old_draw_masks(len(x), c, c, gen, tuple(hp["mask_range"]), tuple(hp["aspect_range"]))
    return x.masked_fill(masks[:, None], 0.0), maps


# ---- measurements --------------------------------------------------------------------------------
def samples_per_s(fn, n: int, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return n * repeat / (time.perf_counter() - t0)


def prep_rates(repeat: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """samples/s of batched vs per-sample preparation (uint8 256 px crops + 32x32 maps already in memory)."""
    out = {}
    for method, bs in (("egre", 48), ("lol", 4), ("lol", 64)):
        crops = torch.randint(0, 256, (bs, 3, 256, 256), dtype=torch.uint8)
        maps = torch.randn(bs, 4, 32, 32)
        gen = torch.Generator().manual_seed(0)
        batched = partial(
            make_inputs, METHODS[method], HP, crops.to(device), maps.to(device), True, gen, True
        )
        row = {"batched": samples_per_s(batched, bs, repeat)}
        if device == "cpu":
            row["per_sample"] = samples_per_s(
                partial(per_sample_inputs, method, HP, crops, maps, gen), bs, repeat
            )
            row["ratio"] = row["batched"] / row["per_sample"]
        out[f"{method}_batch{bs}"] = row
    return out


def loader_rates(cache: str, workers: list[int], epochs: int) -> dict[str, dict[str, float]]:
    """samples/s of whole epochs (read + batch + prepare, EGRE batch 48, streamed) and of the in-memory load."""
    data = CacheData([cache])
    rows = data.rows("train")
    labels = torch.from_numpy(rows.label)
    out = {}
    for w in workers:
        t0 = time.perf_counter()
        EpochBatches(data, rows, labels, 48, 10**9, progress=False, workers=w)
        load = len(rows) / (time.perf_counter() - t0)
        stream = EpochBatches(data, rows, labels, 48, 96, progress=False, workers=w)
        t0 = time.perf_counter()
        for e in range(epochs):
            gen = torch.Generator().manual_seed(e)
            for _, crops, maps, _ in stream.epoch(gen):
                make_inputs(egre_method.METHOD, HP, crops, maps, True, gen, True)
        out[f"workers_{w}"] = {"epoch_samples_per_s": len(rows) * epochs / (time.perf_counter() - t0),
                               "in_memory_load_rows_per_s": load}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few rows and repeats: checks that it runs")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    per_class, repeat, epochs, images = (8, 1, 1, 4) if args.quick else (256, 10, 2, 64)
    tmp = Path(tempfile.mkdtemp(prefix="train-loader-"))
    cache = training_cache(tmp, {"train": per_class}, size=256, rows_per_shard=64)  # aligned 32x32 maps
    t0 = time.perf_counter()
    result = {
        "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "rows": 2 * per_class, "quick": args.quick,
        "loader": loader_rates(cache, [0, 2], epochs),
        "prep_samples_per_s": prep_rates(repeat),
        "decode_images_per_s_per_core": {
            name: decode_per_core(sorted(str(p) for p in make_dataset(tmp / name, images, (kind,)).rglob("*.*")), "cpu")
            for name, kind in (("jpeg_500x375", "nature"), ("png_512x512", "ai"))
        },
    }  # fmt: skip
    img = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    result["augment_images_per_s"] = {
        "batched": samples_per_s(lambda: lol.augment(img, gen), 64, repeat),
        "per_sample": samples_per_s(lambda: _old_augment(img, gen), 64, repeat),
    }
    lw = result["loader"]
    result["ratios"] = {
        "loader_epoch_2_vs_0_workers": lw["workers_2"]["epoch_samples_per_s"] / lw["workers_0"]["epoch_samples_per_s"],
        "in_memory_load_2_vs_0_workers": lw["workers_2"]["in_memory_load_rows_per_s"]
        / lw["workers_0"]["in_memory_load_rows_per_s"],
        **{f"prep_{k}_batched_vs_per_sample": v["ratio"] for k, v in result["prep_samples_per_s"].items()},
        "augment_batched_vs_per_sample": result["augment_images_per_s"]["batched"]
        / result["augment_images_per_s"]["per_sample"],
    }  # fmt: skip
    result["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_loader-cpu.json").write_text(json.dumps(result, indent=1))
    (out / "train_loader-cpu.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [f"# Training batches on the CPU ({r['cpu_count']} cores, torch {r['torch']}), {r['rows']} rows", "",
             "| measure | figure |", "|---|---|"]  # fmt: skip
    for w, v in r["loader"].items():
        lines.append(
            f"| loader epoch, EGRE batch 48, streamed, {w} | {v['epoch_samples_per_s']:.0f} samples/s |"
        )
        lines.append(f"| in-memory load, {w} | {v['in_memory_load_rows_per_s']:.0f} rows/s |")
    for k, v in r["prep_samples_per_s"].items():
        lines.append(
            f"| prep {k}: batched / per-sample | {v['batched']:.0f} / {v['per_sample']:.0f} samples/s |"
        )
    a = r["augment_images_per_s"]
    lines.append(
        f"| LoL flip+rotation, 64 x 224 px: batched / per-sample | {a['batched']:.0f} / {a['per_sample']:.0f} img/s |"
    )
    for kind, d in r["decode_images_per_s_per_core"].items():
        rates = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
        lines.append(f"| decode {kind}, one core | {rates} img/s |")
    lines += ["", "| ratio | x |", "|---|---|", *(f"| {k} | {v:.2f} |" for k, v in r["ratios"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
