"""What a method's network is to the trainer and the scorer: forward(images, lare_maps) -> logits, and
the loss and the score of those logits (each method defines both)."""

from __future__ import annotations

import torch
from torch import nn


class Detector(nn.Module):
    """A method's network: forward(images, lare_maps) -> logits, and what training and scoring
    need of those logits (each method defines both)."""

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
