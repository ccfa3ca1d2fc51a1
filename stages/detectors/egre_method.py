"""EGRE as the pipeline knows it, without importing its network (torch): its name, its training
defaults, its constructor arguments, and where its network and input preparation are
(stages.detectors.egre). `pipeline train --help` reads this (see lol_method)."""

from __future__ import annotations

from stages.detectors.method import Hparams, Later, Method, register

HEADS, HEAD_DIM = 8, 64  # the reference's MultiHeadMapAttention: h = 8, d_k = d_v = 64
# `epochs` caps a run; `patience` epochs without a better validation score end it (the reference
# trains until stopped). `plateau` is the reference's ReduceLROnPlateau, stepped on the validation
# AUC (the reference steps it on test files: we do not). max_per_class None: every training row.
DEFAULTS = {
    "lr": 1e-4, "batch_size": 48, "epochs": 50, "patience": 10, "grad_clip": 5.0, "betas": (0.9, 0.999),
    "max_per_class": None, "plateau": {"mode": "max", "factor": 0.5, "patience": 4, "min_lr": 1e-7},
}  # fmt: skip


def model_args(hp: Hparams, lare_channels: int) -> dict:
    """EGRE's constructor arguments besides the tower (saved in params.json, built from on load)."""
    return {
        "lare_channels": lare_channels,
        "grid": hp["crop_size"] // 16,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
    }


METHOD = register(
    Method(
        "egre",
        Later("stages.detectors.egre:EGRE"),
        Later("stages.detectors.egre:prepare"),
        reads_lare=True,
        defaults=DEFAULTS,
        model_args=model_args,
    )
)
