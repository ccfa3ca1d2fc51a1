"""Extraction stage: images -> index -> LaRE maps and pixel crops, in one pass over the files.

Images are decoded (and their noises drawn) in DataLoader workers while the device computes; each
finished shard goes to a writer thread. A rerun with the same inputs finds every shard done and
returns before any model is loaded.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import code_version, fingerprint
from pipeline.runner import ShardAssembler, ShardPlan, ShardWriter
from pipeline.store import ArraySpec, Artifact, CacheStore, now
from stages import index as index_stage
from stages import lare as lare_math
from stages import pixels as pixels_stage
from stages import sd

PREPROCESS = ("resize", "crop")
STORE_DTYPES = ("float16", "float32")
DEFAULT_PROMPT = "a photo"


@dataclass
class ExtractConfig:
    """Everything `pipeline extract` takes. Which fields decide values is said in `lare_params`."""

    data_root: str
    subset: str
    cache_dir: str = "cache"
    model: str = sd.DEFAULT_MODEL
    splits: tuple[str, ...] = index_stage.SPLITS
    timestep: int = 200
    ensemble: int = 4
    size: int = 256
    preprocess: str = "resize"
    prompt: str = DEFAULT_PROMPT
    prompt_template: str | None = None
    dtype: str = "float16"
    precision: str = "auto"
    seed: int = 0
    pixels: bool = True
    pixel_size: int = 256
    max_pixels: int = pixels_stage.DEFAULT_MAX_PIXELS
    batch_size: int = 16
    rows_per_shard: int = 512
    device: str = "auto"
    loader_workers: int = -1  # -1: none on CPU, up to 8 on a GPU
    progress: bool = True

    def check(self) -> None:
        if self.preprocess not in PREPROCESS:
            raise UserError(f"--preprocess must be one of {', '.join(PREPROCESS)}, not '{self.preprocess}'")
        if self.dtype not in STORE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, not '{self.dtype}'")
        if self.precision != "auto" and self.precision not in lare_math.PRECISIONS:
            raise UserError(f"--precision must be auto or one of {', '.join(lare_math.PRECISIONS)}")
        if not 0 <= self.timestep < 1000:
            raise UserError(f"--timestep must be in [0, 1000), not {self.timestep}")
        for name in ("ensemble", "size", "pixel_size", "batch_size", "rows_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.prompt_template is not None and "{cls}" not in self.prompt_template:
            raise UserError("--prompt-template must contain '{cls}', e.g. 'a photo of a {cls}'")

    def resolved_precision(self, device: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "fp16" if device.startswith("cuda") else "fp32"


def lare_artifact(
    cfg: ExtractConfig, index_fp: str, model: sd.ModelRef, precision: str, latent: tuple[int, int]
) -> Artifact:
    params = {
        "timestep": cfg.timestep,
        "ensemble": cfg.ensemble,
        "size": cfg.size,
        "preprocess": cfg.preprocess,
        "prompt": None if cfg.prompt_template else cfg.prompt,
        "prompt_template": cfg.prompt_template,
        "dtype": cfg.dtype,
        "precision": precision,
        "seed": cfg.seed,
        "max_pixels": cfg.max_pixels,
    }
    code = code_version(lare_math, pixels_stage)
    fp = fingerprint(
        {
            "stage": "lare",
            "schema": 1,
            "params": params,
            "model": model.weights,
            "index": index_fp,
            "code": code,
        }
    )
    channels, side = latent
    spec = ArraySpec((channels, side, side), cfg.dtype, fill_value=float("nan"), compressor="blosc-shuffle")
    attrs = {
        "params": params,
        "model": model.identity(),
        "upstream": {"index": index_fp},
        "code_version": code,
    }
    return Artifact("lare", fp, {"maps": spec}, attrs)


def pixel_artifact(cfg: ExtractConfig, index_fp: str) -> Artifact:
    params = {
        "size": cfg.pixel_size,
        "geometry": "centre crop, tiled when smaller",
        "max_pixels": cfg.max_pixels,
    }
    code = code_version(pixels_stage)
    fp = fingerprint({"stage": "pixels", "schema": 1, "params": params, "index": index_fp, "code": code})
    spec = ArraySpec((3, cfg.pixel_size, cfg.pixel_size), "uint8")
    attrs = {"params": params, "upstream": {"index": index_fp}, "code_version": code}
    return Artifact("pixels", fp, {"crops": spec}, attrs)


def prompts_for(cfg: ExtractConfig, paths: np.ndarray) -> tuple[list[str], np.ndarray, int]:
    """Distinct prompts, each row's prompt index, and how many rows had no class in their file name."""
    if cfg.prompt_template is None:
        return [cfg.prompt], np.zeros(len(paths), dtype=np.int64), 0
    texts, missing = [], 0
    for p in paths:
        cls = index_stage.imagenet_class(str(p))
        if cls is None:
            missing += 1
            texts.append(cfg.prompt)
        else:
            texts.append(cfg.prompt_template.format(cls=cls))
    prompts = sorted(set(texts))
    lookup = {t: i for i, t in enumerate(prompts)}
    return prompts, np.array([lookup[t] for t in texts], dtype=np.int64), missing


class RowDataset(torch.utils.data.Dataset):
    """Reads, decodes and prepares one row; runs in DataLoader workers. Bad files become a reason."""

    def __init__(
        self,
        files: list[str],
        ids: np.ndarray,
        prompt_idx: np.ndarray,
        cfg: ExtractConfig,
        latent: tuple[int, int] | None,
    ):
        self.files, self.ids, self.prompt_idx = files, ids, prompt_idx
        self.cfg, self.latent = cfg, latent

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> dict[str, Any]:
        cfg = self.cfg
        item: dict[str, Any] = {"row": row, "ok": True, "reason": ""}
        try:
            with open(self.files[row], "rb") as f:
                rgb = pixels_stage.decode_rgb(f.read(), cfg.max_pixels)
        except (pixels_stage.BadImage, OSError) as e:
            item.update(
                ok=False, reason=str(e) if isinstance(e, pixels_stage.BadImage) else f"unreadable: {e}"
            )
            rgb = np.zeros((8, 8, 3), dtype=np.uint8)
        if cfg.pixels:
            item["crops"] = torch.from_numpy(pixels_stage.crop_tiled(rgb, cfg.pixel_size)).permute(2, 0, 1)
        if self.latent is not None:
            geom = pixels_stage.resize_square if cfg.preprocess == "resize" else pixels_stage.crop_tiled
            item["image"] = torch.from_numpy(geom(rgb, cfg.size).copy()).permute(2, 0, 1)
            channels, side = self.latent
            item["noise"] = lare_math.draw_noise(
                cfg.seed, str(self.ids[row]), cfg.ensemble, (channels, side, side)
            )
            item["prompt"] = int(self.prompt_idx[row])
        return item


@dataclass
class ExtractResult:
    cache: str
    index: str
    artifacts: dict[str, str]  # kind -> artifact path
    up_to_date: bool
    rows_done: int
    failed: int
    seconds: float


def _load_or_scan_index(store: CacheStore, cfg: ExtractConfig) -> tuple[index_stage.Index, str]:
    previous = None
    tables = store.tables("index")
    if tables:
        latest = max(tables, key=lambda p: tables[p].get("created_at", ""))
        cols, attrs = store.read_table(latest)
        previous = index_stage.Index(attrs["subset"], attrs["root"], cols)
    idx = index_stage.scan(cfg.data_root, cfg.subset, cfg.splits, previous=previous, progress=cfg.progress)
    fp = idx.fingerprint
    path = f"index/{fp[:16]}"
    if path not in tables:
        store.write_table(
            path,
            idx.columns,
            {
                "fingerprint": fp,
                "subset": idx.subset,
                "root": idx.root,
                "splits": list(cfg.splits),
                "n_rows": len(idx),
                "created_at": now(),
            },
        )
    return idx, path


def run_extract(cfg: ExtractConfig, log=print) -> ExtractResult:
    cfg.check()
    t0 = time.perf_counter()
    subset = index_stage.canonical_subset(cfg.subset)
    index_stage.resolve_subset_root(cfg.data_root, subset)  # a bad --data-root fails before a cache is made
    cache_url = f"{cfg.cache_dir.rstrip('/')}/{subset}.zarr"
    store = CacheStore(cache_url, mode="a", subset=subset)
    idx, index_path = _load_or_scan_index(store, cfg)
    device = resolve_device(cfg.device)
    precision = cfg.resolved_precision(device)
    model_ref = sd.resolve_model(cfg.model)
    if model_ref.source == "tiny":
        log("model 'tiny' is randomly initialised: its maps carry no forensic signal (tests and demo only)")
    latent = sd.latent_geometry(model_ref, cfg.size)

    wanted = [lare_artifact(cfg, idx.fingerprint, model_ref, precision, latent)]
    if cfg.pixels:
        wanted.append(pixel_artifact(cfg, idx.fingerprint))
    n = len(idx)
    layouts = {store.open_artifact(a, n, cfg.rows_per_shard) for a in wanted}
    if len(layouts) > 1:
        raise UserError(
            f"the artifacts in {cache_url} were started with different --rows-per-shard; "
            f"rerun with --rows-per-shard {max(layouts)} or a new --cache-dir"
        )
    rows_per_shard = layouts.pop()
    if rows_per_shard != cfg.rows_per_shard:
        log(f"note: continuing with the cache's own layout, {rows_per_shard} rows per shard")
    plan = ShardPlan.for_store(store, [a.path for a in wanted], n, rows_per_shard)
    kinds = {a.kind: a.path for a in wanted}

    if not plan.shards():
        store.write_manifest()
        failed = sum(len(r["failed"]) for r in store.done_shards(kinds["lare"]).values())
        log(f"{subset}: up to date ({', '.join(kinds.values())}; {n} rows, {failed} failed)")
        return ExtractResult(cache_url, index_path, kinds, True, 0, failed, time.perf_counter() - t0)

    need_lare = bool(plan.pending[kinds["lare"]])
    prompt_idx = np.zeros(n, dtype=np.int64)
    lare = None
    if need_lare:
        prompts, prompt_idx, missing = prompts_for(cfg, idx.columns["path"])
        if missing:
            log(f"note: {missing} file name(s) name no ImageNet class; they use the prompt '{cfg.prompt}'")
        model = sd.load_model(model_ref, device, lare_math.PRECISIONS[precision])
        lare = lare_math.LaRE(
            model, model.encode_prompts(prompts), cfg.timestep, lare_math.PRECISIONS[precision]
        )
    dataset = RowDataset(
        [idx.abspath(r) for r in range(n)], idx.columns["id"], prompt_idx, cfg, latent if need_lare else None
    )
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (0 if device == "cpu" else 8)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan.batches(cfg.batch_size),
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        prefetch_factor=4 if workers else None,
    )
    specs = {a.path: {name: (s.row_shape, s.dtype) for name, s in a.arrays.items()} for a in wanted}
    info = {"batch_size": cfg.batch_size, "device": device, "host": platform.node()}
    writer = ShardWriter(store)
    assembler = ShardAssembler(plan, specs, writer, info)
    n_failed = 0
    paths = {r: str(p) for r, p in enumerate(idx.columns["path"])}
    bar = tqdm(total=plan.rows(), desc=f"extract {subset}", unit="img", disable=not cfg.progress)
    try:
        for batch in loader:
            rows = batch["row"].numpy()
            ok = batch["ok"].numpy().astype(bool)
            failed = {
                int(r): reason for r, reason, good in zip(rows, batch["reason"], ok, strict=True) if not good
            }
            n_failed += len(failed)
            if cfg.pixels:
                assembler.add(kinds["pixels"], rows, {"crops": batch["crops"].numpy()}, ok, failed, paths)
            if lare is not None:
                maps = lare(batch["image"], batch["noise"], batch["prompt"]).cpu().numpy()
                finite = np.isfinite(maps).reshape(len(rows), -1).all(axis=1)
                lare_failed = dict(failed)
                lare_failed.update(
                    {
                        int(r): "non-finite LaRE map (numerical overflow)"
                        for r, f, good in zip(rows, finite, ok, strict=True)
                        if good and not f
                    }
                )
                n_failed += len(lare_failed) - len(failed)
                lare_ok = ok & finite
                maps = maps.astype(cfg.dtype)
                maps[~lare_ok] = np.nan
                assembler.add(kinds["lare"], rows, {"maps": maps}, lare_ok, lare_failed, paths)
            bar.update(len(rows))
    finally:
        bar.close()
        writer.close()
        store.write_manifest()
    seconds = time.perf_counter() - t0
    rows_done = plan.rows()
    log(
        f"{subset}: {rows_done} rows done, {n_failed} failed, {seconds:.1f} s, "
        f"{rows_done / seconds:.1f} images/s -> {cache_url}"
    )
    return ExtractResult(cache_url, index_path, kinds, False, rows_done, n_failed, seconds)
