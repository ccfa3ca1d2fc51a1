"""Evaluation as GenImage users report it, cached by fingerprint; the train x test report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import ONE_THREAD, run_cli
from sklearn.metrics import average_precision_score

from stages.evaluate import evaluate, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_on_known_scores():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    scores = np.array([0.1, 0.45, 0.4, 0.9, 0.7, 0.48, 0.46, 0.2])
    m = metrics(labels, scores)
    assert m["acc"] == 6 / 8 and m["real_acc"] == 1.0 and m["generated_acc"] == 0.5
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores))  # the whole set at once
    assert m["oracle_acc_threshold_fit_on_test"] == 1.0  # a threshold in (0.45, 0.46), fit on the labels
    assert metrics(labels, np.full(8, 0.5))["acc"] == 0.5  # 0.5 itself is called real


def test_eval_cli_writes_every_row_once_and_is_cached_then_report(egre_run, learn_set, tmp_path):
    _, cache = learn_set
    out = tmp_path / "results"
    first = run_cli("eval", "--checkpoint", str(egre_run), "--from-cache", str(cache), "--out", str(out),
                    "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert "ACC" in first.stdout and "AP" in first.stdout
    (result,) = out.glob("*.json")
    r = json.loads(result.read_text())
    with open(result.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r["metrics"]["n"] == 32 and len({row["path"] for row in rows}) == 32
    assert all(row["path"].startswith("val/") for row in rows)
    labels = np.array([int(row["label"]) for row in rows])
    scores = np.array([float(row["score"]) for row in rows])
    assert r["metrics"]["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-5)
    assert r["train_subsets"] == ["sdv14"] and r["test_subset"] == "sdv14"
    mtime = result.stat().st_mtime_ns
    said = []
    (again,) = evaluate(egre_run, [str(cache)], out, progress=False, log=said.append)
    assert said[-1].startswith("up to date") and result.stat().st_mtime_ns == mtime and again == r

    # a second, fake test subset, so the matrix has two columns
    fake = json.loads(result.read_text())
    fake.update(test_subset="adm", metrics={**fake["metrics"], "acc": 0.25})
    (out / "other__adm-00000000.json").write_text(json.dumps(fake))
    rep = run_cli("report", str(out), "--out", str(out / "matrix.png"))
    header, row = rep.stdout.splitlines()[1:3]
    assert header.split()[-3:] == ["adm", "sdv14", "mean"]
    acc = 100 * r["metrics"]["acc"]
    assert row.split()[-3:] == ["25.0", f"{acc:.1f}", f"{(25 + acc) / 2:.1f}"]
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
