"""The model card: README.md in the run, its YAML header parsed by a YAML parser, its figures those of
done.json and calibration.json; a section per evaluated test set added by eval, the thresholds of
calibrate shown; the run manifest follows every rewrite without blessing a file damaged since."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from pipeline import runstore
from stages.calibrate import run_calibrate
from stages.configs import CalibrateConfig, EvalConfig, TrainConfig
from stages.evaluate import run_eval
from stages.runs import calibrate, card
from stages.train import run_train
from tests.helpers import torch_threads


@pytest.fixture(scope="module")
def calibrated_run(learn_set, tmp_path_factory):
    """An EGRE run whose validation slice (11 + 11 rows) is large enough for a balanced threshold."""
    _, cache = learn_set
    cfg = TrainConfig(
        caches=[str(cache)], method="egre", out=str(tmp_path_factory.mktemp("card")), epochs=2, batch_size=16,
        lr=1e-3, crop_size=32, backbone="tiny-RN", backbone_weights="random", val_fraction=0.45,
        progress=False,
    )  # fmt: skip
    with torch_threads(1):
        return run_train(cfg)


def _header(run) -> dict:
    text = (run / card.FILE).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_the_card_header_holds_the_records_figures(calibrated_run):
    run = calibrated_run
    head = _header(run)
    done = json.loads((run / "done.json").read_text())
    cal = json.loads((run / calibrate.FILE).read_text())
    block = head["lare_pipeline"]
    assert head["library_name"] == "lare-pipeline" and "egre" in head["tags"]
    assert head["datasets"] == ["genimage/sdv14"]
    assert block["validation"] == done["best_val"] and block["best_epoch"] == done["best"]
    assert block["epochs"] == done["epochs"] and block["stopped"] == done["stopped"]
    assert block["thresholds"] == cal["thresholds"] and "balanced" in cal["thresholds"]
    params = json.loads((run / "params.json").read_text())
    assert block["fingerprint"] == params["fingerprint"] and block["training_caches"] == params["caches"]
    assert block["lare_model"] == params["lare"]["model"]
    (validation,) = head["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in validation["metrics"]} == {
        "roc_auc": done["best_val"]["auc"], "average_precision": done["best_val"]["ap"],
        "accuracy": done["best_val"]["acc"],
    }  # fmt: skip
    # random backbone and random SD model: both warned, in the header and on the page
    assert len(block["random_weights"]) == 2
    page = (run / card.FILE).read_text()
    assert page.count("**Warning: random weights.**") == 2
    assert f"--checkpoint runs/{run.name} --threshold fpr5" not in page  # no fpr5 on 11 reals
    assert "--threshold balanced" in page and "## Hyper-parameters" in page
    assert runstore.verify(str(run)) == []  # sealed after the card


def test_eval_and_calibrate_rewrite_the_card_and_keep_the_manifest_honest(
    calibrated_run, learn_set, tmp_path
):
    _, cache = learn_set
    run = tmp_path / calibrated_run.name
    shutil.copytree(calibrated_run, run)
    with torch_threads(1):
        (result,) = run_eval(EvalConfig(run, [str(cache)], out=tmp_path / "results", progress=False))
    head = _header(run)
    (entry,) = head["lare_pipeline"]["evaluations"]
    assert entry["test"] == "sdv14" and entry["split"] == "val" and entry["metrics"] == result["metrics"]
    page = (run / card.FILE).read_text()
    assert "### sdv14 (val)" in page and "| format |" in page  # every `by_*` grouping gets its table
    assert runstore.verify(str(run)) == []  # README.md and evals/ re-listed in the manifest
    # the same evaluation again: one section still
    with torch_threads(1):
        run_eval(EvalConfig(run, [str(cache)], out=tmp_path / "results", progress=False))
    assert len(_header(run)["lare_pipeline"]["evaluations"]) == 1

    # a weight byte flipped, then calibrate rewrites the card: the damaged file is still refused
    weights = run / "epoch-001.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    (run / calibrate.FILE).unlink()
    with torch_threads(1):
        record = run_calibrate(CalibrateConfig(run))
    assert _header(run)["lare_pipeline"]["thresholds"] == record["thresholds"]
    assert runstore.verify(str(run)) == ["epoch-001.safetensors does not match its checksum"]
