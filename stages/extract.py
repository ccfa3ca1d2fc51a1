"""Extraction stage: images -> index -> LaRE maps and pixel crops, in one pass over the files.

Images are decoded (and their noises drawn) in DataLoader workers while the device computes; each
finished shard goes to a writer thread. A rerun with the same inputs finds every shard done and
returns before any model is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import (
    loader_workers,
    resolve_device,
)
from pipeline.errors import UserError, first_line
from pipeline.fingerprint import fingerprint
from pipeline.lock import extract_lock
from pipeline.runner import ShardAssembler, ShardPlan, ShardWriteError, ShardWriter
from pipeline.schema import VALUES_SCHEMA, ArtifactOrigin, IndexAttrs, WriterInfo, index_path
from pipeline.storage import now
from pipeline.store import ArraySpec, Artifact, CacheStore, latest
from stages import configs
from stages.configs import ExtractConfig
from stages.features import lare as lare_math
from stages.features import pixels as pixels_stage
from stages.features import sd
from stages.features.params import LareParams, PixelParams
from stages.features.recipe import RowRecipe, lare_code_version, pixel_code_version
from stages.genimage import index as index_stage
from stages.genimage import layouts

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr


def lare_artifact(
    cfg: ExtractConfig, index_fp: str, model: sd.ModelRef, precision: str, latent: tuple[int, int]
) -> Artifact:
    params = LareParams(
        timestep=cfg.timestep, ensemble=cfg.ensemble, size=cfg.size, preprocess=cfg.preprocess,
        resample=pixels_stage.RESAMPLE if cfg.preprocess == "resize" else None, small_images=cfg.small_images,
        prompt=cfg.prompt, prompt_template=cfg.prompt_template, dtype=cfg.dtype, precision=precision,
        seed=cfg.seed, max_pixels=cfg.max_pixels, perturb=cfg.perturbation(),
    ).to_record()  # fmt: skip
    code = lare_code_version()
    fp = fingerprint(
        {
            "stage": "lare",
            "schema": VALUES_SCHEMA,
            "params": params,
            "model": model.weights,
            "index": index_fp,
            "code": code,
        }
    )
    channels, side = latent
    spec = ArraySpec((channels, side, side), cfg.dtype, fill_value=float("nan"), compressor="blosc-shuffle")
    attrs: ArtifactOrigin = {
        "params": params,
        "model": model.identity(),
        "upstream": {"index": index_fp},
        "code_version": code,
    }
    return Artifact("lare", fp, {"maps": spec}, attrs)


def pixel_artifact(cfg: ExtractConfig, index_fp: str) -> Artifact:
    params = PixelParams(cfg.pixel_size, cfg.small_images, cfg.max_pixels, cfg.perturbation()).to_record()
    code = pixel_code_version()
    fp = fingerprint(
        {"stage": "pixels", "schema": VALUES_SCHEMA, "params": params, "index": index_fp, "code": code}
    )
    spec = ArraySpec((3, cfg.pixel_size, cfg.pixel_size), "uint8")
    attrs: ArtifactOrigin = {"params": params, "upstream": {"index": index_fp}, "code_version": code}
    return Artifact("pixels", fp, {"crops": spec}, attrs)


class RowDataset(torch.utils.data.Dataset):
    """Reads one row's file and applies the per-row recipe; runs in DataLoader workers.

    A file that cannot be read or decoded becomes a reason (and placeholder tensors that are never stored).
    `labels` decide which rows a class-restricted perturbation (`--perturb-only`) applies to.
    """

    def __init__(
        self,
        files: list[str],
        ids: np.ndarray,
        prompt_idx: np.ndarray,
        recipe: RowRecipe,
        labels: np.ndarray | None = None,
    ):
        self.files, self.ids, self.prompt_idx, self.recipe = files, ids, prompt_idx, recipe
        self.labels = labels if labels is not None else np.zeros(len(files), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        item: dict[str, Any] = {"row": row, "ok": True, "reason": ""}
        image_id = str(self.ids[row])
        try:
            with open(self.files[row], "rb") as f:
                rgb = self.recipe.perturbed(self.recipe.decode(f.read()), image_id, int(self.labels[row]))
                item.update(self.recipe.prepare(rgb, image_id))
        except (pixels_stage.BadImage, OSError) as e:
            reason = str(e) if isinstance(e, pixels_stage.BadImage) else f"unreadable: {e}"
            item.update(ok=False, reason=reason, **self.recipe.placeholder(image_id))
        if self.recipe.lare is not None:
            item["prompt"] = int(self.prompt_idx[row])
        item["decode_s"] = time.perf_counter() - t0
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
    stats: dict[str, float] = field(default_factory=dict)  # where the time went (see ShardComputer)


@dataclass
class ExtractJob:
    """The plan of one extraction: everything a process needs to compute any of its shards.

    Plain data (no model, no open store), so it can be handed to other processes or machines.
    """

    cfg: ExtractConfig
    cache_url: str
    subset: str
    index_path: str
    files: list[str]  # absolute path of each row's image
    ids: np.ndarray
    labels: np.ndarray  # 1 generated, 0 real: for --perturb-only
    paths: list[str]  # path relative to the subset folder, for failure records
    prompts: list[str]
    prompt_idx: np.ndarray
    model: sd.ModelRef
    device: str
    precision: str
    latent: tuple[int, int]
    artifacts: dict[str, Artifact]  # kind -> artifact
    plan: ShardPlan

    @property
    def needs_lare(self) -> bool:
        return bool(self.plan.pending.get(self.artifacts["lare"].path))


def _load_or_scan_index(
    store: CacheStore, cfg: ExtractConfig, listing: layouts.Listing | None = None
) -> tuple[index_stage.Index, str]:
    previous = None
    tables = store.tables("index")
    if (newest := latest(tables)) is not None:
        cols, attrs = store.read_table(newest)
        previous = index_stage.Index(attrs["subset"], attrs["root"], cols)
    source = cfg.source()
    idx = index_stage.scan(source, previous=previous, progress=cfg.progress, listing=listing)
    fp = idx.fingerprint
    path = index_path(fp)
    if path not in tables:
        present = set(idx.columns["split"])
        new: IndexAttrs = {
            "fingerprint": fp, "subset": idx.subset, "root": idx.root,
            "splits": [s for s in layouts.SPLIT_NAMES if s in present], "n_rows": len(idx),
            "created_at": now(), "files": {}, "complete": False, "layout": source.describe(),
            "unlabelled": {"count": len(idx.unlabelled), "examples": idx.unlabelled[:20]},
        }  # fmt: skip
        if idx.pairs:
            new["pairs"] = idx.pairs
        store.write_table(path, idx.columns, new)
    if warning := index_stage.format_shortcut(idx.columns):
        logger.info(f"{idx.subset}: {warning}")
    return idx, path


def cache_url_for(cfg: ExtractConfig) -> str:
    """Where the dataset's cache goes; checks the options and the data before anything is created."""
    cfg.check()
    source = cfg.source()
    source.check()  # a bad --data-root fails before a cache is made
    return f"{cfg.cache_dir.rstrip('/')}/{source.name}.zarr"


def plan_extract(cfg: ExtractConfig, listing: layouts.Listing | None = None) -> ExtractJob:
    """Index the dataset, name the artifacts by fingerprint, create them, and list the shards left.
    `listing`: the dataset's files, when the caller listed them (index_stage.list_files)."""
    cache_url = cache_url_for(cfg)
    subset = cfg.source().name
    store = CacheStore(cache_url, mode="a", subset=subset)
    if note := store.migrate():
        logger.info(note)
    idx, index = _load_or_scan_index(store, cfg, listing)
    # usability was checked before anything was created (the CLI's first step); a dask scheduler's
    # workers may hold GPUs this client lacks, so the plan only resolves `auto`
    device = resolve_device(cfg.device, here=False)
    precision = cfg.resolved_precision(device)
    model_ref = sd.resolve_model(cfg.model)
    if note := sd.random_weights_note(model_ref.identity()):
        logger.info(note)
    latent = sd.latent_geometry(model_ref, cfg.size)

    lare = lare_artifact(cfg, idx.fingerprint, model_ref, precision, latent)
    paths = idx.columns["path"]
    recipe = RowRecipe.from_params(LareParams.from_record(lare.attrs["params"]), latent, None)
    assert recipe.lare is not None  # LaRE params given
    prompts, prompt_idx, missing = recipe.lare.prompts(paths)
    if cfg.prompt_template is not None:  # recorded (cache info shows it), not hashed: the index decides it
        examples = [str(paths[r]) for r in missing[:5]]
        lare.attrs["prompt_fallback"] = {"rows": len(missing), "examples": examples}
    artifacts = {"lare": lare}
    if cfg.pixels:
        artifacts["pixels"] = pixel_artifact(cfg, idx.fingerprint)
    n = len(idx)
    layouts = {store.open_artifact(a, n, cfg.rows_per_shard) for a in artifacts.values()}
    if len(layouts) > 1:
        raise UserError(
            f"the artifacts in {cache_url} were started with different --rows-per-shard; "
            f"rerun with --rows-per-shard {max(layouts)} or a new --cache-dir"
        )
    rows_per_shard = layouts.pop()
    if rows_per_shard != cfg.rows_per_shard:
        logger.info(f"note: continuing with the cache's own layout, {rows_per_shard} rows per shard")
    plan = ShardPlan.for_store(store, [a.path for a in artifacts.values()], n, rows_per_shard)
    if missing and plan.shards():
        shown = ", ".join(str(paths[r]) for r in missing[:3])
        logger.info(
            f"note: {len(missing)} file name(s) name no ImageNet class (e.g. {shown}); "
            f"they use the prompt '{cfg.prompt}'"
        )
    return ExtractJob(
        cfg=cfg, cache_url=cache_url, subset=subset, index_path=index,
        files=[idx.abspath(r) for r in range(n)], ids=idx.columns["id"], labels=idx.columns["label"],
        paths=[str(p) for p in idx.columns["path"]], prompts=prompts, prompt_idx=prompt_idx,
        model=model_ref, device=device, precision=precision, latent=latent, artifacts=artifacts, plan=plan,
    )  # fmt: skip


class ShardComputer:
    """Computes and writes shards of a job; loads the model once, however many shards it is given.

    Decoding runs in DataLoader workers, the device works on batch k while the host finishes batch
    k-1, and shards are written by a background thread. `stats` says where the time went.
    """

    def __init__(self, job: ExtractJob):
        self.job = job
        self.cfg = job.cfg
        self.lare = None
        if job.device.startswith("cuda:"):  # kernels and allocations without an explicit device go there too
            torch.cuda.set_device(job.device)
        if job.needs_lare:
            dtype = lare_math.PRECISIONS[job.precision]
            model = sd.load_model(job.model, job.device, dtype)
            if self.cfg.compile:
                model.unet = torch.compile(model.unet, dynamic=False)
                model.vae.encoder = torch.compile(model.vae.encoder, dynamic=False)
            self.lare = lare_math.LaRE(model, model.encode_prompts(job.prompts), self.cfg.timestep, dtype)
        self.cuda = job.device.startswith("cuda")
        self.stats = dict.fromkeys(
            ("data_wait_s", "decode_s", "vae_s", "unet_s", "write_s", "write_wait_s"), 0.0
        )

    def warmup(self) -> None:
        """A batch of zeros through the model: compiles (--compile) and autotunes outside the timings."""
        if self.lare is None:
            return
        t0 = time.perf_counter()
        b, (channels, side), size = self.cfg.batch_size, self.job.latent, self.cfg.size
        images = torch.zeros(b, 3, size, size, dtype=torch.uint8)
        noise = torch.zeros(b, 1 + self.cfg.ensemble, channels, side, side)
        self.lare(images, noise, torch.zeros(b, dtype=torch.long))
        if self.cuda:
            torch.cuda.synchronize()
        self.stats["warmup_s"] = time.perf_counter() - t0

    def _loader(self, shards: list[int]) -> torch.utils.data.DataLoader:
        job, cfg = self.job, self.cfg
        sub = ShardPlan(job.plan.n_rows, job.plan.rows_per_shard, {"all": shards})
        arts = job.artifacts
        recipe = RowRecipe.from_params(
            LareParams.from_record(arts["lare"].attrs["params"]) if self.lare else None,
            job.latent,
            PixelParams.from_record(arts["pixels"].attrs["params"]) if "pixels" in arts else None,
        )
        dataset = RowDataset(job.files, job.ids, job.prompt_idx, recipe, job.labels)
        workers = loader_workers(cfg.loader_workers, job.device, configs.DECODE_WORKERS)
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sub.batches(cfg.batch_size), num_workers=workers, pin_memory=self.cuda,
            prefetch_factor=4 if workers else None,
        )  # fmt: skip

    def _maps(self, batch: dict[str, Any]):
        """Launch the LaRE computation of a batch; returns (maps on host, event to wait on)."""
        assert self.lare is not None  # called for a job that computes maps
        images, noise, prompt = batch["image"], batch["noise"], batch["prompt"]
        n = len(images)
        if self.cfg.compile and n < self.cfg.batch_size:  # a shard's short last batch: pad, no recompile
            pad = self.cfg.batch_size - n
            images = torch.cat([images, images[:1].expand(pad, *images.shape[1:])])
            noise = torch.cat([noise, noise[:1].expand(pad, *noise.shape[1:])])
            prompt = torch.cat([prompt, prompt[:1].expand(pad)])
        if self.cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            z0 = self.lare.encode(images, noise[:, 0])
            ev[1].record()
            maps = self.lare.error(z0, noise[:, 1:], prompt)[:n].to("cpu", non_blocking=True)
            ev[2].record()
            return maps, ev
        t0 = time.perf_counter()
        z0 = self.lare.encode(images, noise[:, 0])
        t1 = time.perf_counter()
        maps = self.lare.error(z0, noise[:, 1:], prompt)[:n]
        self.stats["vae_s"] += t1 - t0
        self.stats["unet_s"] += time.perf_counter() - t1
        return maps, None

    def _finish(self, assembler: ShardAssembler, batch: dict[str, Any], maps, events) -> int:
        """Hand a computed batch to the assembler; returns how many of its rows failed."""
        job, cfg = self.job, self.cfg
        rows = batch["row"].numpy()
        ok = batch["ok"].numpy().astype(bool)
        reasons = {int(r): why for r, why, good in zip(rows, batch["reason"], ok, strict=True) if not good}
        if "pixels" in job.artifacts:
            crops = {"crops": batch["crops"].numpy()}
            assembler.add(job.artifacts["pixels"].path, rows, crops, ok, reasons, job.paths)
        if maps is None:
            return len(reasons)
        if events is not None:
            events[2].synchronize()
            self.stats["vae_s"] += events[0].elapsed_time(events[1]) / 1000
            self.stats["unet_s"] += events[1].elapsed_time(events[2]) / 1000
        maps = maps.numpy().astype(cfg.dtype)
        finite = np.isfinite(maps).reshape(len(rows), -1).all(axis=1)
        lare_reasons = dict(reasons)
        for r, good, fin in zip(rows, ok, finite, strict=True):
            if good and not fin:
                lare_reasons[int(r)] = "non-finite LaRE map (numerical overflow)"
        lare_ok = ok & finite
        maps[~lare_ok] = np.nan
        assembler.add(job.artifacts["lare"].path, rows, {"maps": maps}, lare_ok, lare_reasons, job.paths)
        return len(lare_reasons)

    def run(self, shards: list[int], on_rows=lambda n: None) -> int:
        """Compute and write the given shards (of the job's pending ones); returns the failed-row count."""
        job = self.job
        store = CacheStore(job.cache_url, mode="a")
        wanted = set(shards)
        plan = ShardPlan(
            job.plan.n_rows, job.plan.rows_per_shard,
            {p: [s for s in pend if s in wanted] for p, pend in job.plan.pending.items()},
        )  # fmt: skip
        specs = {
            a.path: {n: (s.row_shape, s.dtype) for n, s in a.arrays.items()} for a in job.artifacts.values()
        }
        info: WriterInfo = {"batch_size": self.cfg.batch_size, "device": job.device, "host": platform.node(),
                "compiled": self.cfg.compile, "threads": torch.get_num_threads()}  # fmt: skip
        writer = ShardWriter(store)
        assembler = ShardAssembler(plan, specs, writer, info)
        failed = 0
        in_flight: deque = deque()
        try:
            batches = iter(self._loader(plan.shards()))
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                self.stats["data_wait_s"] += time.perf_counter() - t0
                if batch is None:
                    break
                self.stats["decode_s"] += float(batch["decode_s"].sum())
                maps, events = self._maps(batch) if self.lare is not None else (None, None)
                in_flight.append((batch, maps, events))
                if len(in_flight) > 1:  # the device already has the next batch queued
                    done = in_flight.popleft()
                    failed += self._finish(assembler, *done)
                    on_rows(len(done[0]["row"]))
            while in_flight:
                done = in_flight.popleft()
                failed += self._finish(assembler, *done)
                on_rows(len(done[0]["row"]))
        finally:
            writer.close()
            self.stats["write_s"] += writer.seconds
            self.stats["write_wait_s"] += writer.wait_seconds
        return failed


Compute = Callable[[ExtractJob, list[int], Callable[[int], None]], int]


def run_extract(cfg: ExtractConfig, compute: Compute | None = None) -> ExtractResult:
    """`pipeline extract`: plan, return at once when nothing is left, else compute every pending shard.

    `compute(job, shards, on_rows)` computes and writes the shards and returns the failed-row count;
    by default this process does it (ShardComputer), stages.extract_dask hands it to a dask cluster.
    The whole run holds the cache's extraction lock: a second run on the same cache refuses at once.
    """
    t0 = time.perf_counter()
    cache_url = cache_url_for(cfg)
    listing = index_stage.list_files(cfg.source())  # bad data refused before the cache is made
    with extract_lock(cache_url):
        return _run_locked(cfg, compute, t0, listing)


def covering_artifacts(cfg: ExtractConfig) -> ExtractResult | None:
    """The complete artifacts of the cache that `cfg` would compute, from any index whose splits cover
    `cfg.splits` (the newest first), or None.

    A run that needs only some splits (robustness extracts its test subsets' val split alone) would
    otherwise index those splits anew, and a new index is a new fingerprint: it would recompute the
    maps a `pipeline extract` of the whole subset already holds. The candidates are named by the very
    fingerprints extraction gives them, so only what `cfg` would write is reused. The data folder is
    not rescanned: files added since that extraction are not in it (`pipeline extract` picks them up).
    """
    cache_url = cache_url_for(cfg)
    try:
        manifest = CacheStore(cache_url, mode="r").read_manifest()
    except UserError:  # no cache there yet
        return None
    if manifest is None:  # never finished: extraction resumes it
        return None
    model_ref = sd.resolve_model(cfg.model)
    precision = cfg.resolved_precision(resolve_device(cfg.device, here=False))
    latent = sd.latent_geometry(model_ref, cfg.size)
    indexes = sorted(manifest["indexes"].items(), key=lambda kv: kv[1]["created_at"], reverse=True)
    if cfg.splits is None:  # all the dataset's splits: only a scan can tell which those are
        return None
    for path, attrs in indexes:
        if not set(cfg.splits) <= set(attrs["splits"]):
            continue
        wanted = {"lare": lare_artifact(cfg, attrs["fingerprint"], model_ref, precision, latent)}
        if cfg.pixels:
            wanted["pixels"] = pixel_artifact(cfg, attrs["fingerprint"])
        arts = manifest["artifacts"]
        found = [arts[a.path] for a in wanted.values() if a.path in arts and arts[a.path]["complete"]]
        if len(found) == len(wanted):
            kinds = {kind: a.path for kind, a in wanted.items()}
            return ExtractResult(cache_url, path, kinds, True, 0, found[0]["n_failed"], 0.0)
    return None


def run_extract_covering(cfg: ExtractConfig) -> ExtractResult:
    """`run_extract` for a caller that needs `cfg.splits` only: complete artifacts of the same
    parameters from an index covering them are reused (covering_artifacts), else they are extracted."""
    found = covering_artifacts(cfg)
    if found is None:
        return run_extract(cfg)
    logger.info(
        f"{cfg.source().name}: up to date, reusing {', '.join(found.artifacts.values())} of {found.index} "
        f"(its index covers {', '.join(cfg.splits or ())})"
    )
    return found


def _storage_fault(store: CacheStore, job: ExtractJob, e: BaseException) -> UserError:
    """One line for a run the storage stopped (disk full, no permission, an object store refusing a
    write): what happened, how many shards are finished and kept, and how to resume."""
    with contextlib.suppress(Exception):  # a full disk may refuse the manifest too: the records suffice
        store.write_manifest()
    try:
        done = min(len(store.done_shards(a.path)) for a in job.artifacts.values())
        finished = f"{done} of {job.plan.n_shards} shards are finished and kept"
    except Exception:  # noqa: BLE001 - the storage is failing: say what we can
        finished = "the finished shards are kept"
    return UserError(
        f"writing {job.cache_url} failed ({type(e).__name__}: {first_line(e)}); {finished}. "
        "Fix the cause (free space, permissions, credentials) and rerun the same command to resume"
    )


def _run_locked(
    cfg: ExtractConfig, compute: Compute | None, t0: float, listing: layouts.Listing
) -> ExtractResult:
    job = plan_extract(cfg, listing)
    kinds = {kind: a.path for kind, a in job.artifacts.items()}
    store = CacheStore(job.cache_url, mode="a")
    if not job.plan.shards():
        store.write_manifest()
        failed = sum(len(r["failed"]) for r in store.done_shards(kinds["lare"]).values())
        logger.info(
            f"{job.subset}: up to date ({', '.join(kinds.values())}; {job.plan.n_rows} rows, {failed} failed)"
        )
        return ExtractResult(job.cache_url, job.index_path, kinds, True, 0, failed, time.perf_counter() - t0)

    stats: dict[str, float] = {}
    if compute is None:
        computer = ShardComputer(job)
        if cfg.compile:
            computer.warmup()
        stats = computer.stats

        def compute(job: ExtractJob, shards: list[int], on_rows: Callable[[int], None]) -> int:
            return computer.run(shards, on_rows=on_rows)

    rows = job.plan.rows()
    bar = tqdm(total=rows, desc=f"extract {job.subset}", unit="img", disable=not cfg.progress)
    t_run = time.perf_counter()
    try:
        failed = compute(job, job.plan.shards(), bar.update)
        stats["run_s"] = time.perf_counter() - t_run  # steady state: no index scan, no model load
    except ShardWriteError as e:
        bar.close()
        raise _storage_fault(store, job, e.error) from None
    except BaseException:  # interrupted: the manifest lists the shards finished so far
        bar.close()
        store.write_manifest()
        raise
    bar.close()
    store.write_manifest()
    seconds = time.perf_counter() - t0
    logger.info(
        f"{job.subset}: {rows} rows done, {failed} failed, {seconds:.1f} s, "
        f"{rows / seconds:.1f} images/s -> {job.cache_url}"
    )
    return ExtractResult(job.cache_url, job.index_path, kinds, False, rows, failed, seconds, stats)
