"""Making data: `pipeline extract` (a GenImage subset into a cache) and `pipeline synth` (a small
synthetic set in GenImage's layout, for demos and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import (
    CacheDir,
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
    config,
    help_defaults,
    listed,
    split_pair,
    two_valued,
    usable_device,
)
from pipeline.errors import UserError

app = typer.Typer()


@app.command(
    cls=two_valued(
        help_defaults(
            "stages.configs:ExtractConfig",
            split="stages.configs:ExtractConfig.splits",
            pair="stages.configs:ExtractConfig.pairs",
        ),
        "--pair",
        "REAL_DIR FAKE_DIR[=GENERATOR]",
    )
)
def extract(
    data_root: Annotated[
        Path | None,
        typer.Option(
            "--data-root",
            help="Folder of the images: GenImage's subsets (with --subset), or labelled folders (with "
            "--dataset): a file's label is its nearest folder named as --real-names / --fake-names say.",
        ),
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(
            help="A GenImage subset: adm, biggan, glide, midjourney, sdv14, sdv15, vqdm, wukong "
            "(or a GenImage archive folder name); its cache is <cache-dir>/<subset>.zarr."
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Name of any other dataset (letters, digits, -_.): its cache is <cache-dir>/<NAME>.zarr; "
            "with --data-root, --pair or --manifest."
        ),
    ] = None,
    pair: Annotated[
        list[str] | None,
        typer.Option(
            "--pair",
            metavar="REAL_DIR FAKE_DIR[=GENERATOR]",
            help="Every file of a folder takes its label; repeat the option: one real "
            "folder may serve several generators (indexed once).",
        ),
    ] = None,
    manifest: Annotated[
        str | None,
        typer.Option(
            help="CSV, TSV or JSONL: path (or filename) relative to its folder, label (0/1, real/fake, "
            "nature/ai; absent: generator != real), optional split and generator (or typ, model_name).",
        ),
    ] = None,
    generator: Annotated[
        str | None,
        typer.Option(help="Generator of every labelled-folder file (else the first folder above the label)."),
    ] = None,
    real_names: Annotated[
        str | None, typer.Option(help="Comma-separated folder names of real images (case-insensitive).")
    ] = None,
    fake_names: Annotated[
        str | None, typer.Option(help="Comma-separated folder names of generated images (case-insensitive).")
    ] = None,
    cache_dir: CacheDir = None,
    model: Model = None,
    device: Device = None,
    split: Annotated[
        list[str] | None,
        typer.Option(
            "--split",
            help="Split folders (train, val, test) to index, repeatable; one value is also the split of "
            "files in no split folder (else test).",
        ),
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
        str | None, typer.Option(help="Compute precision: {stages.configs:extract_precision_help}.")
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
        int | None,
        typer.Option(help="DataLoader decode workers, or {stages.configs:extract_loader_workers_help}."),
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
    """Index a dataset and compute its LaRE maps and pixel crops into <cache-dir>/<name>.zarr.

    The data one way: --subset S --data-root DIR (GenImage), or --dataset NAME with --data-root DIR
    (labelled folders), --pair REAL_DIR FAKE_DIR[=GENERATOR] (repeatable) or --manifest FILE.

    Options not given take ExtractConfig's defaults (listed in the README's table)."""
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device, here=not scheduler)  # a scheduler's workers, not this client, need the GPU
    compute = None
    if workers is not None or scheduler:
        from stages.extract_dask import cluster_compute

        compute = cluster_compute(workers, scheduler)
    from stages.configs import ExtractConfig
    from stages.extract import run_extract

    cfg = config(
        ExtractConfig, options, skip=("workers", "scheduler"), renamed={"pair": "pairs", "split": "splits"},
        shaped={"data_root": str, "pair": _pairs, "split": _splits, "real_names": _names,
                "fake_names": _names},
    )  # fmt: skip
    run_extract(cfg, compute=compute)


def _names(text: str) -> tuple[str, ...]:
    names = listed(text)
    if names is None:
        raise UserError("--real-names / --fake-names take comma-separated folder names")
    return names


def _pairs(tokens: list[str]) -> tuple[tuple[str, str], ...] | None:
    return tuple(split_pair(t) for t in tokens) or None


def _splits(splits: list[str]) -> tuple[str, ...] | None:
    return tuple(splits) or None


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
