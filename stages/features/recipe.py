"""The per-row recipe: what extraction caches and detection recomputes for one image file.

file bytes -> decode (RGB) -> [perturbation, extraction only] -> pixel crop (uint8, never resampled)
                           -> LaRE geometry (`resize`: Pillow bicubic to size x size, or `crop`)
                              + the row's noises (seeded by the content id) + its prompt index
The LaRE model call itself is `stages.features.lare`. This module, `stages.features.pixels`,
`stages.features.perturb` with `stages.features.perturb_spec`, `stages.features.params` (how a recorded
param reads), `stages.genimage.classes` (and the class tables' bytes) and `stages.features.lare` are
exactly what `lare_code_version` hashes: a change to any of them names new
artifacts, so a cache can never be called up to date with values computed otherwise.

Built from the parameters an artifact records (`from_params`, stages.features.params), so detection
with a trained run computes its rows from the run's record with this very code, never from a copy of
it. A perturbation (`--perturb`) is a property of the data a cache holds, not of a detector:
extraction applies it (`perturbed`), detection of new images never does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.code_versions import stage_code
from stages.features import lare as lare_math
from stages.features import params, perturb, perturb_spec, pixels
from stages.genimage import classes

CODE_ID = "stages.recipe"  # the name its code is hashed under, wherever the file lives


def lare_code_version() -> str:
    """The code (and data) that decides a LaRE map's value; docstrings and comments excluded."""
    modules = (lare_math, pixels, perturb, perturb_spec, params, classes, sys.modules[__name__])
    return stage_code(*modules) + classes.tables_hash()[:16]


def pixel_code_version() -> str:
    """The code that decides a pixel crop's value."""
    return stage_code(pixels, perturb, perturb_spec, params, sys.modules[__name__])


def chw(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)


@dataclass(frozen=True)
class LareRow:
    """The LaRE side of a row: geometry, noise draw and prompts, from the artifact's params."""

    size: int
    preprocess: str
    seed: int
    ensemble: int
    latent: tuple[int, int]  # (channels, side) of the model's latent at `size`
    prompt: str
    prompt_template: str | None
    small_images: str  # with `crop`: how an image smaller than `size` is enlarged

    def geometry(self, rgb: np.ndarray) -> np.ndarray:
        if self.preprocess == "resize":
            return pixels.resize_square(rgb, self.size)
        return pixels.centre_crop(rgb, self.size, self.small_images)

    def noise(self, image_id: str) -> torch.Tensor:
        channels, side = self.latent
        return lare_math.draw_noise(self.seed, image_id, self.ensemble, (channels, side, side))

    def prompts(self, paths: Sequence[str | Path] | np.ndarray) -> tuple[list[str], np.ndarray, list[int]]:
        """Distinct prompts, each path's prompt index, the rows that used the fallback prompt."""
        return classes.prompts_for(self.prompt, self.prompt_template, paths)


@dataclass(frozen=True)
class RowRecipe:
    """Decode a file and prepare what the caches hold for it; `None` parts are not computed."""

    max_pixels: int
    crop: params.PixelParams | None  # the pixel crop's window and enlargement of small images
    lare: LareRow | None
    perturbation: perturb_spec.Perturbation | None = None

    @classmethod
    def from_params(
        cls, lare: params.LareParams | None, latent: tuple[int, int] | None, crop: params.PixelParams | None
    ) -> RowRecipe:
        """The recipe of the artifacts whose recorded params are given (None: that part is not computed)."""
        row = None
        if lare is not None:
            if latent is None:
                raise ValueError("a LaRE recipe needs the model's latent geometry")
            row = LareRow(
                size=lare.size, preprocess=lare.preprocess, seed=lare.seed, ensemble=lare.ensemble,
                latent=(latent[0], latent[1]), prompt=lare.prompt, prompt_template=lare.prompt_template,
                small_images=lare.small_images,
            )  # fmt: skip
        recorded = lare or crop  # both artifacts of an extraction record the same max_pixels and perturb
        if recorded is None:
            return cls(pixels.DEFAULT_MAX_PIXELS, None, None)
        return cls(recorded.max_pixels, crop, row, recorded.perturb)

    def decode(self, data: bytes) -> np.ndarray:
        """RGB uint8 (H, W, 3), or raises pixels.BadImage with the reason to record."""
        return pixels.decode_rgb(data, self.max_pixels)

    def perturbed(self, rgb: np.ndarray, image_id: str, label: int) -> np.ndarray:
        """The decoded image as the artifacts' `perturb` param says (unchanged when clean)."""
        if self.perturbation is None:
            return rgb
        return perturb.apply(self.perturbation, rgb, image_id, label)

    def prepare(self, rgb: np.ndarray, image_id: str) -> dict[str, torch.Tensor]:
        """`crops` (3, S, S) uint8; `image` (3, size, size) uint8 and `noise` (1 + e, C, h, w)."""
        out: dict[str, torch.Tensor] = {}
        if self.crop is not None:
            out["crops"] = chw(pixels.centre_crop(rgb, self.crop.size, self.crop.small_images))
        if self.lare is not None:
            out["image"] = chw(self.lare.geometry(rgb))
            out["noise"] = self.lare.noise(image_id)
        return out

    def placeholder(self, image_id: str) -> dict[str, torch.Tensor]:
        """What a failed row carries through a batch (its values are never stored: status says failed)."""
        return self.prepare(np.zeros((8, 8, 3), dtype=np.uint8), image_id)
