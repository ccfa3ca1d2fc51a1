"""The train x test matrix of a results folder (LoL Figure 4): a heatmap PNG and a text table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

METRICS = ("acc", "ap", "real_acc", "generated_acc")


def collect(results: str | Path, metric: str = "acc") -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(row labels 'method:train subsets', columns, matrix, std matrix), NaN where missing.

    A result over several epochs (`eval --epoch last5`) holds their mean; its std fills the second
    matrix. A result of another epoch choice than `best` is its own row, labelled with the choice.

    A result is keyed by (run, test subset, split, test artifacts); no two of them share a cell.
    Columns are test subsets, written `subset:split` when the folder holds several splits and
    `...@<lare fp8>/<pixels fp8>` when one subset was evaluated on several artifacts.
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

    def short(r: dict) -> str:
        choice = r.get("epoch_choice", "best")
        trained = r.get("train_perturb", "clean")
        return (
            f"{r['method']}:{'+'.join(r['train_subsets'])}"
            + ("" if trained == "clean" else f" [{trained}]")
            + ("" if choice == "best" else f" ({choice})")
        )

    runs_per_label: dict[str, set] = {}
    for r in records:
        runs_per_label.setdefault(short(r), set()).add(r["run"])

    def label(r: dict) -> str:  # several runs of one method on one subset (seeds, settings): name each
        return short(r) if len(runs_per_label[short(r)]) == 1 else f"{short(r)} {r['run'][-12:]}"

    def artifacts(r: dict) -> str:
        return f"{r['test_cache']['lare'][:8]}/{r['test_cache']['pixels'][:8]}"

    def split(r: dict) -> str:
        return r.get("split", "val")

    # A column per (test subset, split, perturbation, test artifacts): the split and the artifacts are
    # named only where the folder holds more than one of them, so a plain folder keeps plain subset
    # columns; a perturbed test artifact (`eval --perturb`) is always a column of its own.
    several_splits = len({split(r) for r in records}) > 1

    def base(r: dict) -> str:
        name = f"{r['test_subset']}:{split(r)}" if several_splits else r["test_subset"]
        perturbed = r.get("test_perturb", "clean")
        return name if perturbed == "clean" else f"{name} [{perturbed}]"

    kinds: dict[str, set] = {}
    for r in records:
        kinds.setdefault(base(r), set()).add(artifacts(r))

    def column(r: dict) -> str:
        return f"{base(r)}@{artifacts(r)}" if len(kinds[base(r)]) > 1 else base(r)

    rows = sorted({label(r) for r in records})
    cols = sorted({column(r) for r in records})
    mat = np.full((len(rows), len(cols)), np.nan)
    std = mat.copy()
    for r in records:
        at = rows.index(label(r)), cols.index(column(r))
        mat[at] = r["metrics"][metric]
        std[at] = r.get("metrics_std", {}).get(metric, np.nan)
    return rows, cols, mat, std


def with_means(mat: np.ndarray) -> np.ndarray:
    """The matrix with a last column: each row's mean over the test subsets it was evaluated on."""
    means = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in mat]
    return np.column_stack([mat, means])


def table(
    rows: list[str], cols: list[str], mat: np.ndarray, metric: str, std: np.ndarray | None = None
) -> str:
    """The matrix as text, in percent; a cell with a spread over epochs reads 'mean+-std'."""
    corner = "train / test"
    width = max(len(r) for r in [*rows, corner]) + 2
    spread = np.full(mat.shape, np.nan) if std is None else std
    least = 14 if np.isfinite(spread).any() else 10
    cw = max([least, *(len(c) + 2 for c in cols)])  # split and artifact columns have long names

    def cell(v: float, sd: float) -> str:
        text = "-" if math.isnan(v) else f"{100 * v:.1f}" + ("" if math.isnan(sd) else f"+-{100 * sd:.1f}")
        return f"{text:>{cw}}"

    head = f"{corner:<{width}}" + "".join(f"{c:>{cw}}" for c in [*cols, "mean"])
    lines = [f"{metric.upper()} (%)", head]
    for r, vals, sds in zip(rows, with_means(mat), spread, strict=True):
        lines.append(
            f"{r:<{width}}" + "".join(cell(v, sd) for v, sd in zip(vals, [*sds, np.nan], strict=True))
        )
    return "\n".join(lines)


def heatmap(rows: list[str], cols: list[str], mat: np.ndarray, metric: str, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = with_means(mat) * 100
    labels = [*cols, "mean"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels), 1.2 + 0.55 * len(rows)))
    im = ax.imshow(full, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.axvline(len(cols) - 0.5, color="white", linewidth=2)
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            if np.isfinite(full[i, j]):
                ax.text(j, i, f"{full[i, j]:.1f}", ha="center", va="center",
                        color="black" if full[i, j] > 60 else "white", fontsize=8)  # fmt: skip
    ax.set_xlabel("test subset")
    ax.set_ylabel("method:train subset")
    ax.set_title(f"{metric.upper()} (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
