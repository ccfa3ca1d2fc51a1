"""Every GPU figure of issue 14 in one run, about 8 minutes on an H100/H200; JSON after each measurement.

    python bench/gpu.py                          # CUDA, random-sd15 (`make bench-gpu`)
    python bench/gpu.py --quick --device cpu     # tiny model, a few images: checks that it runs

In order of priority (a measurement that would start after --budget-s is skipped and named so):
  1. decode per core: PIL, torchvision (CPU), imagecodecs if installed; nvjpeg on the GPU (JPEG)
  2. extraction 256 px, e = 4, to a finished cache: JPEG 500x375 at batch 32 (the last measured
     figure's setting), batch 64 / 128 / 256, and PNG 512x512 at the best batch
  3. training from a cache (`pipeline train`'s code): EGRE batch 48, LoL batch 4 and a large batch,
     samples/s and GPU busy fraction (against the model's compute-only rate on a resident batch, and
     NVML utilisation when pynvml is installed); streamed EGRE with 0 vs the default loader workers;
     evaluation and `pipeline detect` images/s
  4. the levers one by one at the best batch: torch.compile max-autotune without and with CUDA graphs
     (warm-up outside the timed loop), channels_last off, SDPA off (diffusers' classic attention),
     cuDNN benchmark mode, and whether benchmark mode changes bits between two processes
  5. 512 px e = 4, 256 px e = 1 and e = 8 at the best batch
Not levers here: fused GroupNorm+SiLU is what torch.compile does (4); overlapping H2D copies on a
second stream is not implemented in the extractor. Writes bench/results/gpu-<device>-<model>.json/.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from extract import decode_per_core, flops_per_image, make_dataset, sync
from train_io import training_cache

from pipeline.config import loader_workers
from stages.configs import READ_WORKERS, ExtractConfig
from stages.extract import ShardComputer, plan_extract, run_extract

RESULTS = Path(__file__).parent / "results"
RUN_NUMBER = itertools.count()
RN50_TRAIN_GFLOP = 12.3  # RN50 forward + backward per 224 px image (the issue's figure)
PEAK_TFLOPS = {"cuda": 989.0}  # H100/H200 dense bf16/fp16 (the issue's figure; BENCHMARKS.md once used 800)


class Bench:
    """Holds the result and the clock; `step` runs one measurement, records it or its error, and saves."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0 = args, time.perf_counter()
        cuda = args.device.startswith("cuda")
        self.result: dict = {
            "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "model": args.model, "cpu_count": os.cpu_count(), "quick": args.quick,
            "command": " ".join(sys.argv), "peak_tflops": PEAK_TFLOPS.get(args.device.split(":")[0]),
            "runs": [], "levers": [], "train": {}, "skipped": [], "errors": {},
        }  # fmt: skip
        tag = "cuda" if cuda else "cpu"
        self.stem = Path(args.out) / f"gpu-{tag}-{args.model}{'-quick' if args.quick else ''}"

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def step(self, name: str, fn, need_s: float = 0.0):
        if self.left() < need_s:
            self.result["skipped"].append(name)
            print(f"skipped (budget): {name}", flush=True)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # one failed lever must not cost the other figures
            self.result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            print(f"error in {name}: {e}", flush=True)
            out = None
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
        self.result["elapsed_s"] = time.perf_counter() - self.t0
        self.save()
        return out

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.result, indent=1, default=str))
        self.stem.with_suffix(".md").write_text(markdown(self.result))


# ---- extraction with levers ----------------------------------------------------------------------
def apply_levers(computer: ShardComputer, levers: dict) -> None:
    """Change the loaded model the way a lever would, after `sd.load_model` set the defaults."""
    lare = computer.lare
    if levers.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    if levers.get("channels_last") is False:
        lare.vae.to(memory_format=torch.contiguous_format)
        lare.unet.to(memory_format=torch.contiguous_format)
    if levers.get("sdpa") is False:
        from diffusers.models.attention_processor import AttnProcessor

        lare.unet.set_attn_processor(AttnProcessor())
        lare.vae.set_attn_processor(AttnProcessor())
    if levers.get("compile"):
        lare.unet = torch.compile(lare.unet, mode=levers["compile"], dynamic=False)
        lare.vae.encoder = torch.compile(lare.vae.encoder, mode=levers["compile"], dynamic=False)


def extract_run(args, data: Path, work: Path, size: int, ensemble: int, batch: int, levers: dict) -> dict:
    """images/s of a finished cache (steady state: no model load, no warm-up) and where the time went.

    The image count is a multiple of the batch and of the shard, so every batch has one shape: a
    compiled model never recompiles inside the timed loop.
    """
    tag = f"{next(RUN_NUMBER)}-{size}-{ensemble}-{batch}"  # a fresh cache per run: nothing is up to date
    cfg = ExtractConfig(
        data_root=str(data), subset="sdv14", cache_dir=str(work / f"cache-{tag}"), model=args.model,
        device=args.device, size=size, ensemble=ensemble, batch_size=batch, rows_per_shard=2 * batch,
        loader_workers=args.workers, progress=False,
    )  # fmt: skip
    job = plan_extract(cfg)
    computer = ShardComputer(job)
    try:
        apply_levers(computer, levers)
        computer.warmup()  # compiles, autotunes, initialises: outside the timings, for every variant alike
        if levers.get("compile"):
            computer.warmup()  # CUDA graphs record on a later call than the one that compiles
        res = run_extract(cfg, compute=lambda j, shards, on_rows: computer.run(shards, on_rows))
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    s, run_s = computer.stats, res.stats["run_s"]
    flops = counted_flops(args.model, size, ensemble, args.device) if args.flops else None
    ips = res.rows_done / run_s
    out = {
        "size": size, "ensemble": ensemble, "batch_size": batch, "compiled": bool(levers.get("compile")),
        "levers": levers, "format": data.name, "images": res.rows_done, "failed": res.failed,
        "ours_images_per_s": ips, "gpu_busy_fraction": (s["vae_s"] + s["unet_s"]) / run_s,
        "time_split_s": {k: s[k] for k in ("data_wait_s", "decode_s", "vae_s", "unet_s", "write_s", "write_wait_s")}
        | {"run_s": run_s}, "warmup_s": s.get("warmup_s", 0.0), "cache": str(Path(res.cache)),
        "artifact": res.artifacts["lare"],
    }  # fmt: skip
    if flops:
        per_image = flops["vae"] + flops["unet"]
        out |= {"flops_per_image": per_image, "achieved_tflops": per_image * ips / 1e12}
        if peak := PEAK_TFLOPS.get(args.device.split(":")[0]):
            out["pct_of_peak"] = 100 * per_image * ips / 1e12 / peak
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


@functools.cache
def counted_flops(model: str, size: int, ensemble: int, device: str) -> dict[str, float]:
    return flops_per_image(model, size, ensemble, device)


def read_maps(run: dict) -> np.ndarray:
    import zarr

    return zarr.open_group(run["cache"], mode="r")[run["artifact"]]["maps"][:]


def bits_between_processes(args, data: Path, work: Path, batch: int) -> dict:
    """Two processes per cuDNN mode extract the same images: are their maps bitwise equal?"""
    out = {}
    for mode in ("deterministic", "benchmark"):
        maps = []
        for k in range(2):
            path = work / f"bits-{mode}-{k}.npy"
            cmd = [sys.executable, __file__, "--child-maps", str(path), "--child-data", str(data),
                   "--device", args.device, "--model", args.model, "--batch", str(batch),
                   "--workers", str(args.workers), "--work", str(work / f"bits-{mode}-{k}")]  # fmt: skip
            cmd += ["--child-cudnn-benchmark"] if mode == "benchmark" else []
            cmd += ["--quick"] if args.quick else []
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            maps.append(np.load(path))
        diff = np.abs(maps[0].astype(np.float64) - maps[1].astype(np.float64))
        out[mode] = {"bitwise_equal": bool(np.array_equal(maps[0], maps[1], equal_nan=True)),
                     "max_abs_diff": float(np.nanmax(diff)), "rows": len(maps[0])}  # fmt: skip
    return out


# ---- training, evaluation, detection -------------------------------------------------------------
class Utilisation:
    """NVML's GPU utilisation (the fraction of time a kernel ran), sampled while a block runs."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.ok = device.startswith("cuda")
        if self.ok:
            try:
                torch.cuda.utilization()
            except Exception:  # pynvml missing: say so in the result
                self.ok = False

    def __enter__(self):
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.wait(0.1):
                self.samples.append(torch.cuda.utilization() / 100)

        self.thread = threading.Thread(target=sample, daemon=True)
        if self.ok:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.ok:
            self.thread.join()

    @property
    def mean(self) -> float | str:
        return (
            statistics.fmean(self.samples) if self.samples else "not measured (pynvml not installed / no GPU)"
        )


def train_rate(args, cache: str, work: Path, method: str, batch: int, epochs: int, **kw) -> dict:
    """samples/s of `run_train` epochs after the first (which holds cuDNN's and the allocator's warm-up)."""
    from stages.configs import TrainConfig
    from stages.train import run_train

    cfg = TrainConfig(
        caches=[cache], method=method, out=str(work / "runs"), epochs=epochs, batch_size=batch,
        backbone=args.backbone, backbone_weights="random", crop_size=args.crop, progress=False, device=args.device,
        **kw,
    )  # fmt: skip
    with Utilisation(args.device) as util:
        run = run_train(cfg)
    infos = [json.loads((run / f"epoch-{e:03d}.json").read_text()) for e in range(1, epochs + 1)]
    steady = infos[1:] or infos
    rate = sum(i["rows"] for i in steady) / sum(i["seconds"] for i in steady)
    return {"samples_per_s": rate, "rows": infos[0]["rows"], "epochs_timed": len(steady), "batch_size": batch,
            "nvml_utilisation": util.mean, "run": str(run), **kw}  # fmt: skip


def compute_only(args, method: str, batch: int, steps: int) -> float:
    """samples/s of forward + backward + Adam on one batch resident on the device: the model's own rate."""
    from stages.detectors import method as method_registry
    from stages.runs.batches import make_inputs
    from stages.runs.checkpoint import build_model

    params = {"backbone": {"arch": args.backbone, "spec_weights": "random"}, "seed": 0, "method": method,
              "hparams": {"crop_size": args.crop, "mask_range": [0.6, 0.8], "aspect_range": [0.33, 3.0]}}  # fmt: skip
    params["model"] = method_registry.get(method).model_args(params["hparams"], 4)
    cuda = args.device.startswith("cuda")
    model = build_model(params).to(args.device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    crops = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=args.device)
    maps = torch.randn(batch, 4, 32, 32, device=args.device)
    x, m = make_inputs(
        method_registry.get(method),
        params["hparams"],
        crops,
        maps,
        True,
        torch.Generator().manual_seed(0),
        False,
    )
    y = torch.randint(0, 2, (batch,), device=args.device)

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=cuda):
            loss = model.loss(model(x, m), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(args.device)
    return batch * steps / (time.perf_counter() - t0)


def training(bench: Bench, work: Path) -> None:
    args, t = bench.args, bench.result["train"]
    n = args.train_rows
    cache = bench.step(
        "train: cache",
        lambda: training_cache(work / "train", {"train": n // 2, "val": n // 8}, model=args.model, device=args.device,
                               size=args.size, rows_per_shard=max(64, n // 8), batch_size=32),
    )  # fmt: skip
    if cache is None:
        return
    t["rn50_train_gflop_per_image"] = RN50_TRAIN_GFLOP if args.backbone == "RN50" else None

    def run(key: str, method: str, batch: int, epochs: int, **kw) -> None:
        def go():
            r = train_rate(args, cache, work, method, batch, epochs, **kw)
            r["compute_only_samples_per_s"] = compute_only(args, method, batch, args.steps)
            r["gpu_busy_fraction_vs_compute_only"] = r["samples_per_s"] / r["compute_only_samples_per_s"]
            t[key] = r
            return r

        bench.step(f"train: {key}", go, need_s=20)

    run("egre_batch48", "egre", 48, args.epochs)
    run("lol_batch4", "lol", 4, 2, max_per_class=args.lol_rows)
    run(f"lol_batch{args.large_batch}", "lol", args.large_batch, args.epochs)
    for w in sorted({0, loader_workers(args.workers, args.device, READ_WORKERS)}):
        run(f"egre_batch48_streamed_workers{w}", "egre", 48, 2, memory_rows=max(48, n // 4), loader_workers=w)
    for key, name in (("egre_samples_per_s", "egre_batch48"), ("lol_samples_per_s", "lol_batch4")):
        if name in t:
            t[key] = t[name]["samples_per_s"]
    if f"lol_batch{args.large_batch}" in t:
        t["lol_large_batch_samples_per_s"] = t[f"lol_batch{args.large_batch}"]["samples_per_s"]
    if "egre_batch48" not in t:
        return
    egre_run = t["egre_batch48"]["run"]

    def evaluation() -> None:
        from stages.configs import EvalConfig
        from stages.evaluate import run_eval

        t0 = time.perf_counter()
        ecfg = EvalConfig(
            egre_run, [cache], work / "eval", batch_size=256, device=args.device, progress=False
        )
        res = run_eval(ecfg)
        t["eval_images_per_s"] = res[0]["metrics"]["n"] / (time.perf_counter() - t0)

    def detection() -> None:
        from stages.configs import DetectConfig
        from stages.detect import run_detect

        folder = next((work / "train" / "data").rglob("val"))
        t0 = time.perf_counter()
        dcfg = DetectConfig(
            folder, egre_run, work / "detect.csv", batch_size=64, device=args.device, progress=False
        )
        scored, _ = run_detect(dcfg)
        t["detect_images_per_s"] = scored / (time.perf_counter() - t0)
        t["detect_note"] = (
            "wall time of `pipeline detect` on the val folder, loading the run and the LaRE model included"
        )

    bench.step("eval", evaluation, need_s=10)
    bench.step("detect", detection, need_s=20)


# ---- the run -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="default: random-sd15 (tiny with --quick)")
    ap.add_argument(
        "--quick", action="store_true", help="tiny model and backbone, a few images, every section"
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this")
    ap.add_argument("--images", type=int, default=None, help="images per extraction run (default 1024)")
    ap.add_argument("--workers", type=int, default=-1, help="decode / loader workers (-1: the defaults)")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["compile", "bits"], help="leave out these parts"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--child-maps", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-cudnn-benchmark", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    q = args.quick
    args.model = args.model or ("tiny" if q else "random-sd15")
    args.images = args.images or (8 if q else 1024)
    args.backbone, args.crop = ("tiny-RN", 32) if q else ("RN50", 224)
    args.train_rows, args.epochs, args.steps = (16, 2, 2) if q else (1536, 3, 20)
    args.lol_rows, args.large_batch = (4, 8) if q else (128, 128)
    args.flops = True
    batches = [8] if q else [64, 128, 256]
    first_batch = 4 if q else 32
    args.size = 64 if q else 256  # the headline size; 512 px stands for "twice the side" (128 in quick mode)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))

    if args.child_maps:  # one extraction for bits_between_processes
        levers = {"cudnn_benchmark": True} if args.child_cudnn_benchmark else {}
        args.flops = False
        run = extract_run(args, Path(args.child_data), work, args.size, 4, args.batch, levers)
        np.save(args.child_maps, read_maps(run))
        return

    bench = Bench(args)
    r = bench.result
    from stages.features import sd

    bench.step("model", lambda: sd.resolve_model(args.model))  # random weights built once, outside timings
    jpeg = bench.step("data: jpeg", lambda: make_dataset(work / "jpeg_500x375", args.images, ("nature",)))
    png = bench.step("data: png", lambda: make_dataset(work / "png_512x512", args.images, ("ai",)))
    files = {k: sorted(str(p) for p in d.rglob("*.*"))[:256] for k, d in (("jpeg", jpeg), ("png", png)) if d}
    r["decode_images_per_s_per_core"] = {}
    for k, f in files.items():
        bench.step(
            f"decode {k}",
            lambda k=k, f=f: r["decode_images_per_s_per_core"].update({k: decode_per_core(f, args.device)}),
        )

    def extraction(name, data, size=None, e=4, batch=None, levers=None, into="runs", need=15):
        def go():
            out = extract_run(args, data, work, size or args.size, e, batch or best(), levers or {})
            r[into].append({"name": name, **out})
            print(json.dumps({k: v for k, v in out.items() if k != "time_split_s"}), flush=True)
            return out

        return bench.step(f"extract: {name}", go, need_s=need)

    def best() -> int:
        sweep = [x for x in r["runs"] if x["name"].startswith("jpeg batch")]
        return max(sweep, key=lambda x: x["ours_images_per_s"])["batch_size"] if sweep else batches[0]

    extraction(f"jpeg batch {first_batch}", jpeg, batch=first_batch)
    for b in batches:
        extraction(f"jpeg batch {b}", jpeg, batch=b)
    extraction("png", png)
    training(bench, work)
    if "compile" not in args.skip:
        mode = "default" if q else "max-autotune"
        extraction("compile max-autotune-no-cudagraphs", jpeg, levers={"compile": mode if q else f"{mode}-no-cudagraphs"},
                   into="levers", need=150)  # fmt: skip
        extraction(
            "compile max-autotune (CUDA graphs)", jpeg, levers={"compile": mode}, into="levers", need=150
        )
    extraction("channels_last off", jpeg, levers={"channels_last": False}, into="levers")
    extraction("SDPA off (classic attention)", jpeg, levers={"sdpa": False}, into="levers")
    extraction("cudnn benchmark", jpeg, levers={"cudnn_benchmark": True}, into="levers")
    if "bits" not in args.skip:
        bits = bench.step(
            "bits between processes", lambda: bits_between_processes(args, jpeg, work, best()), need_s=60
        )
        r["cudnn_bits_between_processes"] = bits
    extraction("jpeg 512 px e=4", jpeg, size=2 * args.size)
    extraction("jpeg 256 px e=1", jpeg, e=1)
    extraction("jpeg 256 px e=8", jpeg, e=8)
    bench.result["elapsed_s"] = time.perf_counter() - bench.t0
    bench.save()
    print(markdown(r))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}; model {r['model']}; torch {r['torch']}; {r['cpu_count']} host cores",
             f"Command: `{r['command']}`", "",
             "| run | size | e | batch | compiled | img/s | GPU busy | TFLOP/s | % of peak | wait / vae / unet / write (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in r["runs"] + r["levers"]:
        s = e["time_split_s"]
        pct = f"{e['pct_of_peak']:.1f}" if "pct_of_peak" in e else "n/a"
        tf = f"{e['achieved_tflops']:.1f}" if "achieved_tflops" in e else "n/a"
        lines.append(
            f"| {e['name']} | {e['size']} | {e['ensemble']} | {e['batch_size']} | {e['compiled']} | "
            f"{e['ours_images_per_s']:.1f} | {e['gpu_busy_fraction']:.2f} | {tf} | {pct} | "
            f"{s['data_wait_s']:.2f} / {s['vae_s']:.2f} / {s['unet_s']:.2f} / {s['write_s']:.2f} |"
        )
    for kind, d in r.get("decode_images_per_s_per_core", {}).items():
        rates = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in d.items())
        lines.append(f"\nDecode {kind}, one core: {rates} img/s")
    t = r["train"]
    for k, v in t.items():
        if isinstance(v, dict):
            lines.append(
                f"\nTrain {k}: {v['samples_per_s']:.0f} samples/s; compute-only {v['compute_only_samples_per_s']:.0f}; "
                f"busy {v['gpu_busy_fraction_vs_compute_only']:.2f}; NVML {v['nvml_utilisation']}"
            )
    for k in ("eval_images_per_s", "detect_images_per_s"):
        if k in t:
            lines.append(f"\n{k}: {t[k]:.1f}")
    if "cudnn_bits_between_processes" in r and r["cudnn_bits_between_processes"]:
        lines.append(f"\ncuDNN bits between two processes: {json.dumps(r['cudnn_bits_between_processes'])}")
    for k in ("skipped", "errors"):
        if r[k]:
            lines.append(f"\n{k}: {json.dumps(r[k])}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
