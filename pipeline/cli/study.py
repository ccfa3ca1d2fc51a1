"""`pipeline robustness` and `pipeline reproduce`: a whole study, or a paper's table, in one command.
Their extraction and training options are the very options of extract and train (pipeline.cli.options),
passed on to their configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from pipeline.cli.options import (
    Backbone,
    BackboneWeights,
    CacheDir,
    CropSize,
    DataRoot,
    Device,
    Ensemble,
    Epochs,
    ExtractBatchSize,
    Lr,
    MaxPerClass,
    Method,
    Model,
    PixelSize,
    Preprocess,
    Progress,
    RowsPerShard,
    Seed,
    Size,
    TrainBatchSize,
    config,
    given,
    help_defaults,
    usable_device,
)

app = typer.Typer()
T = TypeVar("T")

EXTRACT_OPTIONS = ("cache_dir", "model", "device", "size", "pixel_size", "preprocess", "ensemble",
                   "extract_batch_size", "rows_per_shard", "seed")  # fmt: skip
TRAIN_OPTIONS = ("backbone", "backbone_weights", "epochs", "lr", "batch_size", "crop_size", "max_per_class",
                 "seed", "device")  # fmt: skip


def study_config(
    make: Callable[..., T],
    options: dict[str, Any],
    *,
    skip: tuple[str, ...] = (),
    shaped: dict[str, Callable[[Any], Any]] | None = None,
    **fields: Any,
) -> T:
    """A study command's config (`make`, pipeline.cli.options.config) of its parsed options: its
    extraction and training options, those the user gave, as the ExtractConfig and TrainConfig fields
    of its `extract` and `train`; the others its own fields."""
    return config(
        make, options, skip={*skip, *EXTRACT_OPTIONS, *TRAIN_OPTIONS}, shaped=shaped, **fields,
        extract=given(options, only=EXTRACT_OPTIONS, renamed={"extract_batch_size": "batch_size"}),
        train=given(options, only=TRAIN_OPTIONS),
    )  # fmt: skip


@app.command(
    cls=help_defaults(
        "stages.configs:RobustnessConfig",
        "stages.configs:TrainConfig",
        "stages.configs:ExtractConfig",
        extract_batch_size="stages.configs:ExtractConfig.batch_size",
    )
)
def robustness(
    data_root: DataRoot,
    test_subsets: Annotated[
        list[str],
        typer.Option("--test-subsets", help="Subsets to test on: 'adm,biggan' or the option repeated."),
    ],
    train_subset: Annotated[str, typer.Option(help="The subset detectors are trained on.")] = "sdv14",
    grid: Annotated[
        str | None, typer.Option(help="lol-a4, lol-a4-frank, lol-a7, genimage, aigcdetect or jpeg96.")
    ] = None,
    method: Method = None,
    out: Annotated[str | None, typer.Option(help="Folder for runs/, results/, the CSV and figures.")] = None,
    cache_dir: CacheDir = None,
    model: Model = None,
    device: Device = None,
    size: Size = None,
    pixel_size: PixelSize = None,
    preprocess: Preprocess = None,
    ensemble: Ensemble = None,
    extract_batch_size: ExtractBatchSize = None,
    rows_per_shard: RowsPerShard = None,
    seed: Seed = None,
    backbone: Backbone = None,
    backbone_weights: BackboneWeights = None,
    epochs: Epochs = None,
    batch_size: TrainBatchSize = None,
    lr: Lr = None,
    crop_size: CropSize = None,
    max_per_class: MaxPerClass = None,
    progress: Progress = None,
) -> None:
    """A robustness or format-bias study: extract what is missing, train, evaluate; CSV and figures."""
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device)
    from stages import robustness
    from stages.configs import RobustnessConfig

    cfg = study_config(
        RobustnessConfig, options, data_root=str(data_root),
        test_subsets=[s for item in test_subsets for s in item.split(",") if s.strip()],
    )  # fmt: skip
    robustness.grid(cfg.grid)  # a bad --grid fails before anything is computed
    csv_path, figures = robustness.run_robustness(cfg)
    typer.echo(f"wrote {csv_path}")
    for f in figures:
        typer.echo(f"wrote {f}")


@app.command(
    cls=help_defaults(
        "stages.configs:ReproduceConfig",
        "stages.configs:TrainConfig",
        "stages.configs:ExtractConfig",
        extract_batch_size="stages.configs:ExtractConfig.batch_size",
    )
)
def reproduce(
    table: Annotated[
        str, typer.Argument(help="lol-table1, lol-table2, lol-table3, lare2 or lare2-reference.")
    ],
    data_root: DataRoot,
    out: Annotated[
        str | None, typer.Option(help="Folder for runs/, results/ and <TABLE>.md/.csv/.png.")
    ] = None,
    subsets: Annotated[
        str | None,
        typer.Option(help="Test subsets (lol-table1 also trains on each): 'sdv14,adm'; default all eight."),
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Train on this fraction of the paper's images per class (cheaper).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (what is done, what is left) and a time estimate."),
    ] = False,
    cache_dir: CacheDir = None,
    model: Model = None,
    device: Device = None,
    size: Size = None,
    pixel_size: PixelSize = None,
    preprocess: Preprocess = None,
    ensemble: Ensemble = None,
    extract_batch_size: ExtractBatchSize = None,
    rows_per_shard: RowsPerShard = None,
    seed: Seed = None,
    backbone: Backbone = None,
    backbone_weights: BackboneWeights = None,
    epochs: Epochs = None,
    batch_size: TrainBatchSize = None,
    lr: Lr = None,
    crop_size: CropSize = None,
    progress: Progress = None,
) -> None:
    """A paper's table: extract what is missing, train, evaluate; ours beside the paper's (md, csv, png).

    The table's protocol comes before the defaults shown: the class prompt and a 512 px --pixel-size,
    each run's backbone, mask ranges and training images; an option given here applies to every run.
    """
    options = dict(locals())  # the parsed options, before any other name is bound
    usable_device(device)
    from stages.configs import ReproduceConfig
    from stages.reproduce import plan_text, protocol_of, run_reproduce

    cfg = study_config(
        ReproduceConfig, options, skip=("dry_run",), data_root=str(data_root),
        shaped={"subsets": lambda text: [s for s in text.split(",") if s.strip()]},
    )  # fmt: skip
    protocol_of(cfg)  # a bad TABLE or --scale fails before anything is computed
    cfg.tests()
    if dry_run:
        typer.echo(plan_text(cfg))
        return
    for path in run_reproduce(cfg):
        typer.echo(f"wrote {path}")
