"""EGRE as the pipeline knows it, without importing its network (torch): its name, its training
defaults, and where its network, its constructor arguments and its input preparation are
(stages.detectors.egre, whose code is part of a run's code version: the constructor arguments are
not in a run's fingerprint). `pipeline train --help` reads this (see lol_method)."""

from __future__ import annotations

from stages.detectors.method import Later, Method, register

# `epochs` caps a run; `patience` epochs without a better validation score end it (the reference
# trains until stopped). `plateau` is the reference's ReduceLROnPlateau, stepped on the validation
# AUC (the reference steps it on test files: we do not). max_per_class None: every training row.
DEFAULTS = {
    "lr": 1e-4, "batch_size": 48, "epochs": 50, "patience": 10, "grad_clip": 5.0, "betas": (0.9, 0.999),
    "max_per_class": None, "plateau": {"mode": "max", "factor": 0.5, "patience": 4, "min_lr": 1e-7},
}  # fmt: skip


METHOD = register(
    Method(
        "egre",
        Later("stages.detectors.egre:EGRE"),
        Later("stages.detectors.egre:prepare"),
        reads_lare=True,
        defaults=DEFAULTS,
        model_args=Later("stages.detectors.egre:model_args"),
    )
)
