"""`pipeline report`: one cell per (run, test set of given parameters), a figure that fits its labels
and says its split, threshold and n, and a CSV of the table."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from stages.report import collect, figure
from tests.helpers import run_cli

PARAMS = {"lare": {"size": 64, "timestep": 280}, "pixels": {"size": 64}, "model": "w" * 8}


def result(folder: Path, name: str, test_subset: str, acc: float, n: int, lare_fp: str, **kw) -> None:
    """A result JSON as `pipeline eval` writes it (the fields the report reads)."""
    r = {
        "run": kw.get("run", "egre-sdv14-0123456789ab"), "method": kw.get("method", "egre"),
        "train_subsets": kw.get("train_subsets", ["sdv14"]), "test_subset": test_subset, "split": "val",
        "epoch_choice": "best", "test_perturb": "clean", "train_perturb": "clean",
        "test_cache": {"lare": lare_fp, "pixels": lare_fp[::-1]},
        "test_params": kw.get("test_params", PARAMS),
        "threshold": kw.get("threshold", {"value": 0.5, "choice": "0.5", "origin": "default"}),
        "metrics": {"n": n, "acc": acc, "auc": acc, "threshold": 0.5},
    }  # fmt: skip
    (folder / f"{name}.json").write_text(json.dumps(r))


def test_artifacts_of_identical_parameters_share_a_cell(tmp_path):
    """The adm set extracted twice (two caches: other fingerprints, the same parameters) is one
    column, its value the rows-weighted mean; other parameters make a column of their own."""
    result(tmp_path, "a", "adm", 0.8, 30, "1" * 64)
    result(tmp_path, "b", "adm", 0.6, 10, "2" * 64)  # a copy extracted again: other fingerprints
    result(tmp_path, "c", "sdv14", 0.9, 20, "3" * 64)
    m = collect(tmp_path)
    assert m.cols == ["adm", "sdv14"] and m.rows == ["egre:sdv14"]
    assert m.mat[0, 0] == pytest.approx((0.8 * 30 + 0.6 * 10) / 40) and m.n[0, 0] == 40
    result(tmp_path, "d", "adm", 0.5, 10, "4" * 64, test_params={**PARAMS, "lare": {"size": 128}})
    cols = collect(tmp_path).cols
    assert len(cols) == 3 and all(c.startswith("adm@") for c in cols[:2]) and cols[2] == "sdv14"


def test_report_cli_writes_csv_and_a_figure_that_says_split_threshold_and_n(tmp_path):
    result(tmp_path, "a", "adm", 0.8, 30, "1" * 64)
    result(tmp_path, "b", "adm", 0.6, 10, "2" * 64)
    fpr5 = {"value": 0.8123, "choice": "fpr5", "origin": "calibrated on ..."}
    result(tmp_path, "c", "sdv14", 0.9, 20, "3" * 64, threshold=fpr5)
    proc = run_cli(
        "report", str(tmp_path), "--out", str(tmp_path / "m.png"), "--csv", str(tmp_path / "m.csv")
    )
    assert "split val; threshold 0.5, fpr5 (0.8123); n = 20-40 scored rows per cell" in proc.stdout
    with open(tmp_path / "m.csv") as f:
        rows = {r["train / test"]: r for r in csv.DictReader(f)}
    assert float(rows["egre:sdv14"]["adm"]) == pytest.approx(0.75) and rows["egre:sdv14"]["n:adm"] == "40"
    assert float(rows["egre:sdv14 (threshold fpr5)"]["sdv14"]) == 0.9
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    texts = " ".join(
        t.get_text() for t in figure(collect(tmp_path)).findobj(lambda o: hasattr(o, "get_text"))
    )
    assert "split val" in texts and "threshold 0.5, fpr5 (0.8123)" in texts and "n = 20-40" in texts
    auc = run_cli("report", str(tmp_path), "--metric", "auc").stdout  # threshold-free: says so
    assert "threshold none (threshold-free metric)" in auc


@pytest.mark.parametrize("length", [4, 60])
def test_the_heatmap_sizes_itself_to_its_labels(tmp_path, length):
    """Tick labels (short ones slanted, long ones upright) overlap no other and lie inside the figure."""
    import matplotlib.pyplot as plt

    for k in range(4):
        for j in range(3):
            result(tmp_path, f"r{k}-{j}", f"t{j}" + "x" * length, 0.1 * (k + j), 10, f"{j}" * 64,
                   run=f"run{k}", method="egre", train_subsets=[f"s{k}" + "y" * length])  # fmt: skip
    fig = figure(collect(tmp_path))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax, _colorbar) = fig.axes
    ticks = [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert len(ticks) == 4 + 4  # 3 test sets and the mean; 4 runs
    boxes = [t.get_window_extent(renderer) for t in ticks]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    inside = fig.bbox
    for t, box in zip(ticks, boxes, strict=True):
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, t
    for text in (ax.title, ax.xaxis.label, ax.yaxis.label):  # and the titles
        box = text.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    plt.close(fig)
