"""`pipeline robustness`: one command for a robustness or format-bias study over perturbed caches.

A grid is a list of conditions, each a perturbation of the training data and one of the test data
(`stages.features.perturb` SPECs). The command extracts every (subset, perturbation) cache artifact that is
missing (a complete one of the same parameters from an index covering the split it needs, such as a
`pipeline extract` of the whole subset, is reused: extract.covering_artifacts), trains one detector
per distinct training condition, evaluates each condition on every test subset, and writes a CSV and
figures. Every step is named by its fingerprint, so a rerun after a kill
redoes nothing that finished.

Grids, and the source each follows (`stages.features.perturb` says how each family computes):
  lol-a4        each of LoL's four perturbations alone, on train and test (Table A4), as LoL's TEXT
                states them (Appendix A; docs/REFERENCE_NOTES.md, "Robustness"): noise variance U(5, 20),
                blur kernel 3-9 with OpenCV's formula for its sigma, JPEG U(10, 75), a random crop of
                5-20% of each dimension (the text says "per side")
  lol-a4-frank  the same four, and Frank's `combined` (one of the four per image), as the code of
                Frank et al. (2020) runs them, which LoL cites: each image perturbed with probability
                0.5, noise std U(5, 20), blur sigma 4, JPEG always 95, a centred crop, OpenCV cubic
  lol-a7        the four in sequence, noise -> blur -> JPEG -> crop, on train and test (Figure A7)
  genimage      test only: downscale to 112 and 64 px and back to size, JPEG 65 and 30, blur sigma 3
                and 5 (GenImage's degradation code was not found: the filters are ours)
  aigcdetect    test only, as AIGCDetectBenchmark's test code runs it: JPEG 95 (Pillow), scipy's
                Gaussian blur sigma 1, half size then back to a shorter side of 256 (bilinear)
  jpeg96        the JPEG-96 control of "Fake or JPEG?": real training images of quality 96 only and
                generated images JPEG'd at 96, in training and at test
Every grid has the clean condition as its first row, the baseline the others are read against.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DEFAULT_DEVICE
from pipeline.errors import UserError
from stages.configs import EvalConfig, ExtractConfig, RobustnessConfig, TrainConfig
from stages.evaluate import run_eval
from stages.extract import run_extract_covering
from stages.genimage import index as index_stage
from stages.runs.results import EvalResult
from stages.train import run_train

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

A4 = {"noise": "noise:5-20", "blur": "blur:3,5,7,9", "jpeg": "jpeg:10-75", "crop": "crop:5-20"}
FRANK = {f: f"frank:{f}" for f in ("noise", "blur", "jpeg", "crop", "combined")}
# The CSV's metric columns, chosen from report.METRICS (the one list of what a result holds): the
# papers' ACC and AP, and the accuracy on each class.
COLUMNS = ("acc", "ap", "real_acc", "generated_acc")


@dataclass(frozen=True)
class Condition:
    """One row of a study: what the training and the test data went through."""

    name: str  # the row's label
    family: str  # which severity plot it belongs to ("clean" belongs to all of them)
    level: str  # its x-axis label in that plot
    train: str | None = None  # SPEC of the training data (None: clean)
    test: str | None = None  # SPEC of the test data
    only: str | None = None  # --perturb-only, for both
    real_jpeg_quality: int | None = None  # training restricted to real images of this JPEG quality

    @property
    def training(self) -> tuple:
        return self.train, self.only if self.train else None, self.real_jpeg_quality


CLEAN = Condition("clean", "clean", "clean")


@dataclass(frozen=True)
class Record:
    """One evaluation of a study: a condition's detector on one test subset."""

    condition: Condition
    subset: str
    result: EvalResult


def _both(family: str, spec: str, level: str) -> Condition:
    return Condition(f"{family} {level}", family, level, train=spec, test=spec)


def _test(family: str, spec: str, level: str) -> Condition:
    return Condition(f"{family} {level} (test)", family, level, test=spec)


GRIDS: dict[str, list[Condition]] = {
    "lol-a4": [CLEAN, *(_both(f, s, s.split(":")[1]) for f, s in A4.items())],
    "lol-a4-frank": [CLEAN, *(_both(f, s, "Frank") for f, s in FRANK.items())],
    "lol-a7": [
        CLEAN,
        Condition("noise+blur+jpeg+crop", "chain", "A7", "+".join(A4.values()), "+".join(A4.values())),
    ],
    "genimage": [
        CLEAN,
        _test("resize", "genimage:lowres=112", "112px"),
        _test("resize", "genimage:lowres=64", "64px"),
        _test("jpeg", "jpeg:65", "q65"),
        _test("jpeg", "jpeg:30", "q30"),
        _test("blur", "blur:sigma=3", "sigma 3"),
        _test("blur", "blur:sigma=5", "sigma 5"),
    ],
    "aigcdetect": [
        CLEAN,
        _test("jpeg", "jpeg:95", "q95"),
        _test("blur", "aigcdetect:blur=1", "sigma 1"),
        _test("resize", "aigcdetect:half", "x0.5"),
    ],
    "jpeg96": [
        CLEAN,
        Condition("JPEG-96 control", "jpeg96", "q96", "jpeg:96", "jpeg:96", "generated", 96),
    ],
}


def grid(name: str) -> list[Condition]:
    """The conditions of the study `name` (--grid)."""
    if name not in GRIDS:
        raise UserError(f"--grid must be one of {', '.join(GRIDS)}, not '{name}'")
    return GRIDS[name]


def _extract(cfg: RobustnessConfig, subset: str, splits: tuple[str, ...], spec: str | None, only) -> str:
    ecfg = ExtractConfig(
        data_root=cfg.data_root, subset=subset, splits=splits, perturb=spec,
        perturb_only=only if spec else None, progress=cfg.progress, **cfg.extract,
    )  # fmt: skip
    return run_extract_covering(ecfg).cache


def run_robustness(cfg: RobustnessConfig) -> tuple[Path, list[Path]]:
    """Extract what is missing, train, evaluate; returns the CSV and the figures written."""
    conditions = grid(cfg.grid)
    train_subset = index_stage.canonical_subset(cfg.train_subset)
    tests = list(dict.fromkeys(index_stage.canonical_subset(s) for s in cfg.test_subsets))
    if not tests:
        raise UserError("give at least one --test-subsets")
    out = Path(cfg.out)

    # the train subset is extracted with both splits (val for its own test), test-only subsets with val
    caches: dict[tuple, str] = {}
    for c in conditions:
        wanted = [(train_subset, c.train)] + [(s, c.test) for s in tests]
        for subset, spec in wanted:
            key = (subset, spec, c.only if spec else None)
            if key not in caches:
                splits = ("train", "val") if subset == train_subset else ("val",)
                logger.info(f"robustness: extract {subset} [{spec or 'clean'}]")
                caches[key] = _extract(cfg, subset, splits, spec, c.only)

    runs: dict[tuple, Path] = {}
    records: list[Record] = []
    for c in conditions:
        if c.training not in runs:
            tcfg = TrainConfig(
                caches=[caches[(train_subset, c.train, c.only if c.train else None)]], method=cfg.method,
                out=str(out / "runs"), perturb=c.train, perturb_only=c.only if c.train else None,
                real_jpeg_quality=c.real_jpeg_quality, progress=cfg.progress, **cfg.train,
            )  # fmt: skip
            logger.info(f"robustness: train {cfg.method} on {train_subset} [{c.train or 'clean'}]")
            runs[c.training] = run_train(tcfg)
        for subset in tests:
            only = c.only if c.test else None
            ecfg = EvalConfig(
                runs[c.training], [caches[(subset, c.test, only)]], out / "results", progress=cfg.progress,
                device=cfg.train.get("device", DEFAULT_DEVICE), perturb=c.test, perturb_only=only,
            )  # fmt: skip
            (result,) = run_eval(ecfg)
            records.append(Record(c, subset, result))
    csv_path = write_csv(out / f"robustness-{cfg.grid}-{cfg.method}.csv", cfg, records)
    figures = [table_figure(out / f"robustness-{cfg.grid}-{cfg.method}-table.png", cfg, conditions, records)]
    figures += severity_figures(out, cfg, conditions, tests, records)
    logger.info(text_table(conditions, records))
    return csv_path, figures


def _metric(records: list[Record], c: Condition, metric: str, subset: str | None = None) -> float:
    """One subset's value, or the mean over the test subsets (subset None)."""
    vals = [r.result["metrics"][metric] for r in records if r.condition == c and subset in (None, r.subset)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def write_csv(path: Path, cfg: RobustnessConfig, records: list[Record]) -> Path:
    """One row per (condition, test subset), and a `mean` row per condition; percentages, 2 decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = ["grid", "method", "condition", "family", "level", "train_perturb", "test_perturb",
            "perturb_only", "real_jpeg_quality", "train_subset", "test_subset", "n",
            *(f"{m}_%" for m in COLUMNS), "run"]  # fmt: skip
    conditions = list(dict.fromkeys(r.condition for r in records))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for c in conditions:
            mine = [r for r in records if r.condition == c]
            base = [cfg.grid, cfg.method, c.name, c.family, c.level, c.train or "", c.test or "",
                    c.only or "", c.real_jpeg_quality or "", cfg.train_subset]  # fmt: skip
            for r in mine:
                m = r.result["metrics"]
                w.writerow(
                    [*base, r.subset, m["n"], *(f"{100 * m[k]:.2f}" for k in COLUMNS), r.result["run"]]
                )
            n = sum(r.result["metrics"]["n"] for r in mine)
            w.writerow([*base, "mean", n, *(f"{100 * _metric(records, c, k):.2f}" for k in COLUMNS), ""])
    return path


def text_table(conditions: list[Condition], records: list[Record]) -> str:
    lines = [f"{'condition':<34}{'ACC %':>8}{'AP %':>8}   (mean over the test subsets)"]
    for c in conditions:
        lines.append(
            f"{c.name:<34}{100 * _metric(records, c, 'acc'):>8.1f}{100 * _metric(records, c, 'ap'):>8.1f}"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table_figure(
    path: Path, cfg: RobustnessConfig, conditions: list[Condition], records: list[Record]
) -> Path:
    """Table A4's layout: one row per perturbation, ACC and AP averaged over the test subsets."""
    plt = _pyplot()
    cells = [[c.train or "-", c.test or "-", f"{100 * _metric(records, c, 'acc'):.1f}",
              f"{100 * _metric(records, c, 'ap'):.1f}"] for c in conditions]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.4 * len(conditions)))
    ax.axis("off")
    table = ax.table(
        cellText=cells, rowLabels=[c.name for c in conditions],
        colLabels=["train perturbation", "test perturbation", "Avg. ACC (%)", "Avg. AP (%)"], loc="center",
    )  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    subsets = ", ".join(sorted({r.subset for r in records}))
    ax.set_title(
        f"{cfg.method} trained on {cfg.train_subset}, grid {cfg.grid}: mean over {subsets}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def severity_figures(
    out: Path, cfg: RobustnessConfig, conditions: list[Condition], tests: list[str], records: list[Record]
) -> list[Path]:
    """Per family: ACC and AP against severity (clean first), one line per test subset and their mean."""
    plt = _pyplot()
    paths = []
    for family in dict.fromkeys(c.family for c in conditions if c.family != "clean"):
        points = [c for c in conditions if c.family in ("clean", family)]
        x = range(len(points))
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, metric in zip(axes, ("acc", "ap"), strict=True):
            for subset in tests:
                ax.plot(
                    x, [100 * _metric(records, c, metric, subset) for c in points], marker="o", label=subset
                )
            ax.plot(x, [100 * _metric(records, c, metric) for c in points], "k--", marker="s", label="mean")
            ax.set_xticks(list(x), [c.level for c in points])
            ax.set_ylim(0, 101)
            ax.set_xlabel(f"{family} severity")
            ax.set_ylabel(f"{metric.upper()} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{cfg.method} trained on {cfg.train_subset} ({cfg.grid}): {family}")
        fig.tight_layout()
        path = out / f"robustness-{cfg.grid}-{cfg.method}-{family}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
