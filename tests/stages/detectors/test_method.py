"""The method registry: a third detector is one module and one registration, nothing else edited."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from stages.detect import DetectConfig, run_detect
from stages.detectors import method as method_registry
from stages.detectors.lol import LoL
from stages.evaluate import EvalConfig, run_eval
from stages.train import TrainConfig, run_train

pytestmark = pytest.mark.usefixtures("one_thread")


class MeanColour(nn.Module):
    """A deliberately tiny detector: a logistic regression on an image's mean colour (no CLIP tower used)."""

    def __init__(self, visual: nn.Module, width: int):
        super().__init__()
        self.head = nn.Linear(3, width)
        self.out = nn.Linear(width, 1)

    def forward(self, images: torch.Tensor, lare: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(torch.relu(self.head(images.mean(dim=(2, 3)))))[:, 0]

    loss, score = staticmethod(LoL.loss), staticmethod(LoL.score)  # one logit, as LoL's


PROBE = method_registry.Method(
    name="probe",
    model=MeanColour,
    prepare=lambda images, hp, train, gen: images.float() / 255,
    reads_lare=False,
    defaults={
        "lr": 1e-2,
        "batch_size": 8,
        "epochs": 2,
        "patience": 0,
        "grad_clip": None,
        "betas": (0.9, 0.999),
        "max_per_class": None,
        "plateau": None,
    },  # fmt: skip
    model_args=lambda hp, lare_channels: {"width": 5},
)


@pytest.fixture
def probe():
    method_registry.register(PROBE)
    yield PROBE
    del method_registry.REGISTRY[PROBE.name]


def test_a_registered_third_method_trains_evaluates_and_detects(probe, learn_set, tmp_path):
    data, cache = learn_set
    cfg = TrainConfig(
        caches=[str(cache)], method="probe", out=str(tmp_path / "runs"), crop_size=32, backbone="tiny-RN",
        backbone_weights="random", progress=False,
    )  # fmt: skip
    run = run_train(cfg, log=lambda m: None)
    assert run.name.startswith("probe-sdv14-") and (run / "epoch-002.safetensors").is_file()
    (result,) = run_eval(
        EvalConfig(run, [str(cache)], tmp_path / "results", progress=False), log=lambda m: None
    )
    assert result["method"] == "probe" and result["metrics"]["n"] == 32
    with open(next((tmp_path / "results").glob("*.csv"))) as f:
        expected = {r["path"].split("/")[-1]: float(r["score"]) for r in csv.DictReader(f)}

    (subset_dir,) = [p for p in data.rglob("imagenet_ai_0419_sdv4") if p.is_dir()]
    shutil.copytree(subset_dir / "val", tmp_path / "images")
    assert run_detect(
        DetectConfig(tmp_path / "images", run, tmp_path / "scores.csv", progress=False), log=lambda m: None
    ) == (
        32,
        0,
    )
    with open(tmp_path / "scores.csv") as f:
        got = {r["path"].split("/")[-1]: float(r["score"]) for r in csv.DictReader(f)}
    assert got == pytest.approx(expected, abs=1e-6)  # the pixels as at extraction, fed as in evaluation

    with pytest.raises(UserError, match="--method must be one of egre, lol, probe, not 'nope'"):
        method_registry.get("nope")


def test_a_run_is_built_from_the_constructor_arguments_it_saved(egre_run):
    """params.json holds the model's constructor arguments; loading builds from them, not from shapes."""
    import json

    from stages.runs.checkpoint import load_run

    params = json.loads((egre_run / "params.json").read_text())
    assert params["model"] == {"lare_channels": 4, "grid": 2, "heads": 8, "head_dim": 64}
    model = load_run(egre_run).model
    assert (model.heads, model.head_dim, model.grid, model.to_heads.in_channels) == (8, 64, 2, 4)
