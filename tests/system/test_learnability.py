"""The test that matters: on images whose generated class carries a real generator artifact
(made at low resolution and upsampled), both detectors learn it from the cache alone, and
nothing is learned when the labels are shuffled.

The set is small (24 train images per class, so a 1 + 1 row validation slice): the run must keep
its last epoch rather than one chosen by the noise of two rows (configs.MIN_VAL_ROWS), and still
score on held-out files as it did before the validation slice existed."""

from __future__ import annotations

import json

import pytest

from stages.configs import EvalConfig, TrainConfig
from stages.evaluate import run_eval
from stages.train import run_train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # 30-epoch trainings


@pytest.mark.parametrize("method", ["egre", "lol"])
def test_learns_the_artifact_and_not_shuffled_labels(learn_set, tmp_path, method):
    _, cache = learn_set
    got = {}
    for shuffled in (False, True):
        cfg = TrainConfig(
            caches=[str(cache)], method=method, out=str(tmp_path / "runs"), epochs=30, batch_size=16, lr=1e-3,
            crop_size=32, backbone="tiny-RN", backbone_weights="random", shuffle_labels=shuffled,
            progress=False,
        )  # fmt: skip
        run = run_train(cfg)
        done = json.loads((run / "done.json").read_text())
        assert done["selection"]["by"] == "last" and done["best"] == done["epochs"] == 30
        (result,) = run_eval(EvalConfig(run, [str(cache)], tmp_path / "results", progress=False))
        assert result["metrics"]["n"] == 32  # every held-out (val) image, none sampled twice
        got[shuffled] = result["metrics"]
    print(f"{method}: held-out AP {got[False]['ap']:.3f} ACC {got[False]['acc']:.3f}; "
          f"uninformative labels AP {got[True]['ap']:.3f} ACC {got[True]['acc']:.3f}")  # fmt: skip
    assert got[False]["ap"] >= 0.95 and got[False]["acc"] >= 0.90, got
    assert got[True]["ap"] <= 0.65 and got[True]["acc"] <= 0.65, got
