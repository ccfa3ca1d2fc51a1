"""Evaluation as GenImage users report it, cached by fingerprint; the train x test report."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_curve

from stages.configs import EvalConfig
from stages.evaluate import metrics, run_eval
from tests.helpers import ONE_THREAD, lines_said, run_cli, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_on_known_scores():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    scores = np.array([0.1, 0.45, 0.4, 0.9, 0.7, 0.48, 0.46, 0.2])
    m = metrics(labels, scores)
    assert m["acc"] == 6 / 8 and m["real_acc"] == 1.0 and m["generated_acc"] == 0.5
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores))  # the whole set at once
    assert m["oracle_acc_threshold_fit_on_test"] == 1.0  # a threshold in (0.45, 0.46), fit on the labels
    assert metrics(labels, np.full(8, 0.5))["acc"] == 0.5  # 0.5 itself is called real


def test_tpr_at_fpr_is_read_from_the_full_roc_curve_when_scores_tie():
    # 100 generated and 100 real: 50 generated alone on top, then two tied groups of 4 generated + 5 real
    scores = np.array([1.0] * 50 + [0.8] * 4 + [0.7] * 4 + [0.1] * 42 + [0.8] * 5 + [0.7] * 5 + [0.1] * 90)
    labels = np.array([1] * 100 + [0] * 100)
    fpr, tpr, _ = roc_curve(labels, scores)  # sklearn's default drops the collinear point (0.05, 0.54)
    assert tpr[fpr <= 0.05].max() == pytest.approx(0.50)
    got = metrics(labels, scores)
    assert got["tpr_at_fpr5"] == pytest.approx(0.54)  # the best TPR with FPR <= 5%: threshold 0.8
    assert got["tpr_at_fpr1"] == pytest.approx(0.50)


def test_a_one_class_test_set_gets_the_metrics_that_exist_and_says_which_do_not():
    scores = np.array([0.9, 0.2, 0.7, 0.6])
    fakes = metrics(np.ones(4), scores)  # a folder of generated images alone
    assert fakes["generated_acc"] == pytest.approx(0.75) and fakes["acc"] == pytest.approx(0.75)
    for name in ("ap", "auc", "tpr_at_fpr1", "tpr_at_fpr5", "real_acc", "real_fpr"):
        assert fakes[name] is None and fakes["undefined"][name]
    assert fakes["undefined"]["ap"] == "needs real and generated rows"
    reals = metrics(np.zeros(4), scores)  # reals alone: the share flagged is defined
    assert reals["real_fpr"] == pytest.approx(0.75) and reals["generated_acc"] is None
    assert json.loads(json.dumps(reals)) == reals  # plain JSON: no NaN
    assert metrics(np.array([0, 1, 0, 1]), scores)["undefined"] == {}


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
    with lines_said() as said:
        (again,) = run_eval(EvalConfig(egre_run, [str(cache)], out, progress=False))
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


@pytest.fixture(scope="module")
def five_epoch_run(learn_set, tmp_path_factory):
    """A LoL run of 5 epochs (tiny backbone) on `learn_set`: enough for --epoch last5."""
    return tiny_run(learn_set[1], tmp_path_factory.mktemp("runs5"), "lol", epochs=5)


def test_eval_last5_mean_and_std_per_subset_best_by_default_and_report(five_epoch_run, learn_set, tmp_path):
    _, cache = learn_set
    out = tmp_path / "results"
    base = ("eval", "--checkpoint", str(five_epoch_run), "--from-cache", str(cache), "--out", str(out),
            "--no-progress")  # fmt: skip
    proc = run_cli(*base, "--epochs", "last5", env=ONE_THREAD)
    assert "+-" in proc.stdout and "epochs 1..5" in proc.stdout
    (result,) = out.glob("*.json")
    r = json.loads(result.read_text())
    assert r["epochs"] == [1, 2, 3, 4, 5] and r["epoch_choice"] == "last5"
    with open(result.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 32 and sorted({int(row["epoch"]) for row in rows}) == [1, 2, 3, 4, 5]
    for e, per in zip(r["epochs"], r["per_epoch"], strict=True):  # each epoch's metrics from its own scores
        mine = [row for row in rows if int(row["epoch"]) == e]
        got = metrics(np.array([int(x["label"]) for x in mine]), np.array([float(x["score"]) for x in mine]))
        assert per["epoch"] == e and got["acc"] == per["metrics"]["acc"]
    accs = [p["metrics"]["acc"] for p in r["per_epoch"]]
    assert r["metrics"]["acc"] == pytest.approx(np.mean(accs)) and r["metrics_std"]["acc"] == pytest.approx(
        np.std(accs)
    )

    run_cli(*base, env=ONE_THREAD)  # the default: the best epoch by the run's validation slice
    best = json.loads((five_epoch_run / "done.json").read_text())["best"]
    (default,) = [json.loads(p.read_text()) for p in out.glob("*.json") if p != result]
    assert default["epochs"] == [best] and default["epoch_choice"] == "best" and "metrics_std" not in default

    rep = run_cli("report", str(out), "--out", str(out / "matrix.png")).stdout.splitlines()
    table = {line.split()[0] + (" " + line.split()[1] if "(" in line else ""): line for line in rep[2:]}
    mean, sd = 100 * r["metrics"]["acc"], 100 * r["metrics_std"]["acc"]
    assert table["lol:sdv14 (last5)"].split()[-2] == f"{mean:.1f}+-{sd:.1f}"  # table: mean +- std
    assert table["lol:sdv14"].split()[-2] == f"{100 * default['metrics']['acc']:.1f}"
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from stages.report import collect

    m = collect(out)
    at = m.rows.index("lol:sdv14 (last5)"), m.cols.index("sdv14")
    assert m.mat[at] == r["metrics"]["acc"] and m.std[at] == r["metrics_std"]["acc"]  # the heatmap: the mean


def test_epoch_choices_that_cannot_be_served_are_one_line(egre_run, learn_set, tmp_path):
    _, cache = learn_set
    old = tmp_path / "old-run"  # a run trained before validation existed: no best epoch recorded
    shutil.copytree(egre_run, old)
    (old / "run-manifest.json").unlink()  # nor a run manifest (it came later still)
    done = json.loads((old / "done.json").read_text())
    (old / "done.json").write_text(
        json.dumps({k: v for k, v in done.items() if k not in ("best", "best_val")})
    )
    for args, message in (  # as the user types them: one line, exit 2
        (("--checkpoint", str(old)), "has no validation scores"),
        (("--checkpoint", str(egre_run), "--epochs", "last5"), "--epoch last5 needs 5 finished epochs"),
    ):
        proc = run_cli("eval", *args, "--from-cache", str(cache), "--out", str(tmp_path / "r"), check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    from pipeline.errors import UserError
    from stages.configs import DetectConfig
    from stages.detect import run_detect

    for choice, message in (("9", "has no finished epoch 9"), ("first", "--epoch takes best, last")):
        with pytest.raises(UserError, match=message):
            run_eval(EvalConfig(egre_run, [str(cache)], tmp_path / "r", epoch=choice, progress=False))
    with pytest.raises(UserError, match="--epoch takes best, last or an epoch number, not 'last5'"):
        run_detect(DetectConfig(tmp_path, egre_run, tmp_path / "s.csv", epoch="last5", progress=False))
    ok = run_cli("eval", "--checkpoint", str(old), "--epoch", "last", "--from-cache", str(cache),
                 "--out", str(tmp_path / "r"), "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert f"epoch {done['epochs']} (last)" in ok.stdout
