"""Learning on Less (LoL): a CLIP RN50 classifier trained on few images under a random rectangle mask.

The head is a linear layer on the tower's image embedding: RN50's attention-pooled embedding, and for
the ViT-L/14 of LoL's Table 2 its projected class token (open_clip's image embedding, the same place
in the tower). The text says only that it used CLIP-RN50, -RN101 and -ViT-L/14 "as classifiers"; it
is silent on where the head attaches in either, so the embedding is our choice.

The mask (Algorithm 1) is drawn per training sample and applied to all channels after
normalisation (masked pixels become 0, the mean colour). Its area is r_mask of the image and its
aspect h/w is r_aspect, each uniform in a range per sample. The printed pseudo-code takes a square
root for w as well, which would make the area far smaller than r_mask; we keep the area, the
evident intent: h = round(min(H, sqrt(S r_aspect))), w = round(min(W, S / h)), S = H W r_mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.detectors import backbone
from stages.detectors.backbone import CLIP_MEAN, CLIP_STD, embedding, embedding_width
from stages.detectors.detector import Detector
from stages.detectors.lol_method import ASPECT_RANGE, MASK_RANGE, Options
from stages.detectors.method import Hparams, recorded

CODE_ID = "stages.lol"  # the name its code is hashed under, wherever the file lives


class LoL(Detector):
    """CLIP image tower (ResNet or ViT) + a linear head on its image embedding; one logit."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embedding_width(visual), 1)

    def forward(self, images: torch.Tensor, lare: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(embedding(self.visual, images))[:, 0]

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, labels.float())

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())


def mask_rects(
    height: int, width: int, r_mask: torch.Tensor, r_aspect: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """(n, 4) int64 (top, left, h, w) of one rectangle per sample, inside the image, corner uniform.

    Algorithm 1 for float64 tensors of r_mask and r_aspect; torch.round rounds half to even, as
    Python's round does. The corners come from one (n, 2) uniform draw of `gen` (on the CPU).
    """
    area = height * width * r_mask.double()
    h = torch.round(torch.sqrt(area * r_aspect.double())).clamp(1, height)
    w = torch.round(area / h).clamp(1, width)
    u = torch.rand(len(area), 2, generator=gen, dtype=torch.float64)
    room = torch.stack([height - h + 1, width - w + 1], dim=1)
    corner = torch.minimum(torch.floor(u * room), room - 1)  # u * room may round up to room
    return torch.cat([corner, h[:, None], w[:, None]], dim=1).long()


def draw_masks(
    n: int,
    height: int,
    width: int,
    gen: torch.Generator,
    mask_range: tuple[float, float] = MASK_RANGE,
    aspect_range: tuple[float, float] = ASPECT_RANGE,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool (n, H, W) on `device`, True where masked: one rectangle per sample, r_mask and r_aspect drawn
    per sample. The draws are made on the CPU, so every device masks the same pixels."""
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    r_mask = mask_range[0] + u[:, 0] * (mask_range[1] - mask_range[0])
    r_aspect = aspect_range[0] + u[:, 1] * (aspect_range[1] - aspect_range[0])
    top, left, h, w = mask_rects(height, width, r_mask, r_aspect, gen).to(device)[:, :, None, None].unbind(1)
    i = torch.arange(height, device=device)[None, :, None]
    j = torch.arange(width, device=device)[None, None, :]
    return (i >= top) & (i < top + h) & (j >= left) & (j < left + w)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample horizontal flip and rotation by a multiple of 90 degrees (uint8 in, uint8 out).

    Right-angle rotations move pixels without resampling: an interpolating rotation would blur
    the high-frequency traces the detector is meant to find. The draws are made on the CPU; the
    whole batch then moves in one gather on the images' device (square images).
    """
    n, side = len(images), images.shape[-1]
    flips = torch.rand(n, generator=gen) < 0.5
    turns = torch.randint(0, 4, (n,), generator=gen)
    dev = images.device
    i = torch.arange(side, device=dev).view(side, 1).expand(side, side)
    j = torch.arange(side, device=dev).view(1, side).expand(side, side)
    last = side - 1
    # torch.rot90(f, k) reads f at these (row, column), for k = 0..3
    rows = torch.stack([i, j, last - i, last - j])[turns.to(dev)]
    cols = torch.stack([j, last - i, last - j, i])[turns.to(dev)]
    cols = torch.where(flips.to(dev).view(n, 1, 1), last - cols, cols)  # f = x flipped left-right
    index = (rows * side + cols).view(n, 1, side * side).expand(n, images.shape[1], side * side)
    return images.flatten(2).gather(2, index).view(images.shape)


def prepare(images: torch.Tensor, hp: Hparams, train: bool, gen: torch.Generator | None) -> torch.Tensor:
    """LoL's input: in training flip and rotation, normalisation (CLIP's mean and std), then the
    rectangle mask per sample (masked pixels 0 in normalised space); at test the crop, normalised."""
    if not train:
        return backbone.normalise(images, CLIP_MEAN, CLIP_STD)
    if gen is None:
        raise ValueError("LoL's training augmentation draws from a generator")
    x = backbone.normalise(augment(images, gen), CLIP_MEAN, CLIP_STD)
    c = x.shape[-1]
    own = recorded(Options, hp)
    masks = draw_masks(len(x), c, c, gen, own.mask_range, own.aspect_range, device=x.device)
    return x.masked_fill(masks[:, None], 0.0)
