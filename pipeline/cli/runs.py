"""Making and using runs: `pipeline train`, `eval`, `calibrate`, `report` and `detect`.

Each command builds its stage's config (TrainConfig, EvalConfig, CalibrateConfig, DetectConfig) from
the options given and calls its `run_*`; the options not given keep the config's defaults."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from pipeline import runstore
from pipeline.cli.options import (
    METHOD_OPTIONS,
    Backbone,
    BackboneWeights,
    Checkpoint,
    CropSize,
    Device,
    Epoch,
    Epochs,
    ExtraCaches,
    Lare,
    LareBatchSize,
    Lr,
    MaxPerClass,
    Method,
    NoVerify,
    PerturbOnly,
    PerturbRead,
    Pixels,
    Progress,
    Seed,
    Threshold,
    TrainBatchSize,
    config,
    help_defaults,
    listed,
    results_on_stdout,
    usable_device,
    with_method_options,
)
from pipeline.errors import UserError

app = typer.Typer()


def _caches(option: list[str] | None, extra: list[str] | None) -> list[str]:
    """`--from-cache a b c` and `--from-cache a --from-cache b` both give [a, b, c]."""
    caches = [*(option or []), *(extra or [])]
    if not caches:
        raise UserError("give at least one cache: --from-cache cache/<subset>.zarr")
    return caches


@app.command(cls=with_method_options(help_defaults("stages.configs:TrainConfig"), after="backbone_weights"))
def train(
    ctx: typer.Context,
    extra_caches: ExtraCaches = None,
    from_cache: Annotated[
        list[str] | None, typer.Option("--from-cache", help="Cache(s) to train on (path or URL).")
    ] = None,
    method: Method = None,
    out: Annotated[str | None, typer.Option(help="Folder of run directories.")] = None,
    max_per_class: MaxPerClass = None,
    seed: Seed = None,
    epochs: Epochs = None,
    patience: Annotated[
        int | None, typer.Option(help="Stop after N epochs without a better validation AUC; 0: never.")
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of the training rows (per label, seeded) held out from the TRAIN split to pick "
            "the best epoch (and step EGRE's plateau schedule); no test split is ever read."
        ),
    ] = None,
    min_val_rows: Annotated[
        int | None,
        typer.Option(
            help="Validation rows per label the slice needs to choose the best epoch, stop early and step "
            "the plateau schedule; below it the last epoch is kept (an AUC of a few rows is noise)."
        ),
    ] = None,
    batch_size: TrainBatchSize = None,
    lr: Lr = None,
    crop_size: CropSize = None,
    backbone: Backbone = None,
    backbone_weights: BackboneWeights = None,
    shuffle_labels: Annotated[
        bool | None, typer.Option(help="Control: half of each class labelled generated.")
    ] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop after this epoch as if interrupted (rerun resumes).")
    ] = None,
    device: Device = None,
    memory_rows: Annotated[
        int | None,
        typer.Option(
            help="Training rows held in memory (about 200 KB each); more are streamed shard by shard."
        ),
    ] = None,
    loader_workers: Annotated[
        int | None,
        typer.Option(
            help="Processes reading cache shards, or {stages.configs:train_loader_workers_help}. "
            "Changes no bit of the run."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Training precision (bf16: autocast, fp32 master weights): "
            "{stages.configs:train_precision_help}. Part of the fingerprint."
        ),
    ] = None,
    perturb: PerturbRead = None,
    perturb_only: PerturbOnly = None,
    real_jpeg_quality: Annotated[
        int | None,
        typer.Option(help="Train on real images of this JPEG quality only (e.g. 96: the JPEG-96 control)."),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="The split training rows (and the validation slice) come from.")
    ] = None,
    generators: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated generators: train on their generated rows and the reals that go with "
            "them (`pipeline cache info` lists a cache's generators)."
        ),
    ] = None,
    no_verify: NoVerify = False,
    lare: Lare = None,
    pixels: Pixels = None,
    progress: Progress = None,
) -> None:
    """Train a detector from caches only; prints the run directory (named by its fingerprint).

    Options not given take TrainConfig's defaults or the method's (docs/training.md)."""
    options = {**locals(), **ctx.meta[METHOD_OPTIONS]}  # the method's own (with_method_options)
    usable_device(device)
    from stages.configs import TrainConfig
    from stages.runs import distributed
    from stages.train import run_train

    cfg = config(
        TrainConfig.from_options, options, skip=("ctx", "extra_caches", "from_cache", "no_verify"),
        shaped={"generators": listed}, caches=_caches(from_cache, extra_caches), verify=not no_verify,
    )  # fmt: skip
    from stages.runs import listing

    try:
        run = run_train(cfg)
    except Exception as e:  # the run directory (if there is one yet) says so to `pipeline runs`
        if distributed.world().main:
            listing.failed(e)
        raise
    if distributed.world().main:  # under torchrun: rank 0 speaks
        typer.echo(str(run))


@app.command("eval", cls=help_defaults("stages.configs:EvalConfig"))
def eval_(
    checkpoint: Checkpoint,
    extra_caches: ExtraCaches = None,
    from_cache: Annotated[
        list[str] | None, typer.Option("--from-cache", help="Test cache(s); each is evaluated apart.")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Folder for <run>__<subset>-<key>.csv/.json.")] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="Which split of the test caches to score (auto: test if a cache has one, else val)."
        ),
    ] = None,
    epoch: Epoch = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per model call.")] = None,
    device: Device = None,
    perturb: PerturbRead = None,
    perturb_only: PerturbOnly = None,
    no_verify: NoVerify = False,
    lare: Lare = None,
    pixels: Pixels = None,
    threshold: Threshold = None,
    progress: Progress = None,
) -> None:
    """Score every usable row of each test cache: ACC, real/generated ACC and real FPR at the threshold;
    AP, ROC AUC, TPR at FPR 1%/5%, ECE (whole set); a reliability diagram PNG beside each result."""
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device)
    from stages.configs import EvalConfig
    from stages.evaluate import run_eval

    cfg = config(
        EvalConfig, options, skip=("extra_caches", "from_cache", "no_verify"),
        caches=_caches(from_cache, extra_caches), verify=not no_verify,
    )  # fmt: skip
    # a URL: checked, read into a temp folder; the lines eval says are its results
    with runstore.opened(cfg.checkpoint, cfg.epoch) as local, results_on_stdout():
        run_eval(replace(cfg, checkpoint=local))


@app.command(cls=help_defaults("stages.configs:CalibrateConfig"))
def calibrate(
    checkpoint: Checkpoint,
    from_cache: Annotated[
        list[str] | None,
        typer.Option(
            "--from-cache", help="Where its training caches are now (default: the paths it recorded)."
        ),
    ] = None,
    device: Device = None,
    no_verify: NoVerify = False,
) -> None:
    """Recompute a run's calibrated thresholds from its validation slice (runs trained before
    `train` wrote calibration.json). Prints the thresholds."""
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device)
    from stages.calibrate import run_calibrate
    from stages.configs import CalibrateConfig
    from stages.runs.calibrate import FILE

    cfg = config(
        CalibrateConfig, options, skip=("from_cache", "no_verify"), caches=from_cache or None,
        verify=not no_verify,
    )  # fmt: skip
    runstore.require_writable(checkpoint, "pipeline calibrate")
    with runstore.opened(checkpoint, "best") as local:
        record = run_calibrate(replace(cfg, checkpoint=local))
        if runstore.local_dir(checkpoint) is None:  # a URL: the new files go back, the manifest last
            runstore.copy_run(str(local), checkpoint, progress=False, origin=checkpoint)
    for name, value in record["thresholds"].items():
        typer.echo(f"{name}: {value:.6g}")
    typer.echo(f"wrote {checkpoint.rstrip('/')}/{FILE}")


@app.command(cls=help_defaults())
def report(
    results: Annotated[Path, typer.Argument(help="Folder of `pipeline eval` results.")],
    out: Annotated[Path | None, typer.Option(help="Heatmap PNG to write (e.g. results/matrix.png).")] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="acc, ap, auc, tpr_at_fpr1, tpr_at_fpr5, ece, real_acc, generated_acc or real_fpr."
        ),
    ] = "acc",
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="The table as CSV (fractions, rows per cell).")
    ] = None,
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


@app.command(cls=help_defaults("stages.configs:DetectConfig"))
def detect(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively) or one image.")],
    checkpoint: Checkpoint,
    out: Annotated[
        Path | None,
        typer.Option(help="CSV of path, score, decision, error, and the run, epoch and threshold used."),
    ] = None,
    threshold: Threshold = None,
    epoch: Epoch = None,
    device: Device = None,
    batch_size: LareBatchSize = None,
    progress: Progress = None,
) -> None:
    """Score any folder of images with a trained run; unreadable files are listed with a reason."""
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device)
    from stages.configs import DetectConfig
    from stages.detect import run_detect
    from stages.runs import distributed

    cfg = config(DetectConfig, options)
    with runstore.opened(cfg.checkpoint, cfg.epoch) as local:  # a URL: checked, read into a temp folder
        scored, failed = run_detect(replace(cfg, checkpoint=local))
    if distributed.world().main:
        typer.echo(f"scored {scored} image(s), {failed} unreadable -> {cfg.out}")
