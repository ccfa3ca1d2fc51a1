"""`pipeline reproduce TABLE`: a paper's protocol as one plan over extract, train and eval, its table
written with the paper's numbers beside ours.

Tables (the protocol of each is the paper's text; where the text is silent, our choice is named):
  lol-table1         LoL Table 1 (Sec. 4.1, 4.2, 4.4): a LoL run per training subset (1,600 + 1,600
                     images, Adam 5e-6, 5e-7 on BigGAN, batch 4, 20 epochs), each tested on every subset
                     with the weights of its final five epochs; a test subset's figure is the mean over
                     the training runs of its ACC, the last column the mean of those. Beside it the AP
                     the same way (Figure 5; of it the text gives only the overall mean, 98.6).
  lol-table2         LoL Table 2: training volume 400 ... 323,994 images (half of each class) on SD v1.4
                     (Sec. 4.5: every ablation trains on SD v1.4), for CLIP-RN50, -RN101 and -ViT-L/14;
                     per cell the ACC and AP averaged over the test subsets, mean +- std over the final
                     five epochs (std of the five epochs' averages: our reading, the text does not say).
  lol-table3         LoL Table 3: the mask ratio x aspect ratio ranges, on SD v1.4, 1,600 + 1,600 images
                     (the text does not give the volume of this ablation: LoL's default is our choice).
  lare2              LaRE^2's EGRE trained on SD v1.4 (GenImage's protocol), tested on every subset with
                     its best epoch on the validation slice (stages.train).
  lare2-reference    the same trained on SD v1.5, as the authors' script does (docs/REFERENCE_NOTES.md).

Every step is a stage of its own, named by its fingerprint (stages.extract, stages.train,
stages.evaluate): a rerun finds them done, a killed run resumes inside the step it was in, and a changed
option reruns only the steps it changes. The extraction is the reference's (SD v1.5, t = 200, e = 4,
the class prompt) with a 512 px pixel window; EGRE's small images are padded as its reference pads them
(reflect), LoL's tiled (README, "Reproduce the papers").

`--subsets` (fewer test and training subsets), `--scale F` (F times the training images per class)
and the other training options run a cheaper version of the same protocol; the output says which
options differ from the paper's. Extraction and the test sets stay whole: the index has no sampling.

Verdicts: a cell agrees when our figure lies within the paper's +- std where the table prints one,
else within TOLERANCE_POINTS percentage points.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from pipeline.config import DEFAULT_DEVICE, resolve_device
from pipeline.errors import UserError
from stages import papers
from stages.configs import EvalConfig, ExtractConfig, ReproduceConfig, TrainConfig
from stages.detectors import lol_method
from stages.evaluate import run_eval
from stages.extract import covering_artifacts, run_extract_covering
from stages.genimage import index as index_stage
from stages.runs import cachedata, checkpoint, choice
from stages.runs.results import EvalResult
from stages.train import plan_run, run_train

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

GENIMAGE = tuple(index_stage.SUBSETS)  # the eight subsets, in the order of LoL's Table 1
TOLERANCE_POINTS = 2.0  # percentage points a cell may differ where the paper prints no std
LOL_PER_CLASS = cast(int, lol_method.DEFAULTS["max_per_class"])  # 1,600 real + 1,600 generated (Sec. 4.4)
FULL_SDV14_TRAIN = 323_994  # LoL Table 2's 100% row: every image of SD v1.4's train split
GENIMAGE_TRAIN_PER_CLASS = FULL_SDV14_TRAIN // 2  # a GenImage subset's train split, per class (about)
VOLUMES = (400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 64_000, 160_000, FULL_SDV14_TRAIN)
BACKBONES = ("RN50", "RN101", "ViT-L-14")  # open_clip's names of LoL's three towers
MASKS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))
ASPECTS = ((1.0, 1.0), (0.5, 2.0), (0.33, 3.0))
# The reference's maps (docs/REFERENCE_NOTES.md) and a 512 px window; EGRE pads small images (reflect).
EXTRACT = {"prompt_template": "a photo of a {cls}", "pixel_size": 512}
BENCH = Path(__file__).resolve().parent.parent / "bench" / "results"  # in a checkout, not in the wheel


@dataclass(frozen=True)
class Training:
    """One training run of a plan: the table row it feeds, its subset and its TrainConfig fields."""

    row: str
    column: str
    subset: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Cell:
    """One figure of a table: ours (percent, NaN when missing), the paper's, and whether they agree."""

    metric: str
    row: str
    column: str
    ours: float
    ours_std: float
    paper: papers.PaperCell | None

    @property
    def tolerance(self) -> float | None:
        if self.paper is None:
            return None
        return self.paper.std if self.paper.std is not None else TOLERANCE_POINTS

    @property
    def diff(self) -> float:
        return self.ours - self.paper.value if self.paper is not None else math.nan

    @property
    def verdict(self) -> str:
        if self.paper is None:
            return "no paper figure"
        if math.isnan(self.ours):
            return "not run"
        return "within" if abs(self.diff) <= (self.tolerance or 0.0) + 1e-9 else "outside"


@dataclass(frozen=True)
class Protocol:
    """A table: its method, which epochs are scored, its runs, and how results become cells."""

    name: str
    title: str
    method: str
    epoch: str  # EvalConfig.epoch
    trainings: Callable[[ReproduceConfig], list[Training]]
    cells: Callable[[ReproduceConfig, list[Training], list[str], dict], list[Cell]]
    extract: dict = field(default_factory=dict)  # the table's ExtractConfig fields (the user's win)


# ---- the tables ---------------------------------------------------------------------------------
def _table1_trainings(cfg: ReproduceConfig) -> list[Training]:
    n = cfg.per_class(LOL_PER_CLASS)
    return [Training(s, "", s, (("max_per_class", n),)) for s in cfg.tests()]


def _table2_trainings(cfg: ReproduceConfig) -> list[Training]:
    out = []
    for backbone in BACKBONES:
        for volume in VOLUMES:
            n = "all" if volume == FULL_SDV14_TRAIN and cfg.scale == 1 else cfg.per_class(volume // 2)
            out.append(
                Training(str(volume), backbone, "sdv14", (("max_per_class", n), ("backbone", backbone)))
            )
    return out


def _range(r: tuple[float, float]) -> str:
    """A range as the paper's tables print it, and lol.csv stores it: "0.0-0.2", "0.33-3.0"."""
    return "-".join(f"{v:g}" if "." in f"{v:g}" else f"{v:g}.0" for v in r)


def _table3_trainings(cfg: ReproduceConfig) -> list[Training]:
    n = cfg.per_class(LOL_PER_CLASS)
    return [
        Training(
            _range(m), _range(a), "sdv14", (("max_per_class", n), ("mask_range", m), ("aspect_range", a))
        )
        for m in MASKS
        for a in ASPECTS
    ]


def _egre(subset: str) -> Callable[[ReproduceConfig], list[Training]]:
    """EGRE trains on the whole train split; at --scale F on F x GENIMAGE_TRAIN_PER_CLASS per class."""

    def trainings(cfg: ReproduceConfig) -> list[Training]:
        scaled = () if cfg.scale == 1 else (("max_per_class", cfg.per_class(GENIMAGE_TRAIN_PER_CLASS)),)
        return [Training(subset, "", subset, scaled)]

    return trainings


def _metric(result: dict, metric: str) -> float:
    return 100 * result["metrics"][metric] if result else math.nan


def _table1_cells(cfg: ReproduceConfig, runs: list[Training], tests: list[str], results: dict) -> list[Cell]:
    """Per test subset the mean over the training runs (each a mean over its last five epochs), then
    the mean of those: Table 1 (ACC, LoL row) and the AP the same way (Figure 5)."""
    cells = []
    for metric in ("acc", "ap"):
        per_test = [float(np.mean([_metric(results.get((r, t), {}), metric) for r in runs])) for t in tests]
        for t, v in zip(tests, per_test, strict=True):
            cells.append(Cell(metric, "LoL", t, v, math.nan, papers.lookup("lol-table1", "LoL", t, metric)))
        cells.append(
            Cell(metric, "LoL", "mean", float(np.mean(per_test)), math.nan, _paper_mean(tests, metric))
        )
    return cells


def _paper_mean(tests: list[str], metric: str) -> papers.PaperCell | None:
    """Table 1's mean column, or with --subsets the mean of its cells over those subsets (None where
    the paper prints no cell to average: Figure 5's AP per subset is not in the text)."""
    if set(tests) == set(GENIMAGE):
        return papers.lookup("lol-table1", "LoL", "mean", metric)
    found = [papers.lookup("lol-table1", "LoL", t, metric) for t in tests]
    if any(c is None for c in found):
        return None
    value = float(np.mean([c.value for c in found if c is not None]))
    source = f"mean of LoL Table 1 over {', '.join(tests)} (--subsets)"
    return papers.PaperCell("lol-table1", "LoL", "mean", metric, round(value, 2), None, source)


def _over_epochs(results: list[dict], metric: str) -> tuple[float, float]:
    """Mean and std (ddof 0) over the scored epochs of the per-epoch average over the test subsets."""
    if not results or any(not r for r in results):
        return math.nan, math.nan
    epochs = [r.get("per_epoch") or [{"metrics": r["metrics"]}] for r in results]
    averages = [100 * np.mean([e[i]["metrics"][metric] for e in epochs]) for i in range(len(epochs[0]))]
    return float(np.mean(averages)), float(np.std(averages))


def _grid_cells(table: str, metrics: tuple[str, ...]):
    def cells(cfg: ReproduceConfig, runs: list[Training], tests: list[str], results: dict) -> list[Cell]:
        out = []
        for metric in metrics:
            for r in runs:
                mean, std = _over_epochs([results.get((r, t), {}) for t in tests], metric)
                out.append(
                    Cell(metric, r.row, r.column, mean, std, papers.lookup(table, r.row, r.column, metric))
                )
        return out

    return cells


def _lare2_cells(cfg: ReproduceConfig, runs: list[Training], tests: list[str], results: dict) -> list[Cell]:
    """Our figures only: LaRE^2's own per-subset numbers have no primary source here (papers.LARE2_ABSENT)."""
    (run,) = runs
    cells = []
    for metric in ("acc", "ap"):
        vals = [_metric(results.get((run, t), {}), metric) for t in tests]
        cells += [Cell(metric, run.row, t, v, math.nan, None) for t, v in zip(tests, vals, strict=True)]
        cells.append(Cell(metric, run.row, "mean", float(np.mean(vals)), math.nan, None))
    return cells


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "lol-table1",
            "LoL Table 1 (ACC) and the AP of Figure 5",
            "lol",
            "last5",
            _table1_trainings,
            _table1_cells,
            EXTRACT,
        ),
        Protocol(
            "lol-table2",
            "LoL Table 2: training volume x backbone",
            "lol",
            "last5",
            _table2_trainings,
            _grid_cells("lol-table2", ("acc", "ap")),
            EXTRACT,
        ),
        Protocol(
            "lol-table3",
            "LoL Table 3: mask ratio x aspect ratio",
            "lol",
            "last5",
            _table3_trainings,
            _grid_cells("lol-table3", ("acc",)),
            EXTRACT,
        ),
        Protocol(
            "lare2",
            "LaRE^2 (EGRE) trained on SD v1.4",
            "egre",
            "best",
            _egre("sdv14"),
            _lare2_cells,
            {**EXTRACT, "small_images": "reflect"},
        ),
        Protocol(
            "lare2-reference",
            "LaRE^2 (EGRE) trained on SD v1.5, as the authors' script",
            "egre",
            "best",
            _egre("sdv15"),
            _lare2_cells,
            {**EXTRACT, "small_images": "reflect"},
        ),
    )
}


def protocol_of(cfg: ReproduceConfig) -> Protocol:
    """The protocol of `cfg.table`, once its TABLE and --scale are checked."""
    if cfg.table not in PROTOCOLS:
        raise UserError(f"TABLE must be one of {', '.join(PROTOCOLS)}, not '{cfg.table}'")
    if not 0 < cfg.scale <= 1:
        raise UserError(f"--scale must be in (0, 1], not {cfg.scale}")
    return PROTOCOLS[cfg.table]


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The steps of a table: an extraction per subset, the training runs, their evaluations."""

    protocol: Protocol
    extracts: dict[str, ExtractConfig]
    trainings: list[Training]
    tests: list[str]


def make_plan(cfg: ReproduceConfig) -> Plan:
    protocol = protocol_of(cfg)
    tests = cfg.tests()
    trainings = protocol.trainings(cfg)
    trained = {t.subset for t in trainings}
    extracts = {}
    for subset in dict.fromkeys([*sorted(trained, key=GENIMAGE.index), *tests]):
        splits = ("train", "val") if subset in trained else ("val",)
        extracts[subset] = ExtractConfig(
            data_root=cfg.data_root, subset=subset, splits=splits, progress=cfg.progress,
            **{**protocol.extract, **cfg.extract},
        )  # fmt: skip
    return Plan(protocol, extracts, trainings, tests)


def train_config(cfg: ReproduceConfig, plan: Plan, training: Training, cache: str) -> TrainConfig:
    """The TrainConfig of a run: the table's options for it, under the options the user gave."""
    fields = {**dict(training.options), **cfg.train}  # e.g. a --backbone tiny-RN for every tower
    return TrainConfig.from_options(
        caches=[cache], method=plan.protocol.method, out=str(Path(cfg.out) / "runs"), progress=cfg.progress,
        **fields,
    )  # fmt: skip


def run_reproduce(cfg: ReproduceConfig) -> list[Path]:
    """Extract what is missing, train, evaluate, write the table; returns the files written."""
    plan = make_plan(cfg)
    caches = {}
    for subset, xcfg in plan.extracts.items():
        logger.info(f"reproduce: extract {subset} [{', '.join(xcfg.splits or ())}]")
        caches[subset] = run_extract_covering(xcfg).cache
    results: dict[tuple[Training, str], EvalResult] = {}
    device = cfg.train.get("device", DEFAULT_DEVICE)
    for training in plan.trainings:
        logger.info(f"reproduce: train {plan.protocol.method} on {training.subset} ({_describe(training)})")
        run = run_train(train_config(cfg, plan, training, caches[training.subset]))
        ecfg = EvalConfig(
            run, [caches[t] for t in plan.tests], Path(cfg.out) / "results", epoch=plan.protocol.epoch,
            device=device, progress=cfg.progress,
        )  # fmt: skip
        for test, result in zip(plan.tests, run_eval(ecfg), strict=True):
            results[(training, test)] = result
    cells = plan.protocol.cells(cfg, plan.trainings, plan.tests, results)
    return write_outputs(cfg, plan, cells)


def _describe(training: Training) -> str:
    return ", ".join(f"{k} {v}" for k, v in training.options) or "the method's defaults"


# ---- --dry-run ------------------------------------------------------------------------------------
def extraction_rate(ecfg: ExtractConfig) -> tuple[float, str] | None:
    """Images/s measured by `make bench` for this model kind, device kind, size and ensemble, and where
    the figure is from; None where bench/results holds none. The tiny model is measured as itself; any
    other model is taken to be an SD v1 (the random-sd15 benchmark has its architecture and cost)."""
    kind = resolve_device(ecfg.device, here=False).split(":")[0]
    model = "tiny" if ecfg.model == "tiny" else "random-sd15"
    for path in sorted(BENCH.glob("extract-*.json")):
        bench = json.loads(path.read_text())
        if ("cpu" if bench["device"] == "cpu" else "cuda") != kind or bench["model"] != model:
            continue
        for r in bench["runs"]:
            if (r["size"], r["ensemble"]) == (ecfg.size, ecfg.ensemble):
                return r["ours_images_per_s"], f"bench/results/{path.name}, {bench['device']}"
    return None


def _images(ecfg: ExtractConfig) -> int | None:
    """The labelled image files extraction would index (None: no such subset), listed by the index's
    own rule; the index itself is built by extraction."""
    try:
        return len(ecfg.source().listing().rows)
    except UserError:
        return None


def _run_status(
    cfg: ReproduceConfig, plan: Plan, training: Training, cache: str | None
) -> tuple[str, Path | None]:
    if cache is None:
        return "to train (after its extraction)", None
    tcfg = train_config(cfg, plan, training, cache)
    picked = choice.Choice(tcfg.lare, tcfg.pixels, perturb=None)  # clean
    cachedata.logger.disabled = True  # a plan reads the cache to name the run: it says nothing of it
    try:
        data = cachedata.CacheData([cache], verify=False, split="train", choice=picked)
    finally:
        cachedata.logger.disabled = False
    run, _ = plan_run(tcfg, data)
    if checkpoint.is_done(run):
        return f"done ({run.name})", run
    done = checkpoint.finished_epochs(run) if run.is_dir() else []
    return (f"to train, resumes after epoch {done[-1]}" if done else "to train"), run


def plan_text(cfg: ReproduceConfig) -> str:
    """The plan as text: caches to extract, runs to train, evaluations, and a time estimate."""
    plan = make_plan(cfg)
    lines = [f"reproduce {cfg.table}: {plan.protocol.title}"]
    dev = cfg.deviations()
    lines.append(
        "protocol: " + ("the paper's" if not dev else "a cheaper or other version: " + "; ".join(dev))
    )
    lines.append(f"extract ({len(plan.extracts)} subsets):")
    caches: dict[str, str | None] = {}
    seconds, unknown = 0.0, []
    for subset, ecfg in plan.extracts.items():
        found = covering_artifacts(ecfg)
        caches[subset] = found.cache if found else None
        if found:
            lines.append(f"  {subset} [{', '.join(ecfg.splits or ())}]: done ({found.cache})")
            continue
        n = _images(ecfg)
        rate = extraction_rate(ecfg)
        if n is not None and rate is not None:
            seconds += n / rate[0]
            est = f"about {_duration(n / rate[0])} at {rate[0]:.1f} images/s ({rate[1]})"
        else:
            est = "no time estimate (" + ("no images found" if n is None else "no measured rate") + ")"
            unknown.append(subset)
        lines.append(
            f"  {subset} [{', '.join(ecfg.splits or ())}]: to extract, "
            f"{n if n is not None else '?'} images, {est}"
        )
    lines.append(f"train ({len(plan.trainings)} {plan.protocol.method} runs):")
    runs = []
    for t in plan.trainings:
        status, run = _run_status(cfg, plan, t, caches[t.subset])
        runs.append(run)
        lines.append(
            f"  {t.row}{' ' + t.column if t.column else ''} on {t.subset} ({_describe(t)}): {status}"
        )
    done_evals = sum(_evaluated(cfg, plan, run) for run in runs if run is not None)
    total = len(plan.trainings) * len(plan.tests)
    lines.append(
        f"evaluate ({total}: each run on {len(plan.tests)} test subsets, epochs {plan.protocol.epoch}): "
        f"{done_evals} done, {total - done_evals} to do"
    )
    todo = any(c is None for c in caches.values())
    estimated = (
        f"about {_duration(seconds)}" if seconds else ("" if todo else "none left, every cache is done")
    )
    missing = f"no measured rate for {', '.join(unknown)}" if unknown else ""
    lines.append(
        f"time: extraction {', plus '.join(p for p in (estimated, missing) if p)}; training and "
        "evaluation: not estimated (bench/results holds no measured training rate)"
    )
    lines.append(f"output: {Path(cfg.out) / cfg.table}.md, .csv, .png")
    return "\n".join(lines)


def _evaluated(cfg: ReproduceConfig, plan: Plan, run: Path) -> int:
    """How many of the run's evaluations of this plan are in the results folder already."""
    n = 0
    for path in (Path(cfg.out) / "results").glob(f"{run.name}__*.json"):
        r = json.loads(path.read_text())
        if r.get("epoch_choice") == plan.protocol.epoch and r.get("test_subset") in plan.tests:
            n += 1
    return min(n, len(plan.tests))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- the output -----------------------------------------------------------------------------------
def summary(cells: list[Cell]) -> str:
    compared = [c for c in cells if c.paper is not None]
    within = sum(c.verdict == "within" for c in compared)
    if not compared:
        return "no cell has a paper figure to compare with"
    return (
        f"{within} of {len(compared)} cells within the paper's +- std (or +-{TOLERANCE_POINTS:g} points "
        "where it prints no std)"
    )


def _fmt(v: float | None, std: float | None = None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.1f}" + ("" if std is None or math.isnan(std) else f" +- {std:.1f}")


def write_outputs(cfg: ReproduceConfig, plan: Plan, cells: list[Cell]) -> list[Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / cfg.table
    dev = cfg.deviations()
    label = (
        "the paper's protocol" if not dev else "a CHEAPER VERSION of the paper's protocol: " + "; ".join(dev)
    )
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["table", "metric", "row", "column", "ours_%", "ours_std", "paper_%", "paper_std", "diff",
                    "tolerance", "verdict", "source", "protocol"])  # fmt: skip
        for c in cells:
            p = c.paper
            w.writerow([
                cfg.table, c.metric, c.row, c.column, _num(c.ours), _num(c.ours_std),
                _num(p.value if p else None), _num(p.std if p else None), _num(c.diff),
                _num(c.tolerance), c.verdict, p.source if p else "", label,
            ])  # fmt: skip
    lines = [f"# {plan.protocol.title}", "", f"Run as {label}.", ""]
    if plan.protocol.method == "egre":
        lines += [papers.LARE2_ABSENT + ".", ""]
    lines += [
        "| metric | row | column | ours (%) | paper (%) | diff | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        p = c.paper
        lines.append(
            f"| {c.metric.upper()} | {c.row} | {c.column} | {_fmt(c.ours, c.ours_std)} | "
            f"{_fmt(p.value, p.std) if p else '-'} | {_fmt(c.diff)} | {c.verdict} |"
        )
    lines += ["", summary(cells) + ".", ""]
    sources = sorted({c.paper.source for c in cells if c.paper})
    if sources:
        lines += ["Paper figures from: " + "; ".join(sources) + ".", ""]
    lines += [f"Each run on each test subset: `pipeline report {Path(cfg.out) / 'results'}`.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    figure(stem.with_suffix(".png"), cfg, plan, cells, label)
    logger.info("\n".join(lines))
    return [stem.with_suffix(s) for s in (".md", ".csv", ".png")]


def _num(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.2f}"


def figure(path: Path, cfg: ReproduceConfig, plan: Plan, cells: list[Cell], label: str) -> Path:
    """Ours and the paper's side by side, a bar pair per cell (error bars: the std where there is one),
    one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(c.metric for c in cells))
    width = max(6.0, 0.5 * max(sum(c.metric == m for c in cells) for m in metrics) + 2)
    title = [plan.protocol.title, summary(cells), *textwrap.wrap(label, int(width * 14))]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(width, 3.2 * len(metrics) + 0.16 * len(title)), squeeze=False
    )
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        mine = [c for c in cells if c.metric == metric]
        x = np.arange(len(mine))
        ours = [c.ours for c in mine]
        ax.bar(x - 0.2, ours, 0.4, yerr=[0 if math.isnan(c.ours_std) else c.ours_std for c in mine],
               label="ours", color="tab:blue")  # fmt: skip
        paper = [c.paper.value if c.paper else math.nan for c in mine]
        ax.bar(x + 0.2, paper, 0.4, yerr=[c.paper.std or 0 if c.paper else 0 for c in mine],
               label="paper", color="tab:orange")  # fmt: skip
        ax.set_xticks(x, [f"{c.row} {c.column}".strip() if c.row != "LoL" else c.column for c in mine],
                      rotation=45, ha="right", fontsize=7)  # fmt: skip
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("\n".join(title), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
