"""`pipeline robustness` end to end on a tiny grid, as a user types it; a rerun redoes nothing."""

from __future__ import annotations

import csv
import re

import pytest

from stages.features import perturb, perturb_spec
from stages.genimage.synthetic import make_genimage
from stages.robustness import GRIDS
from tests.helpers import ONE_THREAD, ROOT, run_cli


def test_a_study_writes_its_csv_and_figures_and_a_rerun_redoes_nothing(tmp_path):
    make_genimage(tmp_path / "data", "sdv14", {"train": 4, "val": 3}, seed=2)
    args = ["robustness", "--data-root", str(tmp_path / "data"), "--train-subset", "sdv14",
            "--test-subsets", "sdv14", "--grid", "aigcdetect", "--method", "lol",
            "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--model", "tiny", "--device", "cpu", "--size", "32",
            "--pixel-size", "64", "--rows-per-shard", "8", "--backbone", "tiny-RN", "--backbone-weights",
            "random", "--crop-size", "32", "--epochs", "1", "--batch-size", "8", "--no-progress"]  # fmt: skip
    first = run_cli(*args, env=ONE_THREAD)
    out = tmp_path / "out"
    with open(out / "robustness-aigcdetect-lol.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    conditions = [c.name for c in GRIDS["aigcdetect"]]
    assert [r["condition"] for r in rows if r["test_subset"] == "mean"] == conditions
    assert {r["test_perturb"] for r in rows} == {"", "jpeg:95", "aigcdetect:blur=1", "aigcdetect:half"}
    assert all(r["n"] == "6" and 0 <= float(r["acc_%"]) <= 100 for r in rows if r["test_subset"] == "sdv14")
    for name in ("table", "jpeg", "blur", "resize"):
        assert (out / f"robustness-aigcdetect-lol-{name}.png").stat().st_size > 5000

    again = run_cli(*args, env=ONE_THREAD)
    assert first.stdout.count("wrote ") == 5  # the CSV and four figures
    assert "rows done" not in again.stderr and "epoch 1" not in again.stderr, again.stderr
    assert again.stderr.count("up to date") >= 4 + 1 + 4  # four caches, one run, four evaluations


def test_a_bad_grid_or_subset_is_one_line(tmp_path):
    for extra in (["--grid", "a5"], ["--test-subsets", "nope"]):
        args = ["robustness", "--data-root", str(tmp_path), "--test-subsets", "sdv14", *extra]
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_frank_grid_trains_and_tests_on_each_mode_and_combined_beside_lols_text():
    frank = GRIDS["lol-a4-frank"]
    assert frank[0].train is None and frank[0].test is None
    assert [(c.train, c.test) for c in frank[1:]] == [
        (f"frank:{m}", f"frank:{m}") for m in ("noise", "blur", "jpeg", "crop", "combined")
    ]
    assert [c.train for c in GRIDS["lol-a4"][1:]] == ["noise:5-20", "blur:3,5,7,9", "jpeg:10-75", "crop:5-20"]
    assert (perturb.sigma_for_kernel(3), perturb.sigma_for_kernel(9)) == pytest.approx((0.8, 1.7))
    for grid in GRIDS.values():  # every SPEC of every grid parses to itself
        assert all(perturb_spec.canonical(s) == s for c in grid for s in (c.train, c.test) if s)


def test_the_readme_lists_every_grid():
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("\nGrids,", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^- `([a-z0-9-]+)`", listed, flags=re.M) == list(GRIDS)


def test_the_csv_columns_are_metrics_a_result_holds():
    from stages import report, robustness

    assert set(robustness.COLUMNS) <= set(report.METRICS)
