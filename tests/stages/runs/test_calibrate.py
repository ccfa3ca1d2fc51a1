"""Operating points: metrics equal sklearn's, calibrated thresholds meet their target FPR on fresh
data, a slice too small to calibrate is said so, and the CLI says which threshold it used."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from pipeline.errors import UserError
from stages.evaluate import metrics
from stages.runs import calibrate
from tests.helpers import ONE_THREAD, TINY_TRAIN, lines_said, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def draw(rng: np.random.Generator, n_real: int, n_gen: int) -> tuple[np.ndarray, np.ndarray]:
    """Known score distributions: real ~ Beta(2, 5), generated ~ Beta(5, 2) (symmetric about 0.5)."""
    labels = np.r_[np.zeros(n_real, int), np.ones(n_gen, int)]
    return labels, np.r_[rng.beta(2, 5, n_real), rng.beta(5, 2, n_gen)]


def test_metrics_equal_sklearns_on_known_distributions():
    labels, scores = draw(np.random.default_rng(0), 700, 300)
    m = metrics(labels, scores, threshold=0.4)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    real, gen = scores[labels == 0], scores[labels == 1]
    assert m["real_fpr"] == (real > 0.4).mean() == 1 - m["real_acc"]
    for name, alpha in calibrate.TARGET_FPRS.items():  # brute force over every threshold
        best = max((gen > t).mean() for t in [*scores, -1.0] if (real > t).mean() <= alpha)
        assert m[f"tpr_at_{name}"] == pytest.approx(best, abs=1e-12)
    prob_true, prob_pred = calibration_curve(labels, scores, n_bins=calibrate.ECE_BINS, strategy="uniform")
    counts, _ = np.histogram(scores, bins=np.linspace(0, 1, calibrate.ECE_BINS + 1))
    weights = counts[counts > 0] / len(scores)
    assert m["ece"] == pytest.approx(float((weights * np.abs(prob_true - prob_pred)).sum()), abs=1e-12)
    assert metrics(labels, np.clip(labels * 1.0, 0, 1))["ece"] == 0.0  # certain and right: calibrated


def test_calibrated_thresholds_meet_their_target_on_a_fresh_draw():
    rng = np.random.default_rng(1)
    n = 4000
    record = calibrate.calibrate(*draw(rng, n, n))
    fresh_labels, fresh = draw(rng, 200_000, 200_000)
    fresh_real = fresh[fresh_labels == 0]
    for name, alpha in calibrate.TARGET_FPRS.items():
        sampling = 3 * np.sqrt(alpha * (1 - alpha) / n)  # the calibration draw's binomial error, 3 sigma
        assert abs((fresh_real > record["thresholds"][name]).mean() - alpha) < sampling, name
    assert record["thresholds"]["balanced"] == pytest.approx(0.5, abs=0.03)  # the densities cross there
    assert record["not_calibrated"] == {}


def test_a_slice_too_small_keeps_no_threshold_and_says_why():
    rng = np.random.default_rng(2)
    small = calibrate.calibrate(*draw(rng, 99, 9))
    assert set(small["thresholds"]) == {"fpr5"} and set(small["not_calibrated"]) == {"fpr1", "balanced"}
    assert "99 real validation row(s); FPR 1% needs 100" in small["not_calibrated"]["fpr1"]
    assert set(calibrate.calibrate(*draw(rng, 19, 10))["thresholds"]) == {"balanced"}
    assert set(calibrate.calibrate(*draw(rng, 100, 10))["thresholds"]) == {"fpr1", "fpr5", "balanced"}


def test_threshold_choices_resolve_or_say_why(tmp_path):
    assert calibrate.resolve(tmp_path, None, [1]) == calibrate.Threshold(0.5, "0.5", "default")
    assert calibrate.resolve(tmp_path, "0.7", [1]).origin == "given"
    for bad, message in (("high", "--threshold takes fpr1, fpr5, balanced or a number"),
                         ("1.5", "must lie in"), ("fpr1", "no calibrated thresholds")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            calibrate.resolve(tmp_path, bad, [1])
    with lines_said() as said:
        calibrate.write(tmp_path, *draw(np.random.default_rng(3), 30, 30), epoch=2)
    (line,) = said
    # the note says what happens (issue 27): asking for a missing threshold is an error, 0.5 still works
    assert "too small to calibrate fpr1" in line and "stay at" not in line
    assert "the run has no fpr1 threshold, so `--threshold fpr1` stops eval and detect with an error" in line
    with pytest.raises(UserError, match="fpr1"):
        calibrate.resolve(tmp_path, "fpr1", [2])
    assert calibrate.resolve(tmp_path, "0.5", [2]).value == 0.5
    fpr5 = calibrate.resolve(tmp_path, "fpr5", [2])
    assert fpr5.value == json.loads((tmp_path / calibrate.FILE).read_text())["thresholds"]["fpr5"]
    assert "validation slice (epoch 2, 30 real + 30 generated rows)" in fpr5.origin
    with pytest.raises(UserError, match="calibrated on the scores of epoch 2"):
        calibrate.resolve(tmp_path, "fpr5", [1, 2, 3, 4, 5])


@pytest.fixture(scope="module")
def calibrated_run(learn_set, tmp_path_factory) -> tuple[Path, str]:
    """An EGRE run of 1 epoch whose validation slice is 22 + 22 rows of the train split
    (--val-fraction 0.9): enough for fpr5 and balanced, not for fpr1. (run, train's stderr)"""
    out = tmp_path_factory.mktemp("calibrated")
    proc = run_cli("train", "--from-cache", str(learn_set[1]), "--method", "egre", "--epochs", "1",
                   "--batch-size", "4", "--val-fraction", "0.9", "--out", str(out), "--no-progress",
                   *TINY_TRAIN, env=ONE_THREAD)  # fmt: skip
    return Path(proc.stdout.strip()), proc.stderr


def test_train_calibrates_eval_and_detect_say_which_threshold(calibrated_run, learn_set, tmp_path):
    run, said = calibrated_run
    notes = [line for line in said.splitlines() if "too small to calibrate" in line]
    assert len(notes) == 1 and "fpr1" in notes[0] and "fpr5" not in notes[0].split("(")[0]
    record = json.loads((run / calibrate.FILE).read_text())
    assert record["n_real"] == record["n_generated"] == 22 and set(record["thresholds"]) == {
        "fpr5",
        "balanced",
    }

    out = tmp_path / "results"
    base = ("eval", "--checkpoint", str(run), "--from-cache", str(learn_set[1]), "--out", str(out),
            "--no-progress")  # fmt: skip
    proc = run_cli(*base, "--threshold", "fpr5", env=ONE_THREAD)
    assert f"threshold {record['thresholds']['fpr5']:.4g} (fpr5)" in proc.stdout
    (result,) = out.glob("*.json")
    r = json.loads(result.read_text())
    assert r["threshold"]["choice"] == "fpr5" and r["threshold"]["value"] == record["thresholds"]["fpr5"]
    assert (
        r["metrics"]["threshold"] == record["thresholds"]["fpr5"]
        and "validation slice" in r["threshold"]["origin"]
    )
    for per_format in r["by_format"].values():
        assert {"auc", "tpr_at_fpr1", "tpr_at_fpr5", "real_fpr", "ece"} <= per_format.keys()
    assert Path(f"{result.with_suffix('')}.reliability.png").read_bytes()[:4] == b"\x89PNG"
    default = run_cli(*base, env=ONE_THREAD)  # another threshold is another result
    assert "threshold 0.5 (default)" in default.stdout and len(list(out.glob("*.json"))) == 2

    refused = run_cli(*base, "--threshold", "fpr1", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "has no 'fpr1' threshold: 22 real validation row(s); FPR 1% needs 100" in refused.stderr

    (image,) = [p for p in sorted(learn_set[0].rglob("*.png")) if "/val/" in str(p)][:1]
    scores = tmp_path / "scores.csv"
    run_cli("detect", str(image), "--checkpoint", str(run), "--out", str(scores), "--threshold", "balanced",
            "--device", "cpu", "--no-progress", env=ONE_THREAD)  # fmt: skip
    with open(scores) as f:
        (row,) = csv.DictReader(f)
    params = json.loads((run / "params.json").read_text())
    assert row["run_fingerprint"] == params["fingerprint"] and row["epoch"] == str(record["epoch"])
    assert float(row["threshold"]) == pytest.approx(record["thresholds"]["balanced"], rel=1e-5)
    assert row["threshold_choice"] == "balanced" and "validation slice" in row["threshold_origin"]
    assert row["lare_weights"] == params["lare"]["model"]["weights"] and row["run"] == run.name
    assert row["decision"] == ("generated" if float(row["score"]) > float(row["threshold"]) else "real")


def test_runs_without_calibration_still_evaluate_at_0_5_and_say_so_when_asked(egre_run, learn_set, tmp_path):
    """A run of one validation row per label has no thresholds; a run from before calibration has no
    calibration.json: both evaluate at the default 0.5, and a calibrated choice is one line, exit 2."""
    import shutil

    old = tmp_path / "old-run"
    shutil.copytree(egre_run, old)
    (old / calibrate.FILE).unlink()
    (old / "run-manifest.json").unlink()  # such a run predates run manifests too
    common = ("--from-cache", str(learn_set[1]), "--out", str(tmp_path / "r"), "--no-progress")
    for run, message in (
        (egre_run, "has no 'balanced' threshold: 1 real + 1 generated rows"),
        (old, "has no calibrated thresholds (trained before calibration existed)"),
    ):
        proc = run_cli("eval", "--checkpoint", str(run), *common, "--threshold", "balanced", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    ok = run_cli("eval", "--checkpoint", str(old), *common, env=ONE_THREAD)
    assert "threshold 0.5 (default)" in ok.stdout


def test_calibrate_recomputes_a_runs_thresholds_from_its_recorded_slice(calibrated_run, tmp_path):
    """`pipeline calibrate` on a run without calibration.json (as one trained before it existed)
    writes the very record training wrote."""
    import shutil

    run, _ = calibrated_run
    old = tmp_path / run.name
    shutil.copytree(run, old)
    (old / calibrate.FILE).unlink()
    (old / "run-manifest.json").unlink()  # such a run predates run manifests too
    proc = run_cli("calibrate", "--checkpoint", str(old), "--device", "cpu", env=ONE_THREAD)
    assert (old / calibrate.FILE).read_bytes() == (run / calibrate.FILE).read_bytes()
    record = json.loads((run / calibrate.FILE).read_text())
    assert f"fpr5: {record['thresholds']['fpr5']:.6g}" in proc.stdout and "fpr1" not in proc.stdout
