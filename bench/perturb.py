"""Decode + perturb rate per CPU core for each perturbation family, side by side in one run.

What a decode worker does per row of a `--perturb` extraction (read the file's bytes, decode, perturb,
the pixel crop and the LaRE geometry), in one process with one torch thread, on GenImage-like files:
ImageNet-like JPEGs (500x375) and generated-like PNGs (512x512). The figure to compare is the GPU's
LaRE rate divided by the decode workers feeding it (BENCHMARKS.md).

    python bench/perturb.py [--images 40] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stages.features.params import LareParams, PixelParams
from stages.features.perturb import apply
from stages.features.perturb_spec import Perturbation
from stages.features.pixels import DEFAULT_MAX_PIXELS
from stages.features.recipe import RowRecipe
from stages.genimage.synthetic import encode_image, make_image

SPECS = {
    "clean": None,
    "jpeg": "jpeg:10-75",
    "blur (kernel)": "blur:3,5,7,9",
    "blur (sigma 3)": "blur:sigma=3",
    "noise": "noise:5-20",
    "crop": "crop:5-20",
    "resize": "resize:0.5",
    "LoL A7 chain": "noise:5-20+blur:3,5,7,9+jpeg:10-75+crop:5-20",
    "Frank combined": "frank:combined",
    "GenImage 112 px": "genimage:lowres=112",
    "AIGCDetect half": "aigcdetect:half",
    "AIGCDetect blur": "aigcdetect:blur=1",
}
FILES = {"jpeg 500x375": ("JPEG", 375, 500), "png 512x512": ("PNG", 512, 512)}


def rate(recipe: RowRecipe, files: list[bytes], spec: str | None) -> float:
    """Rows per second through decode -> perturb -> pixel crop, LaRE geometry and noise draw."""
    p = Perturbation.parse(spec) if spec else None
    t0 = time.perf_counter()
    for k, data in enumerate(files):
        rgb = recipe.decode(data)
        if p is not None:
            rgb = apply(p, rgb, f"id-{k}", 1)
        recipe.prepare(rgb, f"id-{k}")
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    params = {"timestep": 200, "ensemble": 4, "size": 256, "preprocess": "resize", "resample": "bicubic",
              "small_images": None, "prompt": "a photo", "prompt_template": None, "dtype": "float16",
              "precision": "fp32", "seed": 0, "max_pixels": DEFAULT_MAX_PIXELS, "perturb": None}  # fmt: skip
    recipe = RowRecipe.from_params(LareParams.from_record(params), (4, 32), PixelParams(256))
    results = {}
    for name, (fmt, h, w) in FILES.items():
        files = [encode_image(make_image(rng, h, w, generated=fmt == "PNG"), fmt) for _ in range(args.images)]
        rate(recipe, files[:4], None)  # warm-up
        results[name] = {family: round(rate(recipe, files, spec), 1) for family, spec in SPECS.items()}
        print(name, results[name])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "images": args.images,
            "threads": 1, "torch": torch.__version__, "specs": SPECS}  # fmt: skip
    (out / "perturb-cpu.json").write_text(
        json.dumps({"meta": meta, "rows_per_s_per_core": results}, indent=1)
    )
    lines = ["| family | SPEC | " + " | ".join(f"{n} rows/s/core" for n in FILES) + " |",
             "|---|---|" + "---|" * len(FILES)]  # fmt: skip
    for family, spec in SPECS.items():
        cells = " | ".join(f"{results[n][family]:.1f}" for n in FILES)
        lines.append(f"| {family} | `{spec or '-'}` | {cells} |")
    (out / "perturb-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
