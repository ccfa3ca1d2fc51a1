"""What each command takes: its config dataclass, the one place each default is written, with the
checks of its values and the rules its --help states (precision, loader workers).

Torch-free (tests/pipeline/test_cli.py holds it), like transformers' configuration_*.py beside its
modeling_*.py: `pipeline <command> --help` reads its defaults here in a fraction of a second. The
commands' modules (stages.extract, stages.train, ...) take these and compute; the CLI builds them
from the parsed options in one step (pipeline.cli.options.config).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from pipeline.config import (
    DEFAULT_DEVICE,
    describe_loader_workers,
    describe_precision,
    resolve_precision,
)
from pipeline.errors import UserError
from stages.detectors import method as method_registry
from stages.detectors.method import Hparams
from stages.features import params
from stages.features import pixels as pixels_stage
from stages.features.params import DEFAULT_PROMPT
from stages.features.perturb_spec import Perturbation, requested
from stages.genimage import index as index_stage
from stages.genimage import layouts
from stages.runs import calibrate, choice

# ---- pipeline extract -------------------------------------------------------------------------
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD v1.5, the reference's (REFERENCE_NOTES.md)
STORE_DTYPES = ("float16", "float32")
# The most decode workers per GPU (see pipeline.config.loader_workers). Measured on an H100 host: 8
# workers decode about 700 JPEG (500x375) or 290 PNG (512x512) images/s, below what the GPU computes
# at 256 px, so the GPU path takes nearly every core.
DECODE_WORKERS = 16
# --precision (pipeline.config.resolve_precision): any precision LaRE has dtypes for; `auto` is fp16 on
# CUDA, within 5e-3 of fp32 (tests/stages/features/test_lare.py).
EXTRACT_PRECISIONS = params.PRECISIONS
EXTRACT_ON_CUDA = "fp16"


def extract_precision_help() -> str:
    """extract's --precision rule, said with the arguments ExtractConfig.resolved_precision passes."""
    return describe_precision(EXTRACT_PRECISIONS, EXTRACT_ON_CUDA)


def extract_loader_workers_help() -> str:
    """extract's --loader-workers rule, said with the `most` extraction passes (its --help)."""
    return describe_loader_workers(DECODE_WORKERS)


@dataclass
class ExtractConfig:
    """Everything `pipeline extract` takes. Which fields decide values is said in `lare_params`."""

    data_root: str | None = None  # a GenImage root (with `subset`) or a labelled-folder root
    subset: str | None = None  # a GenImage subset: the dataset and its name
    cache_dir: str = "cache"
    model: str = DEFAULT_MODEL
    # split folders to index (all when None; GenImage: train and val); one value is also the split
    # of files that name none (else `test`)
    splits: tuple[str, ...] | None = None
    dataset: str | None = None  # the name of a dataset given by `data_root`, `pairs` or `manifest`
    pairs: tuple[tuple[str, str], ...] = ()  # (REAL_DIR, FAKE_DIR[=GENERATOR])
    manifest: str | None = None
    generator: str | None = None  # the generator of every labelled-folder file
    real_names: tuple[str, ...] = layouts.REAL_NAMES
    fake_names: tuple[str, ...] = layouts.FAKE_NAMES
    timestep: int = 200
    ensemble: int = 4
    size: int = 256
    preprocess: str = "resize"
    prompt: str = DEFAULT_PROMPT
    prompt_template: str | None = None
    dtype: str = "float16"
    precision: str = "auto"  # see extract_precision_help
    seed: int = 0
    pixels: bool = True
    pixel_size: int = 256
    # the pixel crop (and `crop` LaRE geometry) of images smaller than the window
    small_images: str = pixels_stage.SMALL_IMAGES[0]
    max_pixels: int = pixels_stage.DEFAULT_MAX_PIXELS
    batch_size: int = 16
    rows_per_shard: int = 512
    device: str = DEFAULT_DEVICE
    loader_workers: int = -1  # -1: automatic (extract_loader_workers_help); decoding must outrun a GPU
    compile: bool = False  # torch.compile the VAE encoder and the UNet (last bits only, like batch size)
    progress: bool = True
    perturb: str | None = (
        None  # a stages.features.perturb SPEC applied to the decoded image before the geometry
    )
    perturb_only: str | None = None  # "generated" or "real": perturb that class only

    def source(self) -> index_stage.DataSource:
        """Which files, named how: the one data option given (`--subset` with `--data-root`, or
        `--dataset NAME` with `--data-root`, `--pair` or `--manifest`)."""
        named = [o for o, v in (("--pair", self.pairs), ("--manifest", self.manifest)) if v]
        if self.subset is not None:
            if self.dataset is not None or named:
                raise UserError(
                    "--subset is a GenImage subset and names its cache: give it alone with --data-root"
                )
            if self.data_root is None:
                raise UserError("--subset needs --data-root, the folder holding GenImage's subsets")
            return index_stage.DataSource.genimage(
                self.data_root, self.subset, self.splits or index_stage.SPLITS
            )
        if self.data_root is not None:
            named.insert(0, "--data-root")
        if len(named) != 1:
            raise UserError(
                "give the data one way: --subset NAME --data-root DIR (GenImage), or --dataset NAME with "
                "one of --data-root DIR, --pair REAL_DIR FAKE_DIR[=GENERATOR], --manifest FILE "
                f"(given: {', '.join(named) or 'none'})"
            )
        if self.dataset is None:
            raise UserError(f"{named[0]} needs --dataset NAME: the cache is <cache-dir>/NAME.zarr")
        if self.generator is not None and named[0] != "--data-root":
            raise UserError("--generator names the generator of labelled folders (--data-root) only")
        kind = {"--data-root": "folders", "--pair": "pairs", "--manifest": "manifest"}[named[0]]
        return index_stage.DataSource(
            self.dataset, kind, self.data_root, self.pairs, self.manifest, self.splits, None,
            self.generator, self.real_names, self.fake_names,
        )  # fmt: skip

    def perturbation(self) -> Perturbation | None:
        """The `perturb` param of both artifacts: SPEC (canonical), class, seed; None when clean."""
        return requested(self.perturb, self.perturb_only, self.seed)

    def check(self) -> None:
        if self.preprocess not in params.PREPROCESS:
            choices = ", ".join(params.PREPROCESS)
            raise UserError(f"--preprocess must be one of {choices}, not '{self.preprocess}'")
        if self.small_images not in pixels_stage.SMALL_IMAGES:
            choices = ", ".join(pixels_stage.SMALL_IMAGES)
            raise UserError(f"--small-images must be one of {choices}, not '{self.small_images}'")
        if self.dtype not in STORE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, not '{self.dtype}'")
        self.resolved_precision("cpu")  # checks the name
        if not 0 <= self.timestep < 1000:
            raise UserError(f"--timestep must be in [0, 1000), not {self.timestep}")
        for name in ("ensemble", "size", "pixel_size", "batch_size", "rows_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.prompt_template is not None and "{cls}" not in self.prompt_template:
            raise UserError("--prompt-template must contain '{cls}', e.g. 'a photo of a {cls}'")
        self.perturbation()

    def resolved_precision(self, device: str) -> str:
        """The compute precision on `device` (pipeline.config's rule: see extract_precision_help)."""
        return resolve_precision(self.precision, device, EXTRACT_PRECISIONS, on_cuda=EXTRACT_ON_CUDA)


# ---- pipeline train ---------------------------------------------------------------------------
# Validation rows of EACH label below which the slice cannot choose an epoch. The AUC of n real +
# n generated rows has a standard error of about 0.03 at n = 50 and AUC 0.9 (Hanley & McNeil 1982),
# below the differences between a model's epochs late in training; at n = 10 it is 0.07, at n = 2
# the AUC takes only the values 0, 0.25, 0.5, 0.75 and 1, and the "best" epoch is drawn at random.
MIN_VAL_ROWS = 50
TRAIN_PRECISIONS = ("fp32", "bf16")  # bf16: autocast, the master weights stay fp32
TRAIN_ON_CUDA = "bf16"  # `auto` on CUDA: tensor cores
# The most cache-reading processes on a GPU (see pipeline.config.loader_workers): a process reads
# roughly 1,000-2,000 rows/s of 256 px crops (bench/train_io.py), enough to outrun it.
READ_WORKERS = 8


@dataclass
class TrainConfig:
    caches: list[str]
    method: str = "egre"
    out: str = "runs"
    max_per_class: int | str | None = None  # None: the method's default; 'all': every training row
    seed: int = 0
    epochs: int | None = None  # None: the method's default (see egre_method.DEFAULTS, lol_method.DEFAULTS)
    patience: int | None = None  # epochs without a new best before stopping; 0: never; None: default
    val_fraction: float = 0.05  # of the training rows, per label, held out from the train split
    min_val_rows: int = MIN_VAL_ROWS  # per label, for the slice to choose epochs (else: the last epoch)
    batch_size: int | None = None
    lr: float | None = None
    crop_size: int = 224
    backbone: str = "RN50"
    backbone_weights: str = "openai"  # 'openai', 'random', or a local open_clip checkpoint file
    # the method's own options given, by name (its module declares them, defaults too: lol_method.Options)
    method_options: dict[str, Any] = field(default_factory=dict)
    shuffle_labels: bool = False  # a control: uninformative labels (see train.uninformative_labels)
    verify: bool = True
    progress: bool = True
    device: str = DEFAULT_DEVICE  # where it trains; not in the fingerprint (last bits only, like batch order)
    stop_after: int | None = None  # stop after this epoch as if interrupted (tests); not in the fingerprint
    # Micro-batches per process that each global batch is cut into, gradients accumulated: one process
    # with N of them is the reference that N torchrun processes (1 each) equal (docs/training.md).
    micro_batches: int = 1
    memory_rows: int = 16384  # up to this many training rows are held in memory; more are streamed
    # cache-reading processes (-1: automatic, train_loader_workers_help). Changes no bit.
    loader_workers: int = -1
    precision: str = "auto"  # see train_precision_help
    lare: str | None = None  # --lare / --pixels: which artifact of each cache (see choice.Choice)
    pixels: str | None = None
    perturb: str | None = None  # train on the artifacts extracted with this --perturb SPEC (None: clean)
    perturb_only: str | None = None  # ... and this --perturb-only class
    real_jpeg_quality: int | None = None  # real rows of this JPEG quality only (the JPEG-96 control)
    split: str = "train"  # the split the rows come from (the validation slice too)
    generators: tuple[str, ...] | None = None  # these generators' rows and their reals (None: all)

    @classmethod
    def from_options(cls, **options: Any) -> TrainConfig:
        """A TrainConfig of flat options, as a user or a study's plan names them: a method's own
        options (LoL's mask_range) beside the TrainConfig fields go to `method_options`."""
        own = {f.name for f in fields(cls)}
        method_options = {k: v for k, v in options.items() if k not in own}
        return cls(**{k: v for k, v in options.items() if k in own}, method_options=method_options)

    def hparams(self, subsets: set[str]) -> Hparams:
        """The hyper-parameters of a run on caches of `subsets`: the options, else the method's defaults."""
        method = method_registry.get(self.method)
        for name in ("epochs", "batch_size", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"--patience must be 0 (never stop early) or more, not {self.patience}")
        if not 0 < self.val_fraction < 1:
            raise UserError(
                f"--val-fraction must lie strictly between 0 and 1 (a validation slice and training rows "
                f"are both needed), not {self.val_fraction}"
            )
        d = method.defaults
        (only,) = subsets if len(subsets) == 1 else (None,)
        hp: Hparams = {
            "epochs": self.epochs or d["epochs"],
            "patience": d["patience"] if self.patience is None else self.patience,
            "batch_size": self.batch_size or d["batch_size"],
            "lr": self.lr or d.get("lr_by_subset", {}).get(only, d["lr"]),
            "betas": list(d["betas"]),
            "grad_clip": d["grad_clip"],
            "plateau": d["plateau"],
            "val_fraction": self.val_fraction,
            "min_val_rows": self.min_val_rows,
            "crop_size": self.crop_size,
            "max_per_class": per_class(self.max_per_class, d["max_per_class"]),
            "shuffle_labels": self.shuffle_labels,
            "memory_rows": self.memory_rows,
            "real_jpeg_quality": self.real_jpeg_quality,
        }
        # which rows, recorded (and hashed) only when not the whole train split: the runs of before
        # these options keep their fingerprints
        if self.split != "train":
            hp["split"] = self.split
        if self.generators:
            hp["generators"] = sorted(set(self.generators))
        if self.min_val_rows < 1:
            raise UserError(f"--min-val-rows must be at least 1, not {self.min_val_rows}")
        if self.real_jpeg_quality is not None and not 1 <= self.real_jpeg_quality <= 100:
            raise UserError(f"--real-jpeg-quality must be in 1..100, not {self.real_jpeg_quality}")
        hp = cast(Hparams, {**hp, **method.own_hparams(self.method_options)})  # Hparams lists them
        if self.loader_workers < -1:
            raise UserError(
                f"--loader-workers must be -1 (automatic) or at least 0, not {self.loader_workers}"
            )
        if self.crop_size % 32:
            raise UserError(
                f"--crop-size must be a multiple of 32 (the ResNet's stride), not {self.crop_size}"
            )
        return hp


def per_class(value: int | str | None, default: int | None) -> int | None:
    """--max-per-class: a positive number, 'all' (None: every row), or None for the method's default."""
    if value is None:
        return default
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--max-per-class takes a positive number or 'all', not '{value}'") from None
    if n <= 0:
        raise UserError(f"--max-per-class must be positive (or 'all'), not {value}")
    return n


def train_precision_help() -> str:
    """train's --precision rule, said with the arguments stages.train.resolve_precision passes."""
    return describe_precision(TRAIN_PRECISIONS, TRAIN_ON_CUDA)


def train_loader_workers_help() -> str:
    """train's --loader-workers rule, said with the `most` training passes (its --help)."""
    return describe_loader_workers(READ_WORKERS)


# ---- pipeline eval, calibrate, detect ---------------------------------------------------------
@dataclass
class EvalConfig:
    """Everything `pipeline eval` takes; the defaults here are the command's.

    `epoch` picks the weights: best (by the run's validation slice), last, a number, or last5: each
    of the final five epochs scored apart, the metrics reported as mean and std over them (LoL's
    protocol; std is numpy's, ddof 0). In each cache, the artifacts the run was trained on are read
    by default (`lare`/`pixels` selectors choose others, see choice.Choice), from an index that
    covers `split`; `perturb`, `perturb_only`: the test artifacts extracted with that `--perturb`
    (None: clean). `threshold`: 0.5, a number, or a threshold calibrated on the run's validation
    slice (fpr1, fpr5, balanced; see stages.runs.calibrate); the result records which.
    """

    checkpoint: str | Path  # a finished run directory
    caches: list[str]  # test caches, each evaluated apart
    out: str | Path = "results"
    split: str = choice.AUTO  # test where a cache has a test split, else val (GenImage's test set)
    epoch: str | int = "best"
    threshold: str | float = calibrate.DEFAULT
    batch_size: int = 64
    device: str = DEFAULT_DEVICE
    lare: str | None = None
    pixels: str | None = None
    perturb: str | None = None
    perturb_only: str | None = None
    verify: bool = True
    progress: bool = True


@dataclass
class CalibrateConfig:
    """Everything `pipeline calibrate` takes; the defaults here are the command's."""

    checkpoint: str | Path  # a finished run directory
    caches: list[str] | None = None  # where its training caches are now (None: the URLs it recorded)
    device: str = DEFAULT_DEVICE
    verify: bool = True


@dataclass
class DetectConfig:
    """Everything `pipeline detect` takes; the defaults here are the command's.

    `epoch`: the weights used, best (by the run's validation slice), last or a number. `threshold`:
    0.5, a number, fpr1, fpr5 or balanced (calibrated on the run's validation slice)."""

    folder: str | Path  # images, searched recursively, or one image
    checkpoint: str | Path  # a finished run directory
    out: str | Path = "scores.csv"
    threshold: str | float = calibrate.DEFAULT
    epoch: str | int = "best"
    batch_size: int = 16
    device: str = DEFAULT_DEVICE  # where the backbone and (EGRE) the LaRE model run
    progress: bool = True


# ---- the studies: pipeline robustness, pipeline reproduce --------------------------------------
@dataclass
class RobustnessConfig:
    """What `pipeline robustness` takes: the study, and the usual extraction and training options."""

    data_root: str
    train_subset: str
    test_subsets: list[str]
    grid: str = "lol-a4"
    method: str = "lol"
    out: str = "results/robustness"
    extract: dict = field(default_factory=dict)  # ExtractConfig fields (model, device, cache_dir, ...)
    train: dict = field(default_factory=dict)  # TrainConfig fields (backbone, epochs, crop_size, ...)
    progress: bool = True


@dataclass
class ReproduceConfig:
    """What `pipeline reproduce` takes: the table, the data, and the usual extraction and training options."""

    table: str
    data_root: str
    out: str = "results/reproduce"
    subsets: list[str] | None = None  # test subsets (None: the eight); lol-table1 also trains on each
    scale: float = 1.0  # fraction of the paper's training images per class
    extract: dict = field(default_factory=dict)  # ExtractConfig fields (model, device, cache_dir, ...)
    train: dict = field(default_factory=dict)  # TrainConfig fields (backbone, epochs, crop_size, ...)
    progress: bool = True

    def tests(self) -> list[str]:
        if self.subsets is None:
            return list(index_stage.SUBSETS)
        tests = list(dict.fromkeys(index_stage.canonical_subset(s) for s in self.subsets))
        if not tests:
            raise UserError("--subsets: give at least one subset")
        return tests

    def per_class(self, images_per_class: int) -> int:
        return max(1, round(images_per_class * self.scale))

    def deviations(self) -> list[str]:
        """What differs from the paper's protocol: the label of a cheaper (or other) version."""
        out = []
        if self.subsets is not None:
            out.append(f"subsets {', '.join(self.tests())} (the paper: all eight)")
        if self.scale != 1:
            out.append(f"--scale {self.scale:g}: {self.scale:g} x the paper's training images per class")
        for k, v in sorted(self.train.items()):
            if k not in ("device", "seed"):
                out.append(f"--{k.replace('_', '-')} {v}" + (" (in every run)" if k == "backbone" else ""))
        model = self.extract.get("model")
        if model is not None and model != DEFAULT_MODEL:
            out.append(f"--model {model} (the reference: {DEFAULT_MODEL})")
        out += [
            f"--{k.replace('_', '-')} {v}"
            for k, v in sorted(self.extract.items())
            if k in ("size", "pixel_size", "preprocess", "ensemble", "timestep")
        ]
        return out
