"""Learning on Less (LoL): a CLIP RN50 classifier trained on few images under a random rectangle mask.

The mask (Algorithm 1) is drawn per training sample and applied to all channels after
normalisation (masked pixels become 0, the mean colour). Its area is r_mask of the image and its
aspect h/w is r_aspect, each uniform in a range per sample. The printed pseudo-code takes a square
root for w as well, which would make the area far smaller than r_mask; we keep the area, the
evident intent: h = round(min(H, sqrt(S r_aspect))), w = round(min(W, S / h)), S = H W r_mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages import backbone
from stages.backbone import CLIP_MEAN, CLIP_STD, dims, visual_features
from stages.method import Method, register

# The paper's setting (Sec. 4.2): 1,600 real + 1,600 generated training images, 20 epochs (no early
# stop: patience 0), Adam 5e-6, or 5e-7 when the training subset is BigGAN (`lr_by_subset`).
DEFAULTS = {
    "lr": 5e-6, "batch_size": 4, "epochs": 20, "patience": 0, "grad_clip": None, "betas": (0.9, 0.999),
    "max_per_class": 1600, "plateau": None, "lr_by_subset": {"biggan": 5e-7},
}  # fmt: skip
MASK_RANGE = (0.6, 0.8)
ASPECT_RANGE = (0.33, 3.0)


class LoL(nn.Module):
    """CLIP image tower + a linear head on its attention-pooled embedding; one logit."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(dims(visual)[1], 1)

    def forward(self, images: torch.Tensor, lare: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(visual_features(self.visual, images)[1])[:, 0]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.float())

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())


def mask_rect(
    height: int, width: int, r_mask: float, r_aspect: float, gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one mask rectangle, inside the image, corner uniform (Algorithm 1)."""
    area = height * width * r_mask
    h = max(1, min(height, round(math.sqrt(area * r_aspect))))
    w = max(1, min(width, round(area / h)))
    top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
    return top, left, h, w


def draw_masks(
    n: int,
    height: int,
    width: int,
    gen: torch.Generator,
    mask_range: tuple[float, float] = MASK_RANGE,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
) -> torch.Tensor:
    """Bool (n, H, W), True where masked: one rectangle per sample, r_mask and r_aspect drawn per sample."""
    out = torch.zeros(n, height, width, dtype=torch.bool)
    for i in range(n):
        u = torch.rand(2, generator=gen, dtype=torch.float64)
        r_mask = mask_range[0] + float(u[0]) * (mask_range[1] - mask_range[0])
        r_aspect = aspect_range[0] + float(u[1]) * (aspect_range[1] - aspect_range[0])
        top, left, h, w = mask_rect(height, width, r_mask, r_aspect, gen)
        out[i, top : top + h, left : left + w] = True
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, CLIP mean/std."""
    return backbone.normalise(images, CLIP_MEAN, CLIP_STD)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample horizontal flip and rotation by a multiple of 90 degrees (uint8 in, uint8 out).

    Right-angle rotations move pixels without resampling: an interpolating rotation would blur
    the high-frequency traces the detector is meant to find.
    """
    flips = torch.rand(len(images), generator=gen) < 0.5
    turns = torch.randint(0, 4, (len(images),), generator=gen)
    out = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    return torch.stack([torch.rot90(x, int(k), dims=(1, 2)) for x, k in zip(out, turns, strict=True)])


def prepare(images: torch.Tensor, hp: dict, train: bool, gen: torch.Generator | None) -> torch.Tensor:
    """LoL's input: in training flip and rotation, normalisation, then the rectangle mask per sample
    (masked pixels 0 in normalised space); at test the crop, normalised."""
    if not train:
        return normalise(images)
    x = normalise(augment(images, gen))
    c = x.shape[-1]
    masks = draw_masks(len(x), c, c, gen, tuple(hp["mask_range"]), tuple(hp["aspect_range"]))
    return x.masked_fill(masks[:, None], 0.0)


def extra_hparams(cfg) -> dict:
    """The mask's ranges (TrainConfig.mask_range, .aspect_range) are LoL's own hyper-parameters."""
    return {"mask_range": list(cfg.mask_range), "aspect_range": list(cfg.aspect_range)}


METHOD = register(
    Method("lol", LoL, prepare, reads_lare=False, defaults=DEFAULTS, extra_hparams=extra_hparams)
)
