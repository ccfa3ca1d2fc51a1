"""Small-set learning: held-out AP and ACC of EGRE and LoL (tiny backbones, CPU) trained on a few
dozen images per class, for two synthetic artifacts, with true and with uninformative labels.

This is a newcomer's first run: a few hundred images, a validation slice of a row or two per class.
The figures of another version of the code come from the same script and the same caches:

    python bench/small_set.py --out bench/results                        # builds the caches, trains
    PYTHONPATH=/path/to/old/checkout python bench/small_set.py --caches /tmp/small-set --label before

Sets (GenImage layout, images deleted after extraction, the val split is the held-out test):
  upsample  24 train + 16 val images per class, generated = made at 1/4 resolution and upsampled
  grid      50 train + 25 val images per class, generated = faint lines every 8 px
Training: tiny-RN, random init, 32 px crops, batch 16, lr 1e-3, 30 epochs, the default model selection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stages.configs import EvalConfig, TrainConfig
from stages.evaluate import run_eval
from stages.train import run_train

SETS = {"upsample": ({"train": 24, "val": 16}, 3), "grid": ({"train": 50, "val": 25}, 7)}


def build(root: Path) -> None:
    """Extract each set into root/<artifact>/cache/sdv14.zarr (64 px, tiny SD model), then delete the images."""
    from stages.configs import ExtractConfig
    from stages.extract import run_extract
    from stages.genimage.synthetic import make_genimage

    for artifact, (per_class, seed) in SETS.items():
        data = root / artifact / "data"
        make_genimage(data, "sdv14", per_class, seed=seed, artifact=artifact)
        cfg = ExtractConfig(
            data_root=str(data), subset="sdv14", cache_dir=str(root / artifact / "cache"), model="tiny",
            device="cpu", size=64, pixel_size=64, preprocess="crop", rows_per_shard=64, progress=False,
        )  # fmt: skip
        run_extract(cfg)
        shutil.rmtree(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--caches", help="Folder of the caches: built there when missing (default: a temp folder)."
    )
    ap.add_argument("--label", default="current", help="Names this code version in the output file.")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument(
        "--quick", action="store_true", help="2 epochs, EGRE on the upsample set only (a smoke test)."
    )
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.caches) if args.caches else Path(tempfile.mkdtemp(prefix="small-set-"))
    if not (root / "upsample" / "cache").is_dir():
        build(root)
    epochs = 2 if args.quick else args.epochs
    sets = ["upsample"] if args.quick else list(SETS)
    methods = ["egre"] if args.quick else ["egre", "lol"]
    rows = []
    for artifact in sets:
        cache = str(root / artifact / "cache" / "sdv14.zarr")
        for method in methods:
            for shuffled in (False, True):
                out = Path(tempfile.mkdtemp(prefix="small-set-runs-"))
                t0 = time.perf_counter()
                cfg = TrainConfig(
                    caches=[cache], method=method, out=str(out / "runs"), epochs=epochs, batch_size=16,
                    lr=1e-3, crop_size=32, backbone="tiny-RN", backbone_weights="random",
                    shuffle_labels=shuffled, progress=False,
                )  # fmt: skip
                run = run_train(cfg)
                (result,) = run_eval(EvalConfig(run, [cache], out / "results", progress=False))
                done = json.loads((run / "done.json").read_text())
                m = result["metrics"]
                rows.append({
                    "artifact": artifact, "method": method, "labels": "uninformative" if shuffled else "true",
                    "ap": round(m["ap"], 4), "acc": round(m["acc"], 4), "n": m["n"],
                    "epochs_trained": done["epochs"], "epoch_scored": done.get("best", done["epochs"]),
                    "selection": done.get("selection", {}).get("by", "validation AUC"),
                    "seconds": round(time.perf_counter() - t0, 1),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"small_set-{args.label}{'-quick' if args.quick else ''}"
    (Path(args.out) / f"{name}.json").write_text(json.dumps({"label": args.label, "rows": rows}, indent=1))
    lines = [
        f"| set | method | labels | held-out AP | ACC | epochs | scored epoch | selection |  ({args.label})",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['artifact']} | {r['method']} | {r['labels']} | {r['ap']:.3f} | {r['acc']:.3f} | "
        f"{r['epochs_trained']} | {r['epoch_scored']} | {r['selection']} |"
        for r in rows
    ]
    (Path(args.out) / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"caches kept in {root}")


if __name__ == "__main__":
    main()
