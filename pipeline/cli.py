"""The `pipeline` command: extract caches; inspect, verify and share them; train, evaluate, report, detect.

Bad input ends in one line on stderr and exit code 2 (pipeline.errors.UserError), never a traceback.

Layering: `pipeline/` (orchestration) is used by `stages/`; the CLI is one of the two places where
`pipeline/` calls into `stages/` (the other is the dask job in pipeline.distributed). It imports each
stage inside its command, so that `pipeline --help` and the cache commands start without torch (a
command's own --help imports its stage, to show the defaults its config holds).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperOption

from pipeline.errors import UserError, first_line

app = typer.Typer(
    help="Feature-cache pipeline for detecting diffusion-generated images (LaRE^2, Learning on Less).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect, check and share caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the others (None) keep the defaults of the stage's config dataclass,
    the one place they are written."""
    return {k: v for k, v in options.items() if v is not None}


@functools.cache
def _defaults_of(source: str) -> dict[str, Any]:
    """The defaults of 'module:Name', a config dataclass."""
    module, name = source.split(":")
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(getattr(importlib.import_module(module), name))
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def _text(value: Any) -> str:
    """A default as --help shows it: tuples as the option takes them (LOW,HIGH), None as none."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def _shown_default(option: TyperOption, sources: tuple[str, ...], renamed: dict[str, str]) -> str | None:
    """What `option`'s --help says its default is; None: typer's own rendering (a literal default)."""
    if option.is_flag and not option.secondary_opts:  # --compile, --no-verify: off unless typed
        return "on" if option.default else "off"
    if option.default is not None or option.required:
        return None
    if option.name in renamed:
        source, field = renamed[option.name].rsplit(".", 1)
        value = _defaults_of(source)[field]
    else:
        found = [_defaults_of(s) for s in sources if option.name in _defaults_of(s)]
        value = found[0][option.name] if found else None
    if isinstance(value, bool) and option.secondary_opts:  # --progress/--no-progress: the one in force
        return (option.opts if value else option.secondary_opts)[0].lstrip("-")
    if value is None and sources:  # a training option left to the method (TrainConfig.hparams)
        from stages import method

        if all(option.name in method.get(n).defaults for n in method.names()):
            return "the method's: " + method.per_method(
                option.name, lambda v: "all" if v is None else _text(v)
            )
    return _text(value)


def _help_defaults(*sources: str, **renamed: str) -> type[TyperCommand]:
    """The command class of a command whose options default to None (`_given` leaves them to a stage's
    config) or are flags: its --help shows each option's real default (a flag's: off), read from
    `sources` ('module:Name' of config dataclasses; the first holding the option's name
    wins) so that no default is written twice. Read when --help is printed: the stages import torch,
    which every start would otherwise pay. `renamed`: option -> 'module:name.field' where the names
    differ."""

    class Command(TyperCommand):
        def format_help(self, ctx: typer.Context, formatter: Any) -> None:
            for param in self.params:
                if isinstance(param, TyperOption) and (text := _shown_default(param, sources, renamed)):
                    param.show_default = text
            super().format_help(ctx, formatter)

    return Command


def _usable_device(device: str | None, here: bool = True) -> None:
    """A command's first step: a --device this machine cannot use ends in one line before anything
    (cache, run directory, results) is created; pipeline.config.resolve_device decides."""
    from pipeline.config import DEFAULT_DEVICE, resolve_device

    resolve_device(device or DEFAULT_DEVICE, here)


_PERTURB_EXTRACT = typer.Option(
    None,
    "--perturb",
    help="Perturb each decoded image before the geometry, e.g. jpeg:96, jpeg:10-75, blur:3,5,7,9, "
    "blur:sigma=3, noise:5-20, crop:5-20, resize:0.5, resize:112px, or as a source's code runs it: "
    "frank:noise|blur|jpeg|crop|combined, genimage:lowres=112, aigcdetect:half, aigcdetect:blur=1; "
    "steps joined by '+'. "
    "Seeded by (--seed, image content, SPEC); stored beside the clean artifacts.",
)
_PERTURB_ONLY = typer.Option(None, "--perturb-only", help="Apply --perturb to one class: generated or real.")
_PERTURB_READ = typer.Option(
    None, "--perturb", help="Use the artifacts extracted with this --perturb SPEC (none: the clean ones)."
)


@app.command(cls=_help_defaults("stages.extract:ExtractConfig", split="stages.extract:ExtractConfig.splits"))
def extract(
    data_root: Path = typer.Option(
        ..., "--data-root", help="Folder holding the GenImage subsets (or one subset)."
    ),
    subset: str = typer.Option(
        ...,
        help="adm, biggan, glide, midjourney, sdv14, sdv15, vqdm, wukong "
        "(or a GenImage archive folder name).",
    ),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Where <subset>.zarr is written (path or URL)."),
    model: str = typer.Option(
        None,
        help="Hub id (id@revision), local diffusers folder, or random weights: 'tiny', 'random-sd15'.",
    ),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    split: list[str] = typer.Option(None, "--split", help="Splits to index (repeat the option)."),
    timestep: int = typer.Option(None, help="Diffusion timestep the latent is noised at."),
    ensemble: int = typer.Option(None, help="Noises per image, averaged (e in the paper)."),
    size: int = typer.Option(None, help="Side of the square image the VAE encodes."),
    preprocess: str = typer.Option(
        None,
        help="resize: straight resize to --size (reference); "
        "crop: resample-free centre crop, aligned with the pixel cache.",
    ),
    prompt: str = typer.Option(None, help="Fixed text condition for the UNet."),
    prompt_template: str = typer.Option(
        None,
        help="Per-image prompt, e.g. 'a photo of a {cls}', with the "
        "ImageNet class parsed from GenImage file names (reference).",
    ),
    dtype: str = typer.Option(None, help="Storage dtype of the maps: float16 or float32."),
    precision: str = typer.Option(
        None, help="Compute precision: auto (fp32 on CPU, fp16 on GPU), fp32, bf16, fp16."
    ),
    seed: int = typer.Option(None, help="Seed of the per-image noise generators (keyed by image content)."),
    pixels: bool = typer.Option(None, "--pixels/--no-pixels", help="Also store uint8 pixel crops."),
    pixel_size: int = typer.Option(
        None, help="Side of the stored pixel crop, the window training crops come from (no resampling)."
    ),
    small_images: str = typer.Option(
        None,
        help="Images smaller than the window: tile (LoL's stitching) or reflect (reflect-101 padding, "
        "the EGRE reference). Also the `--preprocess crop` geometry.",
    ),
    max_pixels: int = typer.Option(None, help="Images with more pixels are refused (decompression bombs)."),
    batch_size: int = typer.Option(
        None, help="Images per model call. Changes the last bits of the maps only."
    ),
    rows_per_shard: int = typer.Option(
        None, help="Rows per shard (layout only; not part of the fingerprint)."
    ),
    loader_workers: int = typer.Option(
        None, help="DataLoader decode workers; -1: none on CPU, all cores but two on GPU."
    ),
    compile: bool = typer.Option(None, "--compile", help="torch.compile the VAE encoder and UNet (GPU)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Show progress bars."),
    workers: int = typer.Option(
        None, "--workers", help="Run on a dask cluster of N workers started here (cuda: one per GPU)."
    ),
    scheduler: str = typer.Option(
        None, "--scheduler", help="Run on an existing dask cluster, e.g. tcp://host:8786."
    ),
    perturb: str = _PERTURB_EXTRACT,
    perturb_only: str = _PERTURB_ONLY,
) -> None:
    """Index a GenImage subset and compute its LaRE maps and pixel crops into <cache-dir>/<subset>.zarr.

    Options not given take ExtractConfig's defaults (listed in the README's table)."""
    _usable_device(device, here=not scheduler)  # a scheduler's workers, not this client, need the GPU
    compute = None
    if workers is not None or scheduler:
        from pipeline.distributed import cluster_compute

        compute = cluster_compute(workers, scheduler, log=lambda msg: typer.echo(msg, err=True))
    from stages.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data_root=str(data_root),
        subset=subset,
        **_given(
            cache_dir=cache_dir,
            model=model,
            splits=tuple(split) if split else None,
            timestep=timestep,
            ensemble=ensemble,
            size=size,
            preprocess=preprocess,
            prompt=prompt,
            prompt_template=prompt_template,
            dtype=dtype,
            precision=precision,
            seed=seed,
            pixels=pixels,
            pixel_size=pixel_size,
            small_images=small_images,
            max_pixels=max_pixels,
            batch_size=batch_size,
            rows_per_shard=rows_per_shard,
            device=device,
            loader_workers=loader_workers,
            compile=compile,
            progress=progress,
            perturb=perturb,
            perturb_only=perturb_only,
        ),
    )
    run_extract(cfg, log=lambda msg: typer.echo(msg, err=True), compute=compute)


def _describe_artifact(path: str, art: dict[str, Any], indexes: dict[str, Any]) -> list[str]:
    """The artifact's lines in `cache info`: its path names it (`--lare`/`--pixels` take the fingerprint
    prefix after the slash), its index and splits, then its parameters as those options filter them."""
    from pipeline.schema import index_path
    from stages.cachedata import selectable_fields

    state = "complete" if art["complete"] else "INCOMPLETE"
    done = f"{art['shards_done']}/{art['n_shards']} shards"
    index = index_path(art["upstream"]["index"])
    splits = ",".join(indexes.get(index, {}).get("splits", []))
    head = f"{path:<28} {state} {done}, {art['n_rows']} rows, {art['n_failed']} failed; {index} ({splits})"
    lines = [head]
    p = art.get("params", {})
    if art["kind"] == "lare":
        m = art.get("model", {})
        note = "  (random weights: no forensic signal)" if m.get("source") == "random" else ""
        lines.append(
            f"  model {m.get('spec')} [{m.get('source')}, weights {str(m.get('weights'))[:12]}]{note}"
        )
        if p.get("preprocess") == "resize" and "resample" not in p:
            lines.append("  resize (bilinear, schema 1): not the reference's bicubic")
        if fallback := art.get("prompt_fallback"):
            examples = f" (e.g. {', '.join(fallback['examples'][:3])})" if fallback["rows"] else ""
            lines.append(
                f"  {fallback['rows']} row(s) with no class in the file name used '{p['prompt']}'{examples}"
            )
    lines.append(f"  {selectable_fields(art)}")
    if p.get("perturb"):
        from stages.perturb import describe

        lines.append(f"  perturbed: {describe(p['perturb'])}, seed {p['perturb']['seed']}")
    return lines


def _describe_formats(store, path: str) -> list[str]:
    """Source formats and JPEG qualities per class of an index (the format bias of a data set)."""
    from stages.index import format_mix

    group = store.group[path]
    names = [n for n in ("label", "format", "jpeg_quality") if n in group]
    mix = format_mix({n: group[n][:] for n in names})
    lines = []
    for cls in ("real", "generated"):
        kinds = sorted(mix.get(cls, {}).items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{k} x{n}" for k, n in kinds[:8])
        more = f", {len(kinds) - 8} more" if len(kinds) > 8 else ""
        lines.append(f"  {cls}: {shown or 'none'}{more}")
    return lines


@cache_app.command("info", cls=_help_defaults())
def cache_info(
    cache: str = typer.Argument(..., help="Path or URL of a <subset>.zarr cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """What a cache holds: index, artifacts (parameters, model, progress) and failed rows."""
    from pipeline.schema import LEGACY_SCHEMAS, MANIFEST
    from pipeline.store import CacheStore

    store = CacheStore(cache, mode="r")
    manifest = store.read_json(MANIFEST) or store.build_manifest()
    if as_json:
        typer.echo(json.dumps(manifest, indent=1, sort_keys=True))
        return
    typer.echo(
        f"cache {cache}  subset {manifest['subset']}  schema {manifest['schema_version']}  "
        f"updated {manifest['updated_at']}"
    )
    if manifest["schema_version"] in LEGACY_SCHEMAS:
        typer.echo(
            f"schema {manifest['schema_version']}: {LEGACY_SCHEMAS[manifest['schema_version']]}; read-only"
        )
    for path, attrs in sorted(manifest["indexes"].items()):
        latest = "  (latest)" if path == manifest.get("latest_index") else ""
        typer.echo(f"{path:<28} {attrs['n_rows']} rows, splits {','.join(attrs['splits'])}{latest}")
        for line in _describe_formats(store, path):
            typer.echo(line)
    failed = {}
    for path, art in sorted(manifest["artifacts"].items()):
        for line in _describe_artifact(path, art, manifest["indexes"]):
            typer.echo(line)
        for f in art["failed"]:
            failed.setdefault(f["path"], f["reason"])
    if failed:
        typer.echo(f"failed rows ({len(failed)}):")
        for path, reason in sorted(failed.items()):
            typer.echo(f"  {path}: {reason}")


@cache_app.command("verify")
def cache_verify(cache: str = typer.Argument(..., help="Path or URL of a <subset>.zarr cache.")) -> None:
    """Recompute every checksum in the manifest: exit 0 when intact, 1 naming each damaged object."""
    from pipeline.integrity import manifest_files, verify
    from pipeline.store import CacheStore

    store = CacheStore(cache, mode="r")
    problems = verify(store, progress=sys.stderr.isatty())
    if problems:
        for line in problems:
            typer.echo(f"FAILED {line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {len(manifest_files(store.manifest()))} objects match the manifest of {cache}")


def _copy(src: str, dst: str, jobs: int, recheck: bool, verb: str) -> None:
    from pipeline.share import copy_cache

    report = copy_cache(src, dst, jobs=jobs, progress=sys.stderr.isatty(), recheck=recheck)
    typer.echo(report.line(verb, src, dst))


_JOBS = typer.Option(8, "--jobs", "-j", help="Objects copied in parallel.")
_RECHECK = typer.Option(
    False, "--recheck", help="Read back objects the target's manifest vouches for (repairs a damaged target)."
)


@cache_app.command("push", cls=_help_defaults())
def cache_push(
    local: str = typer.Argument(..., help="The <subset>.zarr cache to share (path or URL)."),
    url: str = typer.Argument(..., help="Where to put it: s3://bucket/prefix/<subset>.zarr, a folder, ..."),
    jobs: int = _JOBS,
    recheck: bool = _RECHECK,
) -> None:
    """Copy a cache to shared storage: only objects missing or different there; resumable; manifest last."""
    _copy(local, url, jobs, recheck, "pushed")


@cache_app.command("pull", cls=_help_defaults())
def cache_pull(
    url: str = typer.Argument(..., help="A shared cache: s3://..., https://..., a .zip, a folder."),
    local: str = typer.Argument(..., help="Local <subset>.zarr folder to copy it into."),
    jobs: int = _JOBS,
    recheck: bool = _RECHECK,
) -> None:
    """Copy a shared cache here: only objects missing or different; resumable; checked on arrival."""
    _copy(url, local, jobs, recheck, "pulled")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to create the synthetic GenImage-layout set in."),
    subset: str = typer.Option("sdv14", help="Which subset's folder names to use."),
    train: int = typer.Option(16, help="Images per class in train."),
    val: int = typer.Option(8, help="Images per class in val."),
    seed: int = typer.Option(0, help="Seed of the images (the same seed writes the same files)."),
    artifact: str = typer.Option(
        "upsample",
        help="What marks the generated images: upsample (from 1/4 resolution) or grid (8 px lines).",
    ),
) -> None:
    """Write a small synthetic set (generated = upsampled from low resolution) for demos and tests."""
    from stages.index import canonical_subset
    from stages.synthetic import ARTIFACTS, make_genimage

    if artifact not in ARTIFACTS:
        raise UserError(f"--artifact must be one of {', '.join(ARTIFACTS)}, not '{artifact}'")
    folder = make_genimage(
        out, canonical_subset(subset), {"train": train, "val": val}, seed, artifact=artifact
    )
    typer.echo(f"wrote {2 * (train + val)} images to {folder}")


def _caches(option: list[str] | None, extra: list[str] | None) -> list[str]:
    """`--from-cache a b c` and `--from-cache a --from-cache b` both give [a, b, c]."""
    caches = [*(option or []), *(extra or [])]
    if not caches:
        raise UserError("give at least one cache: --from-cache cache/<subset>.zarr")
    return caches


_NO_VERIFY = (
    "Skip the cache checksum verification; a cache still being extracted (no manifest yet) is read "
    "from its finished shards."
)
_LARE = typer.Option(
    None,
    "--lare",
    help="Which LaRE artifact of each cache: a fingerprint prefix (see `pipeline cache info`) or "
    "key=value filters, e.g. dtype=float32. none: train the newest, eval the run's own.",
)
_PIXELS = typer.Option(
    None, "--pixels", help="Which pixel artifact: a fingerprint prefix or key=value filters, e.g. size=256."
)


def _range(text: str | None, name: str) -> tuple[float, float] | None:
    """'LOW,HIGH' -> (low, high); None (not given) stays None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} takes two numbers 'LOW,HIGH', not '{text}'") from None
    if not 0 < lo <= hi:
        raise UserError(f"{name} needs 0 < LOW <= HIGH, not '{text}'")
    return lo, hi


@app.command(cls=_help_defaults("stages.train:TrainConfig"))
def train(
    extra_caches: list[str] = typer.Argument(None, help="More caches (after --from-cache), concatenated."),
    from_cache: list[str] = typer.Option(None, "--from-cache", help="Cache(s) to train on (path or URL)."),
    method: str = typer.Option(None, help="egre (LaRE^2) or lol (Learning on Less)."),
    out: str = typer.Option(None, help="Folder of run directories."),
    max_per_class: str = typer.Option(
        None,
        help="Train on N real + N generated rows of the train split, seeded, or 'all' (LoL's 1600: "
        "the paper's).",
    ),
    seed: int = typer.Option(None, help="Seeds the sample, the validation slice and every epoch."),
    epochs: int = typer.Option(None, help="At most this many epochs."),
    patience: int = typer.Option(None, help="Stop after N epochs without a better validation AUC; 0: never."),
    val_fraction: float = typer.Option(
        None,
        help="Share of the training rows (per label, seeded) held out from the TRAIN split to pick "
        "the best epoch (and step EGRE's plateau schedule); no test split is ever read.",
    ),
    min_val_rows: int = typer.Option(
        None,
        help="Validation rows per label the slice needs to choose the best epoch, stop early and step "
        "the plateau schedule; below it the last epoch is kept (an AUC of a few rows is noise).",
    ),
    batch_size: int = typer.Option(None, help="Training images per step."),
    lr: float = typer.Option(None, help="Learning rate (LoL: 5e-7 on a BigGAN training cache)."),
    crop_size: int = typer.Option(None, help="Side of the random (train) / centre (test) crop."),
    backbone: str = typer.Option(None, help="open_clip config: RN50, or tiny-RN for tests."),
    backbone_weights: str = typer.Option(
        None, help="openai (download), random, or a local open_clip checkpoint file."
    ),
    mask_range: str = typer.Option(None, help="LoL: r_mask drawn uniformly in LOW,HIGH."),
    aspect_range: str = typer.Option(None, help="LoL: r_aspect drawn uniformly in LOW,HIGH."),
    shuffle_labels: bool = typer.Option(None, help="Control: half of each class labelled generated."),
    stop_after: int = typer.Option(None, help="Stop after this epoch as if interrupted (rerun resumes)."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    memory_rows: int = typer.Option(
        None, help="Training rows held in memory (about 200 KB each); more are streamed shard by shard."
    ),
    loader_workers: int = typer.Option(
        None, help="Processes reading cache shards; -1: none on CPU, some on GPU. Changes no bit of the run."
    ),
    precision: str = typer.Option(
        None, help="fp32, or bf16 (autocast); auto: bf16 on CUDA, fp32 on CPU. Part of the fingerprint."
    ),
    perturb: str = _PERTURB_READ,
    perturb_only: str = _PERTURB_ONLY,
    real_jpeg_quality: int = typer.Option(
        None, help="Train on real images of this JPEG quality only (e.g. 96: the JPEG-96 control)."
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help=_NO_VERIFY),
    lare: str = _LARE,
    pixels: str = _PIXELS,
    progress: bool = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Train a detector from caches only; prints the run directory (named by its fingerprint).

    Options not given take TrainConfig's defaults or the method's (docs/training.md)."""
    _usable_device(device)
    from stages.train import TrainConfig, run_train

    cfg = TrainConfig(
        caches=_caches(from_cache, extra_caches), verify=not no_verify, max_per_class=max_per_class,
        epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, stop_after=stop_after, lare=lare,
        pixels=pixels, perturb=perturb, perturb_only=perturb_only, real_jpeg_quality=real_jpeg_quality,
        **_given(
            method=method, out=out, seed=seed, val_fraction=val_fraction, min_val_rows=min_val_rows,
            crop_size=crop_size, backbone=backbone, backbone_weights=backbone_weights,
            shuffle_labels=shuffle_labels,
            mask_range=_range(mask_range, "--mask-range"), progress=progress, memory_rows=memory_rows,
            aspect_range=_range(aspect_range, "--aspect-range"), device=device,
            loader_workers=loader_workers, precision=precision,
        ),
    )  # fmt: skip
    run = run_train(cfg, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(str(run))


_THRESHOLD = typer.Option(
    None,
    help="Score above which an image is called generated: 0.5, a number, or fpr1, fpr5, "
    "balanced: calibrated on the run's validation slice (FPR 1%/5% on its real rows, best balanced "
    "accuracy). The results say which was used.",
)


@app.command("eval", cls=_help_defaults("stages.evaluate:EvalConfig"))
def eval_(
    extra_caches: list[str] = typer.Argument(None, help="More test caches (after --from-cache)."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="A finished run directory."),
    from_cache: list[str] = typer.Option(
        None, "--from-cache", help="Test cache(s); each is evaluated apart."
    ),
    out: str = typer.Option(None, help="Folder for <run>__<subset>-<key>.csv/.json."),
    split: str = typer.Option(None, help="Which split of the test caches to score."),
    epoch: str = typer.Option(
        None,
        "--epoch",
        "--epochs",
        help="Weights to score: best (by the run's validation slice), last, "
        "an epoch number, or last5 (each of the final five; mean +- std, LoL's protocol).",
    ),
    batch_size: int = typer.Option(None, help="Rows per model call."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    perturb: str = _PERTURB_READ,
    perturb_only: str = _PERTURB_ONLY,
    no_verify: bool = typer.Option(False, "--no-verify", help=_NO_VERIFY),
    lare: str = _LARE,
    pixels: str = _PIXELS,
    threshold: str = _THRESHOLD,
    progress: bool = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Score every usable row of each test cache: ACC, real/generated ACC and real FPR at the threshold;
    AP, ROC AUC, TPR at FPR 1%/5%, ECE (whole set); a reliability diagram PNG beside each result."""
    _usable_device(device)
    from stages.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(
        checkpoint, _caches(from_cache, extra_caches), verify=not no_verify, lare=lare, pixels=pixels,
        perturb=perturb, perturb_only=perturb_only,
        **_given(out=out, split=split, batch_size=batch_size, epoch=epoch, device=device, progress=progress,
                 threshold=threshold),
    )  # fmt: skip
    run_eval(cfg, log=typer.echo)


@app.command(cls=_help_defaults("stages.calibrate:CalibrateConfig"))
def calibrate(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A finished run directory."),
    from_cache: list[str] = typer.Option(
        None, "--from-cache", help="Where its training caches are now (default: the paths it recorded)."
    ),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    no_verify: bool = typer.Option(False, "--no-verify", help=_NO_VERIFY),
) -> None:
    """Recompute a run's calibrated thresholds from its validation slice (runs trained before
    `train` wrote calibration.json). Prints the thresholds."""
    _usable_device(device)
    from stages.calibrate import FILE, CalibrateConfig, run_calibrate

    cfg = CalibrateConfig(checkpoint, from_cache or None, verify=not no_verify, **_given(device=device))
    record = run_calibrate(cfg, log=lambda m: typer.echo(m, err=True))
    for name, value in record["thresholds"].items():
        typer.echo(f"{name}: {value:.6g}")
    typer.echo(f"wrote {Path(checkpoint) / FILE}")


@app.command(cls=_help_defaults())
def report(
    results: Path = typer.Argument(..., help="Folder of `pipeline eval` results."),
    out: Path = typer.Option(None, help="Heatmap PNG to write (e.g. results/matrix.png)."),
    metric: str = typer.Option(
        "acc", help="acc, ap, auc, tpr_at_fpr1, tpr_at_fpr5, ece, real_acc, generated_acc or real_fpr."
    ),
    csv_out: Path = typer.Option(None, "--csv", help="The table as CSV (fractions, rows per cell)."),
) -> None:
    """Print the train x test table (with a mean column) and draw it as a heatmap.

    Results of `eval --epoch last5` show mean+-std in the table and the mean in the heatmap; results
    on test artifacts of identical parameters share a cell (averaged, weighted by rows)."""
    from stages.report import collect, heatmap, table, write_csv

    matrix = collect(results, metric)
    typer.echo(table(matrix))
    if csv_out is not None:
        typer.echo(f"wrote {write_csv(matrix, csv_out)}")
    if out is not None:
        typer.echo(f"wrote {heatmap(matrix, out)}")


@app.command(
    cls=_help_defaults(
        "stages.robustness:RobustnessConfig",
        "stages.train:TrainConfig",
        "stages.extract:ExtractConfig",
        extract_batch_size="stages.extract:ExtractConfig.batch_size",
    )
)
def robustness(
    data_root: Path = typer.Option(..., "--data-root", help="Folder holding the GenImage subsets."),
    train_subset: str = typer.Option("sdv14", help="The subset detectors are trained on."),
    test_subsets: list[str] = typer.Option(
        ..., "--test-subsets", help="Subsets to test on: 'adm,biggan' or the option repeated."
    ),
    grid: str = typer.Option(None, help="lol-a4, lol-a4-frank, lol-a7, genimage, aigcdetect or jpeg96."),
    method: str = typer.Option(None, help="lol or egre."),
    out: str = typer.Option(None, help="Folder for runs/, results/, the CSV and figures."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Where <subset>.zarr caches are (or go)."),
    model: str = typer.Option(None, help="As for extract."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1, ..."),
    size: int = typer.Option(None, help="As for extract."),
    pixel_size: int = typer.Option(None, help="As for extract."),
    preprocess: str = typer.Option(None, help="As for extract."),
    ensemble: int = typer.Option(None, help="As for extract."),
    extract_batch_size: int = typer.Option(None, help="Images per LaRE model call (extract --batch-size)."),
    rows_per_shard: int = typer.Option(None, help="As for extract."),
    seed: int = typer.Option(None, help="Seed of extraction (noises, perturbations) and training."),
    backbone: str = typer.Option(None, help="As for train."),
    backbone_weights: str = typer.Option(None, help="As for train."),
    epochs: int = typer.Option(None, help="As for train."),
    batch_size: int = typer.Option(None, help="Training batch size, as for train."),
    lr: float = typer.Option(None, help="As for train."),
    crop_size: int = typer.Option(None, help="As for train."),
    max_per_class: str = typer.Option(None, help="As for train."),
    progress: bool = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """A robustness or format-bias study: extract what is missing, train, evaluate; CSV and figures."""
    _usable_device(device)
    from stages.robustness import RobustnessConfig, run_robustness

    cfg = RobustnessConfig(
        data_root=str(data_root), train_subset=train_subset,
        test_subsets=[s for item in test_subsets for s in item.split(",") if s.strip()],
        **_given(grid=grid, method=method, out=out, progress=progress),
        extract=_given(cache_dir=cache_dir, model=model, device=device, size=size, pixel_size=pixel_size,
                       preprocess=preprocess, ensemble=ensemble, batch_size=extract_batch_size,
                       rows_per_shard=rows_per_shard, seed=seed),
        train=_given(backbone=backbone, backbone_weights=backbone_weights, epochs=epochs, lr=lr,
                     batch_size=batch_size, crop_size=crop_size, max_per_class=max_per_class, seed=seed,
                     device=device),
    )  # fmt: skip
    cfg.conditions()  # a bad --grid fails before anything is computed
    csv_path, figures = run_robustness(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {csv_path}")
    for f in figures:
        typer.echo(f"wrote {f}")


@app.command(cls=_help_defaults("stages.detect:DetectConfig"))
def detect(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively) or one image."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="A finished run directory."),
    out: Path = typer.Option(
        None, help="CSV of path, score, decision, error, and the run, epoch and threshold used."
    ),
    threshold: str = _THRESHOLD,
    epoch: str = typer.Option(
        None, help="Weights to use: best (by the run's validation slice; the default), last, or N."
    ),
    device: str = typer.Option(None, help="Where the LaRE model runs (EGRE): auto, cpu, cuda."),
    batch_size: int = typer.Option(
        None, help="Images per model call. Changes the last bits of the maps only."
    ),
    progress: bool = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Score any folder of images with a trained run; unreadable files are listed with a reason."""
    _usable_device(device)
    from stages.detect import DetectConfig, run_detect

    cfg = DetectConfig(
        folder, checkpoint,
        **_given(out=out, threshold=threshold, batch_size=batch_size, epoch=epoch, device=device,
                 progress=progress),
    )  # fmt: skip
    scored, failed = run_detect(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"scored {scored} image(s), {failed} unreadable -> {cfg.out}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UserError as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished shards are kept; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:
        # Storage the user pointed at refused us (permissions, no credentials, a full disk): one line.
        if isinstance(e, OSError) or type(e).__name__ in _STORAGE_ACCESS_ERRORS:
            typer.echo(f"Error: {type(e).__name__}: {first_line(e)}", err=True)
            sys.exit(2)
        raise


# botocore's credential errors are not OSErrors; named, so that botocore need not be imported.
_STORAGE_ACCESS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}


if __name__ == "__main__":
    main()
