"""The train x test matrix of a results folder (LoL Figure 4): a heatmap PNG, a text table, a CSV.

Results of the same run on test artifacts extracted with identical parameters (the same subset
extracted twice, into two caches or copies, whose fingerprints differ) share one cell: their
values are averaged, weighted by their rows. The figure sizes itself to its labels and says the
split, the threshold and the rows per cell.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from stages.runs import calibrate
from stages.runs.results import EvalResult, Metrics, artifacts_name, from_json, is_result

# threshold-free metrics first; the last four depend on the threshold a result was computed with
METRICS = ("acc", "ap", "auc", "tpr_at_fpr1", "tpr_at_fpr5", "ece", "real_acc", "generated_acc", "real_fpr")
AT_THRESHOLD = ("acc", "real_acc", "generated_acc", "real_fpr")


@dataclass
class Matrix:
    """rows 'method:train subsets', columns (test sets), values and the std over epochs (NaN where
    missing or merged), the rows behind each cell, and a line saying split, threshold and n."""

    rows: list[str]
    cols: list[str]
    mat: np.ndarray
    std: np.ndarray
    n: np.ndarray
    metric: str
    subtitle: str
    undefined: np.ndarray | None = None  # bool per cell: the metric does not exist for its rows (one class)

    def is_undefined(self, i: int, j: int) -> bool:
        return self.undefined is not None and j < self.undefined.shape[1] and bool(self.undefined[i, j])


def collect(results: str | Path, metric: str = "acc") -> Matrix:
    """The matrix of `metric` over the results (*.json of `pipeline eval`) in a folder.

    A result over several epochs (`eval --epoch last5`) holds their mean; its std fills the second
    matrix. A result of another epoch choice than `best`, or of another threshold than 0.5, is its
    own row, labelled with the choice.

    Columns are test subsets, written `subset:split` when the folder holds several splits and
    `...@<params fp8>` when one subset was evaluated on artifacts of different parameters.
    """
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}")
    found = read_results(results)
    if not found:
        raise UserError(f"no evaluation results (*.json from `pipeline eval`) in {results}")
    cells = [cell for r in found for cell in per_generator(r)]
    names = Names(cells)
    grouped: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        grouped.setdefault((names.row(c), names.column(c)), []).append(c)
    rows = sorted({at[0] for at in grouped})
    cols = sorted({at[1] for at in grouped})
    mat = np.full((len(rows), len(cols)), np.nan)
    std, n = mat.copy(), np.zeros(mat.shape, dtype=int)
    undefined = np.zeros(mat.shape, dtype=bool)
    for (row, col), cs in grouped.items():
        at = rows.index(row), cols.index(col)
        mat[at], std[at], n[at], undefined[at] = merged(cs, metric)
    return Matrix(rows, cols, mat, std, n, metric, subtitle(cells, metric, n, undefined), undefined)


def read_results(folder: str | Path) -> list[EvalResult]:
    """The evaluation results among the folder's *.json (other JSON, or none that parses, is skipped)."""
    found = []
    for f in sorted(Path(folder).glob("*.json")):
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue
        if is_result(r):
            found.append(from_json(r))
    return found


@dataclass(frozen=True)
class Cell:
    """A result as one cell of the report: its own metrics, or those of one of its generators."""

    result: EvalResult
    metrics: Metrics
    std: Metrics  # over epochs; empty when the result has one epoch (or for a generator's cell)
    generator: str | None = None


def per_generator(r: EvalResult) -> list[Cell]:
    """A result as the report's cells: one per generator of its test set when it has several (the
    generator's generated rows against the reals that go with them, `by_generator`), else itself."""
    gens = r["by_generator"]
    if len(gens) <= 1:
        return [Cell(r, r["metrics"], r.get("metrics_std", {}))]
    return [Cell(r, m, {}, g) for g, m in gens.items()]


def threshold_choice(r: EvalResult) -> str:
    """What the threshold was asked as: '0.5', a number, or a calibrated threshold's name."""
    return r["threshold"]["choice"]


class Names:
    """The row and column names of the cells: rows 'method:train subsets' (with the training
    perturbation, epoch choice and threshold where not the default; the run's fingerprint where
    several runs share a label), columns the test sets (see collect)."""

    def __init__(self, cells: list[Cell]) -> None:
        self.runs_per_label: dict[str, set] = {}
        for c in cells:
            self.runs_per_label.setdefault(self.short(c), set()).add(c.result["run"])
        # A column per (test subset, split, perturbation, test artifacts): the split and the artifacts
        # are named only where the folder holds more than one of them, so a plain folder keeps plain
        # subset columns; a perturbed test artifact (`eval --perturb`) is always a column of its own.
        self.several_splits = len({c.result["split"] for c in cells}) > 1
        self.kinds: dict[str, set] = {}
        for c in cells:
            self.kinds.setdefault(self.base(c), set()).add(artifacts_name(c.result))

    @staticmethod
    def short(c: Cell) -> str:
        r = c.result
        choice, trained, thr = r["epoch_choice"], r["train_perturb"], threshold_choice(r)
        return (
            f"{r['method']}:{'+'.join(r['train_subsets'])}"
            + ("" if trained == "clean" else f" [{trained}]")
            + ("" if choice == "best" else f" ({choice})")
            + ("" if thr == "0.5" else f" (threshold {thr})")
        )

    def row(self, c: Cell) -> str:  # several runs of one method on one subset (seeds, settings): name each
        short = self.short(c)
        return short if len(self.runs_per_label[short]) == 1 else f"{short} {c.result['run'][-12:]}"

    def base(self, c: Cell) -> str:
        r = c.result
        name = r["test_subset"] + (f":{c.generator}" if c.generator is not None else "")
        name = f"{name}:{r['split']}" if self.several_splits else name
        return name if r["test_perturb"] == "clean" else f"{name} [{r['test_perturb']}]"

    def column(self, c: Cell) -> str:
        base = self.base(c)
        return f"{base}@{artifacts_name(c.result)}" if len(self.kinds[base]) > 1 else base


def merged(cells: list[Cell], metric: str) -> tuple[float, float, int, bool]:
    """(value, std over epochs, rows, undefined) of the cells that share a place in the matrix: their
    values weighted by their rows; the std only of a single cell; undefined (a one-class test set:
    said, not a NaN) when any cell's value is."""
    weights = np.array([c.metrics["n"] for c in cells], dtype=float)
    values = [c.metrics.get(metric, np.nan) for c in cells]
    undefined = any(v is None for v in values)
    value = np.nan if undefined else float(np.average(values, weights=weights))
    spread = cells[0].std.get(metric) if len(cells) == 1 else None
    return value, np.nan if spread is None else spread, int(weights.sum()), undefined


def subtitle(cells: list[Cell], metric: str, n: np.ndarray, undefined: np.ndarray) -> str:
    """The line under the title: the splits, the thresholds (of a metric that depends on one), the
    rows per cell, and what n/a means where a cell has it."""
    splits = ", ".join(sorted({c.result["split"] for c in cells}))
    if metric in AT_THRESHOLD:
        thresholds = ", ".join(sorted({threshold_text(c.result) for c in cells}))
    else:
        thresholds = "none (threshold-free metric)"
    filled = n[n > 0]
    rows_text = f"{filled.min()}" if filled.min() == filled.max() else f"{filled.min()}-{filled.max()}"
    text = f"split {splits}; threshold {thresholds}; n = {rows_text} scored rows per cell"
    if undefined.any():
        text += f"; n/a: {metric} is undefined for a one-class test set"
    return text


def threshold_text(r: EvalResult) -> str:
    """'0.5' (or the number given), or a calibrated threshold's name and value: 'fpr5 (0.8123)'."""
    t = r["threshold"]
    return f"{t['choice']} ({t['value']:.4g})" if t["choice"] in calibrate.CHOICES else f"{t['value']:g}"


def with_means(mat: np.ndarray) -> np.ndarray:
    """The matrix with a last column: each row's mean over the test subsets it was evaluated on."""
    means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in mat]
    return np.column_stack([mat, means])


def table(m: Matrix) -> str:
    """The matrix as text, in percent; a cell with a spread over epochs reads 'mean+-std'."""
    corner = "train / test"
    width = max(len(r) for r in [*m.rows, corner]) + 2
    least = 14 if np.isfinite(m.std).any() else 10
    cw = max([least, *(len(c) + 2 for c in m.cols)])  # split and artifact columns have long names

    def cell(v: float, sd: float, undefined: bool) -> str:
        text = "-" if math.isnan(v) else f"{100 * v:.1f}" + ("" if math.isnan(sd) else f"+-{100 * sd:.1f}")
        return f"{'n/a' if undefined else text:>{cw}}"

    head = f"{corner:<{width}}" + "".join(f"{c:>{cw}}" for c in [*m.cols, "mean"])
    lines = [f"{m.metric.upper()} (%): {m.subtitle}", head]
    for i, (r, vals, sds) in enumerate(zip(m.rows, with_means(m.mat), m.std, strict=True)):
        cells = (
            cell(v, sd, m.is_undefined(i, j))
            for j, (v, sd) in enumerate(zip(vals, [*sds, np.nan], strict=True))
        )
        lines.append(f"{r:<{width}}" + "".join(cells))
    return "\n".join(lines)


def write_csv(m: Matrix, out: str | Path) -> Path:
    """The matrix as CSV (fractions, not percent; empty where missing): a row per run label, a
    column per test set and the mean, then the rows behind each cell (`n:<column>`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["train / test", *m.cols, "mean", *(f"n:{c}" for c in m.cols)])
        for i, (r, vals, n) in enumerate(zip(m.rows, with_means(m.mat), m.n, strict=True)):
            shown = (
                "n/a" if m.is_undefined(i, j) else "" if math.isnan(v) else f"{v:.6f}"
                for j, v in enumerate(vals)
            )
            w.writerow([r, *shown, *n.tolist()])
    return out


# Cell geometry of the heatmap, in inches: the figure grows with the labels around it, never the cells
# shrink, so no label is drawn over another or cut at the edge.
CELL_W, CELL_H, COLORBAR_W, PAD = 0.9, 0.55, 1.2, 0.3


def heatmap(m: Matrix, out: str | Path) -> Path:
    """The figure of the matrix as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(m)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def figure(m: Matrix):
    """The matrix (and a mean column) in percent as a heatmap, titled with the metric, split,
    threshold and n; a matplotlib Figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = with_means(m.mat) * 100
    labels = [*m.cols, "mean"]
    title = f"{m.metric.upper()} (%)\n{m.subtitle}"
    fig = plt.figure(layout="constrained")  # margins fit the labels, the colorbar included
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  # Agg's canvas; the base stub lacks it

    def size(text: str, **kw) -> tuple[float, float]:  # inches of a text as matplotlib draws it
        t = fig.text(0, 0, text, **kw)
        box = t.get_window_extent(renderer)
        t.remove()
        return box.width / fig.dpi, box.height / fig.dpi

    xw, xh = np.max([size(c) for c in labels], axis=0)
    yw = max(size(r)[0] for r in m.rows)
    slanted = xw <= 2 * CELL_W  # short column names at 45 degrees; long ones upright, one per column
    x_drop = (xw + xh) * 0.71 if slanted else xw  # the room the column names need below the cells
    x_reach = max(xw * 0.71 - CELL_W / 2, 0) if slanted else 0  # ... and left of the first cell
    plot_w = CELL_W * len(labels)
    width = max(max(yw, x_reach) + plot_w + COLORBAR_W + 4 * PAD, size(title)[0] + 2 * PAD)
    height = size(title)[1] + CELL_H * len(m.rows) + x_drop + 5 * PAD
    fig.set_size_inches(width, height)
    ax = fig.add_subplot()
    im = ax.imshow(full, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(
        range(len(labels)), labels, rotation=45 if slanted else 90, ha="right" if slanted else "center"
    )
    ax.set_yticks(range(len(m.rows)), m.rows)
    ax.axvline(len(m.cols) - 0.5, color="white", linewidth=2)
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            if np.isfinite(full[i, j]):
                ax.text(j, i, f"{full[i, j]:.1f}", ha="center", va="center",
                        color="black" if full[i, j] > 60 else "white", fontsize=8)  # fmt: skip
            elif m.is_undefined(i, j):
                ax.text(j, i, "n/a", ha="center", va="center", color="grey", fontsize=8)
    ax.set_xlabel("test set")
    ax.set_ylabel("method:train subset")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return fig
