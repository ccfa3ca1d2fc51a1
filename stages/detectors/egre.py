"""EGRE, the classifier of LaRE^2 (CVPR 2024): CLIP RN50 features refined by the LaRE map.

Spatial refinement (8 heads of width 64, xavier-initialised, as the reference): the LaRE map,
pooled to the layer3 grid and mapped to one map per head, is added to that head's attention logits
(a mean token queries the layer3 tokens). Channel refinement: the map's per-channel means go through
a bias-free MLP whose sigmoid weighs the pooled layer3 channels.
Head: [attention-pooled embedding, spatial, channel] -> Linear -> 2 logits, cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stages.detectors import backbone
from stages.detectors.backbone import IMAGENET_MEAN, IMAGENET_STD, dims, visual_features
from stages.detectors.detector import Detector
from stages.detectors.method import Hparams

CODE_ID = "stages.egre"  # the name its code is hashed under, wherever the file lives

HEADS, HEAD_DIM = 8, 64  # the reference's MultiHeadMapAttention: h = 8, d_k = d_v = 64


class EGRE(Detector):
    def __init__(
        self, visual: nn.Module, lare_channels: int, grid: int, heads: int = HEADS, head_dim: int = HEAD_DIM
    ):
        super().__init__()
        c3, d = dims(visual)
        self.visual, self.heads, self.head_dim, self.grid = visual, heads, head_dim, grid
        self.to_heads = nn.Conv2d(lare_channels, heads, kernel_size=1)
        self.pos = nn.Parameter(torch.randn(grid * grid + 1, c3) / math.sqrt(c3))
        width = heads * head_dim  # 512 for the reference, whatever the backbone's layer3 width
        self.q, self.k, self.v = (nn.Linear(c3, width) for _ in range(3))
        self.o = nn.Linear(width, c3)
        for layer in (self.q, self.k, self.v, self.o):  # the reference's init
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(c3)
        self.channel = nn.Sequential(  # the reference's ChannelAlignLayer: no biases
            nn.Linear(lare_channels, 128, bias=False), nn.ReLU(), nn.Linear(128, c3, bias=False), nn.Sigmoid()
        )
        self.head = nn.Linear(d + 2 * c3, 2)

    def spatial(self, f3: torch.Tensor, lare: torch.Tensor) -> torch.Tensor:
        """Mean-token attention over the layer3 tokens, each head's logits biased by its LaRE map."""
        b, c, g, _ = f3.shape
        h, dh = self.heads, self.head_dim
        tokens = f3.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.pos
        bias = self.to_heads(F.adaptive_avg_pool2d(lare, (g, g))).flatten(2)  # (B, heads, g*g)
        bias = torch.cat([bias.mean(2, keepdim=True), bias], dim=2)[:, :, None, :]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, dh).transpose(1, 2)

        q, k, v = split(self.q(tokens[:, :1])), split(self.k(tokens)), split(self.v(tokens))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
        out = self.o((self.drop(attn) @ v).transpose(1, 2).reshape(b, 1, h * dh))[:, 0]
        return self.norm(tokens[:, 0] + self.drop(out))

    def forward(self, images: torch.Tensor, lare: torch.Tensor) -> torch.Tensor:
        f3, emb = visual_features(self.visual, images)
        channel = self.channel(lare.mean(dim=(2, 3))) * f3.mean(dim=(2, 3))
        return self.head(torch.cat([emb, self.spatial(f3, lare), channel], dim=1))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        """Probability that the image is generated."""
        return torch.softmax(logits.float(), dim=1)[:, 1]


def prepare(images: torch.Tensor, hp: Hparams, train: bool, gen: torch.Generator | None) -> torch.Tensor:
    """EGRE's input: the crop, normalised with ImageNet's mean and std (the reference's choice; it uses
    no other augmentation)."""
    return backbone.normalise(images, IMAGENET_MEAN, IMAGENET_STD)


def model_args(hp: Hparams, lare_channels: int) -> dict:
    """EGRE's constructor arguments besides the tower (saved in params.json, built from on load)."""
    return {
        "lare_channels": lare_channels,
        "grid": hp["crop_size"] // 16,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
    }
