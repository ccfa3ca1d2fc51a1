"""Training on several processes (torchrun): samples/s of EGRE and LoL at 1, 2, ... ranks, side by side
in one run, on the same cache. On the CPU (the default) each rank has one thread (OMP_NUM_THREADS=1),
so 2 ranks use 2 cores; on GPUs (`--device cuda --ranks 1 2 4 8 --backbone RN50`) one GPU per rank.

Each run is `torchrun --nproc-per-node N -m pipeline train ...` as the README types it, with the
method's global batch (EGRE 48, LoL 4; `--batch-size` to change it); samples/s is an epoch's training
rows over its seconds (epoch-NNN.json: training and the small validation slice), the last of
`--epochs`, so that start-up and the first epoch's warm-up are left out.

    python bench/ddp.py [--ranks 1 2] [--per-class 192] [--device cpu] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.configs import ExtractConfig
from stages.extract import run_extract
from stages.genimage.synthetic import make_genimage

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache(tmp: Path, per_class: int, pixel_size: int) -> str:
    """A synthetic sdv14 training set extracted with the tiny SD model (maps aligned with the crops)."""
    make_genimage(tmp / "data", "sdv14", {"train": per_class}, seed=0)
    cfg = ExtractConfig(
        data_root=str(tmp / "data"), subset="sdv14", cache_dir=str(tmp / "cache"), model="tiny",
        device="cpu", splits=("train",), size=pixel_size, pixel_size=pixel_size, preprocess="crop",
        rows_per_shard=64, progress=False,
    )  # fmt: skip
    return run_extract(cfg).cache


def train(url: str, out: Path, method: str, ranks: int, args) -> dict:
    """One torchrun training; its last epoch's rate."""
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    cmd = [
        TORCHRUN, "--nproc-per-node", str(ranks), "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m",
        "pipeline", "train", "--from-cache", url, "--method", method, "--out", str(out), "--epochs",
        str(args.epochs), "--backbone", args.backbone, "--backbone-weights", "random", "--crop-size",
        str(args.crop_size), "--max-per-class", "all", "--device", args.device, "--no-progress", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    record = json.loads((run / f"epoch-{args.epochs:03d}.json").read_text())
    params = json.loads((run / "params.json").read_text())
    return {
        "method": method, "ranks": ranks, "rows": record["rows"], "epoch_seconds": record["seconds"],
        "samples_per_s": round(record["rows"] / record["seconds"], 1),
        "batch_size": params["hparams"]["batch_size"], "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    ranks = sorted({r["ranks"] for r in rows})
    lines = [
        "| method | global batch | " + " | ".join(f"{n} rank(s), samples/s" for n in ranks) + " | speed-up |",
        "|---|---|" + "---|" * len(ranks) + "---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["ranks"]: r for r in rows if r["method"] == method}
        rates = [mine[n]["samples_per_s"] for n in ranks]
        speed = f"{rates[-1] / rates[0]:.2f}x" if len(rates) > 1 else ""
        batch = mine[ranks[0]]["batch_size"]
        lines.append(f"| {method} | {batch} | " + " | ".join(f"{x:.1f}" for x in rates) + f" | {speed} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=["egre", "lol"])
    ap.add_argument("--per-class", type=int, default=192)
    ap.add_argument("--pixel-size", type=int, default=64)
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--backbone", default="tiny-RN")
    ap.add_argument("--batch-size", type=int, default=None, help="the global batch (default: the method's)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a few rows, one epoch (tests)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.quick:
        args.per_class, args.epochs = 24, 1
    tmp = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    url = cache(tmp, args.per_class, args.pixel_size)
    rows = [train(url, tmp / f"{method}-{n}", method, n, args) for method in args.methods for n in args.ranks]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ddp-{args.device.split(':')[0]}{'-quick' if args.quick else ''}"
    result = {
        "rows": rows, "args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads_per_rank": args.threads,
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    note = (
        f"`{' '.join(['python bench/ddp.py', *sys.argv[1:]])}`: {args.per_class * 2} training rows, "
        f"{args.backbone} at {args.crop_size} px, {args.threads} thread(s) per rank, {args.device}, "
        f"{os.cpu_count()} CPUs; samples/s of epoch {args.epochs} (training + validation slice).\n\n"
    )
    stem.with_suffix(".md").write_text(note + table(rows) + "\n")
    print(note + table(rows))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
