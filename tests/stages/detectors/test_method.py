"""The method registry: a third detector is one module and one registration, nothing else edited."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from stages.configs import DetectConfig, EvalConfig, TrainConfig
from stages.detect import run_detect
from stages.detectors import method as method_registry
from stages.detectors.lol import LoL
from stages.evaluate import run_eval
from stages.runs.checkpoint import load_run
from stages.train import run_train
from tests.helpers import TINY_TRAIN

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
    run = run_train(cfg)
    assert run.name.startswith("probe-sdv14-") and (run / "epoch-002.safetensors").is_file()
    (result,) = run_eval(EvalConfig(run, [str(cache)], tmp_path / "results", progress=False))
    assert result["method"] == "probe" and result["metrics"]["n"] == 32
    with open(next((tmp_path / "results").glob("*.csv"))) as f:
        expected = {r["path"].split("/")[-1]: float(r["score"]) for r in csv.DictReader(f)}

    (subset_dir,) = [p for p in data.rglob("imagenet_ai_0419_sdv4") if p.is_dir()]
    shutil.copytree(subset_dir / "val", tmp_path / "images")
    assert run_detect(DetectConfig(tmp_path / "images", run, tmp_path / "scores.csv", progress=False)) == (
        32,
        0,
    )
    with open(tmp_path / "scores.csv") as f:
        got = {r["path"].split("/")[-1]: float(r["score"]) for r in csv.DictReader(f)}
    assert got == pytest.approx(expected, abs=1e-6)  # the pixels as at extraction, fed as in evaluation

    with pytest.raises(UserError, match="--method must be one of egre, lol, probe, not 'nope'"):
        method_registry.get("nope")


@dataclasses.dataclass(frozen=True)
class WidthOptions:
    """The third method's own option, declared here alone: the CLI offers it, a run records it."""

    width: int = method_registry.option(5, "Probe: hidden units of the mean-colour head.")


@pytest.fixture
def wide():
    """PROBE with an option of its own: one registration, no other file edited."""
    wide = dataclasses.replace(
        PROBE, name="wide", options=WidthOptions, model_args=lambda hp, lare_channels: {"width": hp["width"]}
    )
    method_registry.register(wide)
    yield wide
    del method_registry.REGISTRY[wide.name]


def test_a_third_methods_own_option_reaches_its_model_and_the_runs_hparams(wide, learn_set, tmp_path):
    """`pipeline train` offers the option with the help and default its module declares; the value
    typed reaches the model (its constructor arguments) and is recorded in the run's hparams; not
    typed, the declared default is; the built-in methods' hparams do not get it."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    _, cache = learn_set
    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "--width <int> Probe: hidden units of the mean-colour head. [default: (5)]" in help_text
    args = ["train", "--from-cache", str(cache), "--method", "wide", "--epochs", "1", *TINY_TRAIN,
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--width", "3"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    params = json.loads((run / "params.json").read_text())
    assert params["method"] == "wide" and params["hparams"]["width"] == 3 and params["model"] == {"width": 3}
    assert load_run(run).model.head.out_features == 3

    cfg = TrainConfig(
        caches=[str(cache)], method="wide", out=str(tmp_path), epochs=1, crop_size=32, backbone="tiny-RN",
        backbone_weights="random", progress=False,
    )  # fmt: skip
    assert cfg.hparams({"sdv14"})["width"] == 5  # not given: the default WidthOptions declares
    egre = dataclasses.replace(cfg, method="egre", method_options={"width": 3})
    assert "width" not in egre.hparams({"sdv14"})  # another method's option is not EGRE's
    with pytest.raises(UserError, match="no method has the option"):
        dataclasses.replace(cfg, method_options={"depth": 2}).hparams({"sdv14"})


def test_a_run_is_built_from_the_constructor_arguments_it_saved(egre_run):
    """params.json holds the model's constructor arguments; loading builds from them, not from shapes."""
    params = json.loads((egre_run / "params.json").read_text())
    assert params["model"] == {"lare_channels": 4, "grid": 2, "heads": 8, "head_dim": 64}
    model = load_run(egre_run).model
    assert (model.heads, model.head_dim, model.grid, model.to_heads.in_channels) == (8, 64, 2, 4)


def test_the_code_of_a_methods_constructor_arguments_is_in_a_runs_code_version():
    """A run's constructor arguments (Method.model_args) are saved in params.json after its fingerprint
    is taken, so the code that makes them must be where train.training_code hashes: the network's
    module or the registry. A declaration module (egre_method), which no code version covers, may only
    name it (`Later`)."""
    for name in method_registry.names():
        method = method_registry.get(name)
        ref = method.model_args
        module = ref.module if isinstance(ref, method_registry.Later) else ref.__module__
        assert module in (method.network_module().__name__, method_registry.__name__), (name, module)
