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
from pipeline.fingerprint import fingerprint
from stages.runs import calibrate

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
    files = sorted(Path(results).glob("*.json"))
    records = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(r, dict) and "metrics" in r and "test_subset" in r:
            records.append(r)
    if not records:
        raise UserError(f"no evaluation results (*.json from `pipeline eval`) in {results}")
    records = [cell for r in records for cell in per_generator(r)]

    def threshold(r: dict) -> str:
        return r.get("threshold", {}).get("choice", str(r["metrics"].get("threshold", 0.5)))

    def short(r: dict) -> str:
        choice = r.get("epoch_choice", "best")
        trained = r.get("train_perturb", "clean")
        return (
            f"{r['method']}:{'+'.join(r['train_subsets'])}"
            + ("" if trained == "clean" else f" [{trained}]")
            + ("" if choice == "best" else f" ({choice})")
            + ("" if threshold(r) == "0.5" else f" (threshold {threshold(r)})")
        )

    runs_per_label: dict[str, set] = {}
    for r in records:
        runs_per_label.setdefault(short(r), set()).add(r["run"])

    def label(r: dict) -> str:  # several runs of one method on one subset (seeds, settings): name each
        return short(r) if len(runs_per_label[short(r)]) == 1 else f"{short(r)} {r['run'][-12:]}"

    def artifacts(r: dict) -> str:  # by parameters where the result records them, else by fingerprints
        if "test_params" in r:
            return fingerprint(r["test_params"])[:8]
        return f"{r['test_cache']['lare'][:8]}/{r['test_cache']['pixels'][:8]}"

    def split(r: dict) -> str:
        return r.get("split", "val")

    # A column per (test subset, split, perturbation, test artifacts): the split and the artifacts are
    # named only where the folder holds more than one of them, so a plain folder keeps plain subset
    # columns; a perturbed test artifact (`eval --perturb`) is always a column of its own.
    several_splits = len({split(r) for r in records}) > 1

    def base(r: dict) -> str:
        name = r["test_subset"] + (f":{r['test_generator']}" if "test_generator" in r else "")
        name = f"{name}:{split(r)}" if several_splits else name
        perturbed = r.get("test_perturb", "clean")
        return name if perturbed == "clean" else f"{name} [{perturbed}]"

    kinds: dict[str, set] = {}
    for r in records:
        kinds.setdefault(base(r), set()).add(artifacts(r))

    def column(r: dict) -> str:
        return f"{base(r)}@{artifacts(r)}" if len(kinds[base(r)]) > 1 else base(r)

    cells: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        cells.setdefault((label(r), column(r)), []).append(r)
    rows = sorted({at[0] for at in cells})
    cols = sorted({at[1] for at in cells})
    mat = np.full((len(rows), len(cols)), np.nan)
    std, n = mat.copy(), np.zeros(mat.shape, dtype=int)
    undefined = np.zeros(mat.shape, dtype=bool)
    for (row, col), rs in cells.items():
        at = rows.index(row), cols.index(col)
        weights = np.array([r["metrics"]["n"] for r in rs], dtype=float)
        values = [r["metrics"].get(metric, np.nan) for r in rs]
        undefined[at] = any(v is None for v in values)  # a one-class test set: said, not a NaN
        mat[at] = np.nan if undefined[at] else np.average(values, weights=weights)
        spread = rs[0].get("metrics_std", {}).get(metric) if len(rs) == 1 else None
        std[at] = np.nan if spread is None else spread
        n[at] = int(weights.sum())
    splits = ", ".join(sorted({split(r) for r in records}))
    if metric in AT_THRESHOLD:
        thresholds = ", ".join(sorted({threshold_text(r) for r in records}))
    else:
        thresholds = "none (threshold-free metric)"
    filled = n[n > 0]
    rows_text = f"{filled.min()}" if filled.min() == filled.max() else f"{filled.min()}-{filled.max()}"
    subtitle = f"split {splits}; threshold {thresholds}; n = {rows_text} scored rows per cell"
    if undefined.any():
        subtitle += f"; n/a: {metric} is undefined for a one-class test set"
    return Matrix(rows, cols, mat, std, n, metric, subtitle, undefined)


def per_generator(r: dict) -> list[dict]:
    """A result as the report's cells: one per generator of its test set when it has several (the
    generator's generated rows against the reals that go with them, `by_generator`), else itself."""
    gens = r.get("by_generator", {})
    if len(gens) <= 1:
        return [r]
    return [{**r, "test_generator": g, "metrics": m, "metrics_std": {}} for g, m in gens.items()]


def threshold_text(r: dict) -> str:
    """'0.5' (or the number given), or a calibrated threshold's name and value: 'fpr5 (0.8123)'."""
    t = r.get("threshold") or {"value": r["metrics"].get("threshold", calibrate.DEFAULT), "choice": ""}
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
