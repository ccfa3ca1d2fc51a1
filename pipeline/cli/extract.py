"""Making data: `pipeline extract` (a GenImage subset into a cache) and `pipeline synth` (a small
synthetic set in GenImage's layout, for demos and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import (
    CacheDir,
    DataRoot,
    Device,
    Ensemble,
    LareBatchSize,
    Model,
    PerturbOnly,
    PerturbSpec,
    PixelSize,
    Preprocess,
    Progress,
    RowsPerShard,
    Seed,
    Size,
    given,
    help_defaults,
    log,
    usable_device,
)
from pipeline.errors import UserError

app = typer.Typer()


@app.command(cls=help_defaults("stages.extract:ExtractConfig", split="stages.extract:ExtractConfig.splits"))
def extract(
    data_root: DataRoot,
    subset: Annotated[
        str,
        typer.Option(
            help="adm, biggan, glide, midjourney, sdv14, sdv15, vqdm, wukong "
            "(or a GenImage archive folder name)."
        ),
    ],
    cache_dir: CacheDir = None,
    model: Model = None,
    device: Device = None,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Splits to index (repeat the option).")
    ] = None,
    timestep: Annotated[int | None, typer.Option(help="Diffusion timestep the latent is noised at.")] = None,
    ensemble: Ensemble = None,
    size: Size = None,
    preprocess: Preprocess = None,
    prompt: Annotated[str | None, typer.Option(help="Fixed text condition for the UNet.")] = None,
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="Per-image prompt, e.g. 'a photo of a {cls}', with the "
            "ImageNet class parsed from GenImage file names (reference)."
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Storage dtype of the maps: float16 or float32.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="Compute precision: {stages.extract:precision_help}.")
    ] = None,
    seed: Seed = None,
    pixels: Annotated[
        bool | None, typer.Option("--pixels/--no-pixels", help="Also store uint8 pixel crops.")
    ] = None,
    pixel_size: PixelSize = None,
    small_images: Annotated[
        str | None,
        typer.Option(
            help="Images smaller than the window: tile (LoL's stitching) or reflect (reflect-101 padding, "
            "the EGRE reference). Also the `--preprocess crop` geometry."
        ),
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(help="Images with more pixels are refused (decompression bombs).")
    ] = None,
    batch_size: LareBatchSize = None,
    rows_per_shard: RowsPerShard = None,
    loader_workers: Annotated[
        int | None, typer.Option(help="DataLoader decode workers, or {stages.extract:loader_workers_help}.")
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile", help="torch.compile the VAE encoder and UNet (GPU).")
    ] = None,
    progress: Progress = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="Run on a dask cluster of N workers started here (cuda: one per GPU)."
        ),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Run on an existing dask cluster, e.g. tcp://host:8786.")
    ] = None,
    perturb: PerturbSpec = None,
    perturb_only: PerturbOnly = None,
) -> None:
    """Index a GenImage subset and compute its LaRE maps and pixel crops into <cache-dir>/<subset>.zarr.

    Options not given take ExtractConfig's defaults (listed in the README's table)."""
    usable_device(device, here=not scheduler)  # a scheduler's workers, not this client, need the GPU
    compute = None
    if workers is not None or scheduler:
        from stages.extract_dask import cluster_compute

        compute = cluster_compute(workers, scheduler, log=log)
    from stages.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data_root=str(data_root),
        subset=subset,
        **given(
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
    run_extract(cfg, log=log, compute=compute)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to create the synthetic GenImage-layout set in.")],
    subset: Annotated[str, typer.Option(help="Which subset's folder names to use.")] = "sdv14",
    train: Annotated[int, typer.Option(help="Images per class in train.")] = 16,
    val: Annotated[int, typer.Option(help="Images per class in val.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the images (the same seed writes the same files).")] = 0,
    artifact: Annotated[
        str,
        typer.Option(
            help="What marks the generated images: upsample (from 1/4 resolution) or grid (8 px lines)."
        ),
    ] = "upsample",
) -> None:
    """Write a small synthetic set (generated = upsampled from low resolution) for demos and tests."""
    from stages.genimage.index import canonical_subset
    from stages.genimage.synthetic import ARTIFACTS, make_genimage

    if artifact not in ARTIFACTS:
        raise UserError(f"--artifact must be one of {', '.join(ARTIFACTS)}, not '{artifact}'")
    folder = make_genimage(
        out, canonical_subset(subset), {"train": train, "val": val}, seed, artifact=artifact
    )
    typer.echo(f"wrote {2 * (train + val)} images to {folder}")
