"""How far maps move between devices and precisions, on the same images (not a test; writes figures).

    python bench/device_agreement.py --model tiny --devices cpu cuda --precisions fp32 fp16 bf16

For every (device, precision) the maps of the same images are compared with the CPU fp32 ones:
the largest and the mean absolute difference, relative to each map's maximum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr

from stages.configs import ExtractConfig
from stages.extract import run_extract
from stages.genimage.synthetic import make_genimage

RESULTS = Path(__file__).parent / "results"


def maps(data: Path, work: Path, model: str, device: str, precision: str, batch: int) -> np.ndarray:
    cfg = ExtractConfig(data_root=str(data), subset="sdv14", cache_dir=str(work / f"{device}-{precision}"),
                        model=model, device=device, precision=precision, dtype="float32", batch_size=batch,
                        pixels=False, progress=False)  # fmt: skip
    res = run_extract(cfg)
    return zarr.open_group(f"{res.cache}", mode="r")[res.artifacts["lare"]]["maps"][:].astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--devices", nargs="+", default=["cpu"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--images-per-class", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agreement-"))
    data = work / "data"
    make_genimage(data, "sdv14", {"val": args.images_per_class}, seed=7)
    ref = maps(data, work, args.model, "cpu", "fp32", args.batch_size)
    scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
    out = {"model": args.model, "images": int(ref.shape[0]), "vs": "cpu fp32", "results": {}}
    for device in args.devices:
        for precision in args.precisions:
            if (device, precision) == ("cpu", "fp32"):
                continue
            rel = np.abs(maps(data, work, args.model, device, precision, args.batch_size) - ref) / scale
            out["results"][f"{device} {precision}"] = {
                "max_rel": float(rel.max()),
                "mean_rel": float(rel.mean()),
            }
            print(device, precision, out["results"][f"{device} {precision}"], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "-".join(sorted(set(args.devices)))
    (RESULTS / f"agreement-{name}-{args.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
