"""The detectors a run can train, by name: one `Method` object per method module, in one registry.

Trainer, evaluation and detection look a method up here and never compare its name: a new detector
is one module that builds its `Method` and calls `register`, plus one line in BUILTIN (a test
registers a tiny third method from its own file and trains, evaluates and detects with it).
Like open_clip's model configs or diffusers' schedulers, what differs between methods is data on
this object, not `if method == ...` branches elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import torch
from torch import nn

from pipeline.errors import UserError

CODE_ID = "stages.method"  # the name its code is hashed under, wherever the file lives

BUILTIN = ("stages.detectors.egre", "stages.detectors.lol")  # modules that register a method when imported


class Detector(nn.Module):
    """A method's network: forward(images, lare_maps) -> logits, and what training and scoring
    need of those logits (each method defines both)."""

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# A run's hyper-parameters, as params.json records them ("hparams"; stages.runs.records holds the rest
# of the run's records). Here, with the methods that read them: detectors may not import runs.
class Plateau(TypedDict):
    """EGRE's ReduceLROnPlateau arguments (stages.detectors.egre.DEFAULTS)."""

    mode: Literal["min", "max"]
    factor: float
    patience: int
    min_lr: float


class _Hparams(TypedDict):
    epochs: int
    patience: int
    batch_size: int
    lr: float
    betas: list[float]
    grad_clip: float | None
    plateau: Plateau | None
    val_fraction: float
    min_val_rows: int
    crop_size: int
    max_per_class: int | None
    shuffle_labels: bool
    memory_rows: int
    real_jpeg_quality: int | None


class Hparams(_Hparams, total=False):
    """A run's hyper-parameters (TrainConfig.hparams): the options, else the method's defaults, plus
    the method's own (Method.extra_hparams)."""

    mask_range: list[float]  # LoL
    aspect_range: list[float]  # LoL
    split: str  # the rows' split, where not `train`
    generators: list[str]  # the generators trained on, where not all


@dataclass(frozen=True)
class Method:
    """What the rest of the pipeline needs to know about a detector.

    model(visual, **args) builds the network around the CLIP image tower; the network has
    forward(images, lare_maps), loss(logits, labels) and score(logits) -> P(generated).
    model_args(hparams, lare_channels) are its constructor arguments besides the tower: a run saves
    them in params.json and loading builds from them (save and load mirror each other).
    prepare(images, hparams, train, generator) turns cropped uint8 images into the network's input
    (normalisation; augmentation and masks in training).
    reads_lare: whether the network reads LaRE maps (then evaluation checks that a test cache's maps
    were made like the training maps, detection computes them, and aligned maps are cropped with
    the image). defaults: the method's training hyper-parameters (see TrainConfig.hparams).
    extra_hparams(cfg) adds method-only options of a TrainConfig to a run's hyper-parameters.
    """

    name: str
    model: Callable[..., Detector]
    prepare: Callable[[torch.Tensor, Hparams, bool, torch.Generator | None], torch.Tensor]
    reads_lare: bool
    defaults: dict[str, Any]
    model_args: Callable[[Hparams, int], dict[str, Any]] = field(default=lambda hp, lare_channels: {})
    extra_hparams: Callable[[Any], dict[str, Any]] = field(default=lambda cfg: {})


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available by its name (a later registration of the same name replaces it)."""
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """The registered methods' names, built-in ones first."""
    order = {importlib.import_module(module).__name__: k for k, module in enumerate(BUILTIN)}
    return sorted(REGISTRY, key=lambda n: order.get(REGISTRY[n].model.__module__, len(order)))


def get(name: str) -> Method:
    """The method called `name`; an unknown name is one line for the user."""
    if name not in names():
        raise UserError(f"--method must be one of {', '.join(names())}, not '{name}'")
    return REGISTRY[name]


def per_method(key: str, fmt: Callable[[Any], str] = str) -> str:
    """'egre 50, lol 20': one default of every built-in method, for --help texts (`fmt` writes a value)."""
    return ", ".join(f"{n} {fmt(get(n).defaults[key])}" for n in names())
