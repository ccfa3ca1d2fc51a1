"""`pipeline runs` over three runs (finished, stopped, failed), its `--json`, and `pipeline runs diff`,
through the installed command; a run that `pipeline train` left in an error says so."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from stages import train
from stages.runs import listing
from tests.helpers import ONE_THREAD, TINY_TRAIN, run_cli, torch_threads

pytestmark = pytest.mark.slow  # three trainings and the installed command

TRAIN = ("--method", "lol", "--batch-size", "16", "--no-progress", *TINY_TRAIN)


@pytest.fixture(scope="module")
def three_runs(learn_set, tmp_path_factory):
    """runs/: a finished LoL run (2 epochs), one stopped after epoch 1 of 3, one failed in epoch 2."""
    _, cache = learn_set
    out = tmp_path_factory.mktemp("three") / "runs"
    cli = CliRunner()
    with torch_threads(1):
        args = ["train", "--from-cache", str(cache), "--out", str(out), *TRAIN]
        assert cli.invoke(app, [*args, "--epochs", "2"]).exit_code == 0
        assert cli.invoke(app, [*args, "--epochs", "3", "--stop-after", "1"]).exit_code == 0
        real_epoch = train.train_epoch
        calls = []

        def failing(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return real_epoch(*a, **kw)

        train.train_epoch = failing  # type: ignore[assignment]
        try:
            result = cli.invoke(app, [*args, "--epochs", "4"])
        finally:
            train.train_epoch = real_epoch
        assert isinstance(result.exception, RuntimeError)
    return out


def test_runs_table_and_json_over_finished_stopped_and_failed(three_runs):
    rows = json.loads(run_cli("runs", str(three_runs), "--json", env=ONE_THREAD).stdout)
    by_planned = {r["epochs_planned"]: r for r in rows}
    assert sorted(by_planned) == [2, 3, 4]
    finished, stopped, failed = by_planned[2], by_planned[3], by_planned[4]
    done = json.loads((three_runs / finished["run"] / "done.json").read_text())
    assert finished["status"] == "finished" and finished["epochs_done"] == 2
    assert finished["best_epoch"] == done["best"] and finished["val_auc"] == done["best_val"]["auc"]
    assert stopped["status"] == "stopped at epoch 1" and stopped["epochs_done"] == 1
    assert stopped["best_epoch"] is None and stopped["val_auc"] is None
    assert failed["status"] == "failed after epoch 1"
    assert failed["error"] == "RuntimeError: CUDA out of memory (simulated)"
    for r in rows:
        assert r["method"] == "lol" and r["train"] == ["sdv14"] and len(r["fingerprint"]) == 12
        assert (three_runs / r["run"]).is_dir()

    text = run_cli("runs", str(three_runs), env=ONE_THREAD).stdout.splitlines()
    assert text[0].split()[:4] == ["run", "method", "train", "epochs"]
    assert len(text) == 4
    line = {r["status"].split()[0]: t for r in rows for t in text[1:] if t.startswith(r["run"])}
    assert "2/2" in line["finished"] and line["finished"].rstrip().endswith("finished")
    assert "1/3" in line["stopped"] and "stopped at epoch 1" in line["stopped"]
    assert "failed after epoch 1 (RuntimeError: CUDA out of memory (simulated))" in line["failed"]


def test_resuming_a_failed_run_clears_its_failure(three_runs, tmp_path):
    import shutil

    failed = next(p for p in three_runs.iterdir() if (p / listing.FAILED).is_file())
    copy = tmp_path / failed.name
    shutil.copytree(failed, copy)
    listing.started(copy)
    assert listing.row(copy)["status"] == "stopped at epoch 1" and listing.row(copy)["error"] is None


def test_runs_diff_names_the_parameters_that_differ(three_runs):
    finished, stopped = (
        next(
            p
            for p in three_runs.iterdir()
            if json.loads((p / "params.json").read_text())["hparams"]["epochs"] == n
        )
        for n in (2, 3)
    )
    out = json.loads(run_cli("runs", "diff", str(finished), str(stopped), "--json", env=ONE_THREAD).stdout)
    assert out["hparams.epochs"] == {"a": 2, "b": 3}
    assert out["done.epochs"] == {"a": 2, "b": None}
    assert "code" not in out and "caches[0].lare" not in out  # same code, same inputs
    text = run_cli("runs", "diff", str(finished), str(stopped), env=ONE_THREAD).stdout
    assert re.search(r"^hparams\.epochs +A: 2$", text, flags=re.M)
    same = run_cli("runs", "diff", str(finished), str(finished), env=ONE_THREAD).stdout
    assert "same parameters and inputs" in same
    bad = run_cli("runs", "diff", str(finished), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
