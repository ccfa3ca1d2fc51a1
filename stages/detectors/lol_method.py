"""LoL as the pipeline knows it, without importing its network (torch): its name, its training
defaults, its own options, and where its network and input preparation are (stages.detectors.lol).
`pipeline train --help` reads this; like transformers' configuration_*.py beside modeling_*.py, a
method's declaration loads without its framework."""

from __future__ import annotations

from dataclasses import dataclass

from stages.detectors.method import Later, Method, option, register, value_range

# The paper's setting (Sec. 4.2): 1,600 real + 1,600 generated training images, 20 epochs (no early
# stop: patience 0), Adam 5e-6, or 5e-7 when the training subset is BigGAN (`lr_by_subset`).
DEFAULTS = {
    "lr": 5e-6, "batch_size": 4, "epochs": 20, "patience": 0, "grad_clip": None, "betas": (0.9, 0.999),
    "max_per_class": 1600, "plateau": None, "lr_by_subset": {"biggan": 5e-7},
}  # fmt: skip
MASK_RANGE = (0.6, 0.8)
ASPECT_RANGE = (0.33, 3.0)


@dataclass(frozen=True)
class Options:
    """LoL's own options: the ranges its mask's area and aspect are drawn from (Algorithm 1)."""

    mask_range: tuple[float, float] = option(
        MASK_RANGE, "LoL: r_mask drawn uniformly in LOW,HIGH.", parse=value_range
    )
    aspect_range: tuple[float, float] = option(
        ASPECT_RANGE, "LoL: r_aspect drawn uniformly in LOW,HIGH.", parse=value_range
    )


METHOD = register(
    Method(
        "lol",
        Later("stages.detectors.lol:LoL"),
        Later("stages.detectors.lol:prepare"),
        reads_lare=False,
        defaults=DEFAULTS,
        options=Options,
    )
)
