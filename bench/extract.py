"""Extraction benchmark: our extractor vs a reference-style loop, on the same model, in the same run.

The reference style is the LaRE authors' `extract_lare.py` as docs/REFERENCE_NOTES.md describes it: fp32,
one image per call (its ensemble in one UNet call), an unseeded posterior sample, one `torch.save`
file per image. Ours is `pipeline extract` (batched, decode workers, seeded per image, Zarr shards).

Also measured: FLOPs per image (counted by torch's FlopCounterMode on the model itself), achieved
TFLOP/s and its share of a stated peak, where the time goes (decode / VAE / UNet / write), decode-
only throughput for JPEG and PNG inputs, and a DIRE-style cost (40 pixel-space UNet passes of an
ADM-256-like model per image) for the "8x cheaper than DIRE" claim.

    python bench/extract.py                                    # CPU, tiny model
    python bench/extract.py --device cuda --model random-sd15 --sizes 256 512 --ensembles 1 4 8 \
        --images 2048 --reference-images 128 --dire adm256

Writes bench/results/extract-<device>-<model>.json and .md. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import loader_workers
from stages.configs import DECODE_WORKERS, ExtractConfig
from stages.extract import RowDataset, run_extract
from stages.features import lare as lare_math
from stages.features import sd
from stages.genimage.index import SUBSETS
from stages.genimage.synthetic import encode_image, make_image

RESULTS = Path(__file__).parent / "results"
# GenImage-like inputs: ImageNet real images are JPEGs around 500x375, SD v1 outputs 512x512 PNGs
KINDS = {"nature": ((375, 500), "JPEG"), "ai": ((512, 512), "PNG")}
PEAK_TFLOPS = {"cuda": 800.0}  # H100/H200 dense bf16, as the issue states; no CPU ceiling is claimed


def _write_one(args):
    path, label, seed = args
    (h, w), fmt = KINDS[label]
    rgb = make_image(np.random.default_rng(seed), h, w, generated=label == "ai")
    Path(path).write_bytes(encode_image(rgb, fmt))


def make_dataset(root: Path, n: int, kinds: tuple[str, ...] = ("nature", "ai")) -> Path:
    """n GenImage-like files in val/: alternately of each kind (nature: JPEG 500x375, ai: PNG 512x512)."""
    archive, top = SUBSETS["sdv14"]
    base = root / top / archive
    jobs = []
    for k in range(n):
        label = kinds[k % len(kinds)]
        ext = ".png" if label == "ai" else ".JPEG"
        folder = base / "val" / label
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{k:06d}{ext}"), label, k))
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        list(pool.map(_write_one, jobs, chunksize=16))
    return root


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(model_spec: str, size: int, ensemble: int, device: str) -> dict[str, float]:
    """FLOPs of one image's VAE encoding and its one UNet call (batch = ensemble), counted, not assumed."""
    ref = sd.resolve_model(model_spec)
    model = sd.load_model(ref, device, torch.float32)
    comp = lare_math.LaRE(model, model.encode_prompts(["a photo"]), 200, torch.float32)
    channels, side = sd.latent_geometry(ref, size)
    images = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    noise = torch.zeros(1, 1 + ensemble, channels, side, side)
    with FlopCounterMode(display=False) as vae_count:
        z0 = comp.encode(images, noise[:, 0])
    with FlopCounterMode(display=False) as unet_count:
        comp.error(z0, noise[:, 1:], torch.zeros(1, dtype=torch.long))
    del model, comp
    return {"vae": vae_count.get_total_flops(), "unet": unet_count.get_total_flops()}


def reference_loop(
    model_spec: str, files: list[str], size: int, ensemble: int, device: str, out: Path
) -> float:
    """images/s of the reference's way: fp32, one image per call, one .pt file per image."""
    model = sd.load_model(sd.resolve_model(model_spec), device, torch.float32)
    emb = model.encode_prompts(["a photo"])
    sf = model.vae.config.scaling_factor
    out.mkdir(parents=True, exist_ok=True)

    def one(path: str) -> None:
        img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        x = (
            torch.from_numpy(np.asarray(img).copy())
            .permute(2, 0, 1)[None]
            .float()
            .div(127.5)
            .sub(1)
            .to(device)
        )
        with torch.no_grad():
            z = model.vae.encode(x).latent_dist.sample() * sf
            z = z.repeat(ensemble, 1, 1, 1)
            noise = torch.randn_like(z)
            t = torch.full((ensemble,), 200, device=device, dtype=torch.long)
            zt = model.scheduler.add_noise(z, noise, t)
            pred = model.unet(zt, t, encoder_hidden_states=emb.repeat(ensemble, 1, 1)).sample
            lare = ((pred - noise) ** 2).mean(0)
        torch.save(lare.cpu(), out / (Path(path).stem + ".pt"))

    one(files[0])  # warm-up (cuDNN autotuning, lazy init)
    sync(device)
    t0 = time.perf_counter()
    for path in files:
        one(path)
    sync(device)
    return len(files) / (time.perf_counter() - t0)


def decode_only(files: list[str], size: int, workers: int) -> float:
    """images/s of the decode workers alone (read, decode, resize, crop, noise draws), no model."""
    cfg = ExtractConfig(data_root="", subset="sdv14", size=size)
    ids = np.array([f"id{k}" for k in range(len(files))], dtype=object)
    ds = RowDataset(files, ids, np.zeros(len(files), dtype=np.int64), cfg, (4, size // 8))
    batches = [list(range(a, min(a + 32, len(files)))) for a in range(0, len(files), 32)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=4 if workers else None)  # fmt: skip
    t0 = time.perf_counter()
    n = sum(len(b["row"]) for b in loader)
    return n / (time.perf_counter() - t0)


def decode_per_core(files: list[str], device: str, batch: int = 64) -> dict[str, float | str]:
    """images/s of decoding to RGB on ONE core (this process, one thread), per decoder; and with nvjpeg
    on the GPU (JPEG only) when `device` is CUDA. Decoders not installed are named, not measured."""
    import torchvision.io as tvio

    blobs = [Path(f).read_bytes() for f in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[str, float | str] = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        out[name] = len(blobs) / (time.perf_counter() - t0)

    try:
        timed("pil", lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        timed("torchvision_cpu", lambda: [tvio.decode_image(t, mode=tvio.ImageReadMode.RGB) for t in tensors])
        try:
            import imagecodecs

            timed("imagecodecs", lambda: [imagecodecs.imread(b) for b in blobs])
        except ImportError:
            out["imagecodecs"] = "not installed"
        if device.startswith("cuda") and all(b[:2] == b"\xff\xd8" for b in blobs):
            tvio.decode_jpeg(tensors[:batch], device=device)  # nvjpeg initialisation, outside the timing
            sync(device)

            def gpu() -> None:
                for a in range(0, len(tensors), batch):
                    tvio.decode_jpeg(tensors[a : a + batch], device=device, mode=tvio.ImageReadMode.RGB)
                sync(device)

            timed("nvjpeg_cuda_batched", gpu)  # the GPU's rate, with one host thread feeding it
    finally:
        torch.set_num_threads(threads)
    return out


def dire_estimate(arch: str, device: str, precision: str, batch: int, images: int) -> dict[str, float]:
    """Seconds per image of 40 passes (20 DDIM inversion + 20 reconstruction) of a pixel-space UNet.

    `adm256` approximates guided-diffusion's 256x256 unconditional model (256 channels, mults
    1,1,2,2,4,4, 2 res blocks, attention at 32/16/8, 64-channel heads) with diffusers' UNet2DModel.
    """
    from diffusers import UNet2DModel

    cfgs = {
        "adm256": dict(sample_size=256, block_out_channels=(256, 256, 512, 512, 1024, 1024), layers_per_block=2,
                       down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
                       up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3, attention_head_dim=64,
                       out_channels=6),
        "tiny": dict(sample_size=64, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, out_channels=6),
    }  # fmt: skip
    cfg = cfgs[arch]
    dtype = lare_math.PRECISIONS[precision]
    torch.manual_seed(0)
    unet = UNet2DModel(**cfg).to(device, dtype).eval()
    if device.startswith("cuda"):
        unet = unet.to(memory_format=torch.channels_last)
    side = cfg["sample_size"]
    x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as count:
        unet(x[:1], t[:1])
    with torch.inference_mode():
        unet(x, t)
        sync(device)
        passes = max(1, images // batch) * 40
        t0 = time.perf_counter()
        for _ in range(passes):
            unet(x, t)
        sync(device)
    seconds = time.perf_counter() - t0
    return {
        "seconds_per_image": seconds / (passes / 40 * batch),
        "flops_per_image": 40 * count.get_total_flops(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (CPU) or random-sd15 (full SD v1.5 architecture)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--reference-images", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--ensembles", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compare-precisions", nargs="*", default=[], help="also run these at 256 px, e=4")
    ap.add_argument("--workers", type=int, default=-1, help="decode workers (-1: the extractor's default)")
    ap.add_argument("--rows-per-shard", type=int, default=512)
    ap.add_argument("--dire", default=None, help="adm256 or tiny: also time a DIRE-style 40-pass model")
    ap.add_argument("--compile", action="store_true", help="torch.compile in our extractor")
    ap.add_argument("--compile-both", action="store_true", help="run each config without and with compile")
    ap.add_argument("--configs", nargs="*", default=None, help="explicit SIZE:E pairs instead of the sweep")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-extract-"))
    workers = loader_workers(args.workers, args.device, DECODE_WORKERS)
    t0 = time.perf_counter()
    data = make_dataset(work / "data", args.images)
    files = sorted(str(p) for p in (data).rglob("*") if p.is_file())
    print(f"dataset: {len(files)} images in {time.perf_counter() - t0:.1f} s", flush=True)
    sd.resolve_model(args.model)  # build random weights once, outside the timings

    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "model": args.model, "images": len(files), "batch_size": args.batch_size,
        "decode_workers": workers, "cpu_count": os.cpu_count(), "runs": [], "precision_agreement": {},
        "compiled": args.compile,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"extract-{'cuda' if args.device.startswith('cuda') else 'cpu'}-{args.model}{args.tag}"

    def save() -> None:  # after every measurement: a run cut short still leaves its figures
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        stem.with_suffix(".md").write_text(markdown(result))

    jpeg = [f for f in files if f.endswith(".JPEG")]
    png = [f for f in files if f.endswith(".png")]
    result["decode_only_images_per_s"] = {
        "jpeg_500x375": decode_only(jpeg, 256, workers), "png_512x512": decode_only(png, 256, workers),
    }  # fmt: skip
    print("decode only:", result["decode_only_images_per_s"], flush=True)

    def ours(
        size: int, ensemble: int, precision: str, tag: str, dtype: str = "float16", compile=args.compile
    ):
        cache = work / f"cache-{tag}"
        cfg = ExtractConfig(
            data_root=str(data), subset="sdv14", cache_dir=str(cache), model=args.model, device=args.device,
            size=size, ensemble=ensemble, precision=precision, batch_size=args.batch_size, dtype=dtype,
            rows_per_shard=args.rows_per_shard, loader_workers=workers, compile=compile, progress=False,
        )  # fmt: skip
        res = run_extract(cfg)
        out = {"images_per_s": res.rows_done / res.stats["run_s"], "wall_s": res.seconds, "failed": res.failed,
               **res.stats}  # fmt: skip
        out["cache"] = str(cache / "sdv14.zarr")
        out["artifact"] = res.artifacts["lare"]
        return out

    ref_files = files[: args.reference_images]
    configs = [tuple(map(int, c.split(":"))) for c in args.configs] if args.configs else [
        (size, e) for size in args.sizes for e in args.ensembles]  # fmt: skip
    variants = [False, True] if args.compile_both else [args.compile]
    for size, ensemble in configs:
        flops = flops_per_image(args.model, size, ensemble, args.device)
        ref_ips = reference_loop(args.model, ref_files, size, ensemble, args.device, work / "ref-pt")
        shutil.rmtree(work / "ref-pt", ignore_errors=True)
        for compiled in variants:
            run = ours(size, ensemble, args.precision, f"{size}-{ensemble}-{compiled}", compile=compiled)
            per_image = flops["vae"] + flops["unet"]
            tflops = per_image * run["images_per_s"] / 1e12
            entry = {
                "size": size, "ensemble": ensemble, "compiled": compiled, "failed": run["failed"],
                "flops_per_image": per_image, "vae_flops": flops["vae"],
                "unet_flops": flops["unet"], "ours_images_per_s": run["images_per_s"],
                "reference_images_per_s": ref_ips, "speedup_vs_reference": run["images_per_s"] / ref_ips,
                "achieved_tflops": tflops, "pct_of_peak": 100 * tflops / PEAK_TFLOPS[args.device]
                if args.device in PEAK_TFLOPS else None,
                "time_split_s": {k: run[k] for k in ("data_wait_s", "decode_s", "vae_s", "unet_s", "write_s",
                                                    "write_wait_s", "run_s")},
                "warmup_s": run.get("warmup_s", 0.0),
            }  # fmt: skip
            result["runs"].append(entry)
            save()
            print(json.dumps(entry), flush=True)
            if size == 256 and ensemble == 4:
                headline = run

    if args.compare_precisions and 256 in args.sizes and 4 in args.ensembles:
        import zarr

        ref = ours(256, 4, "fp32", "fp32", dtype="float32")
        ref_maps = zarr.open_group(ref["cache"], mode="r")[ref["artifact"]]["maps"][:].astype(np.float64)
        scale = np.abs(ref_maps).max(axis=(1, 2, 3), keepdims=True)
        for precision in args.compare_precisions:
            run = ours(256, 4, precision, f"prec-{precision}", dtype="float32")
            maps = zarr.open_group(run["cache"], mode="r")[run["artifact"]]["maps"][:].astype(np.float64)
            rel = np.abs(maps - ref_maps) / scale
            result["precision_agreement"][precision] = {
                "images_per_s": run["images_per_s"], "max_rel_err_vs_fp32": float(rel.max()),
                "mean_rel_err_vs_fp32": float(rel.mean()),
            }  # fmt: skip
        result["precision_agreement"]["fp32"] = {"images_per_s": ref["images_per_s"]}
        save()
        print("precision:", result["precision_agreement"], flush=True)

    if args.dire:
        precision = (
            args.precision if args.precision != "auto" else ("fp16" if args.device != "cpu" else "fp32")
        )
        dire = dire_estimate(args.dire, args.device, precision, args.batch_size, args.batch_size * 2)
        lare_s = 1.0 / headline["images_per_s"]
        result["dire_style"] = {
            **dire,
            "arch": args.dire,
            "precision": precision,
            "lare_seconds_per_image": lare_s,
            "dire_over_lare": dire["seconds_per_image"] / lare_s,
        }
        print("dire:", result["dire_style"], flush=True)

    save()
    print(markdown(result))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict) -> str:
    lines = [
        f"Device: {r['device']}; model {r['model']}; torch {r['torch']}; batch {r['batch_size']}; "
        f"{r['images']} images; decode workers {r['decode_workers']}",
        "",
        "| size | e | compiled | ours img/s | reference img/s | speedup | GFLOP/img | TFLOP/s | % of peak | split (s): wait / vae / unet / write |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in r["runs"]:
        s = e["time_split_s"]
        pct = f"{e['pct_of_peak']:.1f}" if e["pct_of_peak"] is not None else "n/a"
        lines.append(
            f"| {e['size']} | {e['ensemble']} | {e.get('compiled', False)} | {e['ours_images_per_s']:.1f} | {e['reference_images_per_s']:.1f} | "
            f"{e['speedup_vs_reference']:.1f}x | {e['flops_per_image'] / 1e9:.1f} | {e['achieved_tflops']:.2f} | "
            f"{pct} | {s['data_wait_s']:.2f} / {s['vae_s']:.2f} / {s['unet_s']:.2f} / {s['write_s']:.2f} |"
        )
    d = r["decode_only_images_per_s"]
    lines += ["", f"Decode only ({r['decode_workers']} workers): JPEG 500x375 {d['jpeg_500x375']:.0f} img/s, "
              f"PNG 512x512 {d['png_512x512']:.0f} img/s"]  # fmt: skip
    for p, a in r.get("precision_agreement", {}).items():
        err = f", max rel err vs fp32 {a['max_rel_err_vs_fp32']:.2e}" if "max_rel_err_vs_fp32" in a else ""
        lines.append(f"Precision {p}: {a['images_per_s']:.1f} img/s{err}")
    if "dire_style" in r:
        d = r["dire_style"]
        lines.append(
            f"DIRE-style ({d['arch']}, 40 passes, {d['precision']}): {d['seconds_per_image'] * 1e3:.1f} ms/img, "
            f"{d['flops_per_image'] / 1e12:.2f} TFLOP/img; LaRE (256, e=4): {d['lare_seconds_per_image'] * 1e3:.2f} "
            f"ms/img; ratio {d['dire_over_lare']:.1f}x"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
