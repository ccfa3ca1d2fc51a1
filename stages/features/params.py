"""The recorded parameters of the two artifacts extraction writes, as typed records.

An artifact's `params` (cache_schema.md) say how its values were computed; extraction builds a
record and writes `to_record()`, every reader takes `from_record(params)`. What an older cache's
record lacks is read here, and only here, as that version computed it: no `small_images` (before
`--small-images`) is tiled, no `perturb` is clean, no `resample` is cache schema 1 (bilinear
`resize`, older class names). `to_record()` is exactly the dict extraction stores (so its
fingerprint); an older artifact's stored dict stays its identity and is compared as stored.
Torch-free: `pipeline cache info` and the artifact choice read these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.features import pixels as pixel_ops
from stages.features.perturb_spec import Perturbation

CODE_ID = "stages.params"  # the name its code is hashed under, wherever the file lives

DEFAULT_PROMPT = "a photo"  # `--prompt`'s default; a schema-1 record with a template holds null for it
SCHEMA1_RESAMPLE = "bilinear"  # what a schema-1 `resize` did (it recorded no `resample`)
PREPROCESS = ("resize", "crop")  # LareParams.preprocess: what the recipe computes (stages.features.recipe)
PRECISIONS = ("fp32", "bf16", "fp16")  # LareParams.precision: the dtypes LaRE computes in (lare.PRECISIONS)


@dataclass(frozen=True)
class LareParams:
    """A LaRE artifact's params: the geometry, the noise draw, the prompts and the model call."""

    timestep: int
    ensemble: int
    size: int
    preprocess: str  # "resize" or "crop"
    resample: str | None  # with `resize`: its filter (pixels.RESAMPLE)
    small_images: str  # how an image smaller than `size` is enlarged (used, and recorded, with `crop` only)
    prompt: str  # with a template: the prompt of files whose name holds no class
    prompt_template: str | None
    dtype: str
    precision: str
    seed: int
    max_pixels: int
    perturb: Perturbation | None
    schema1: bool = False  # written by cache schema 1 (no `resample` recorded): see the module docstring

    def to_record(self) -> dict[str, Any]:
        return {
            "timestep": self.timestep,
            "ensemble": self.ensemble,
            "size": self.size,
            "preprocess": self.preprocess,
            "resample": self.resample,
            "small_images": self.small_images if self.preprocess == "crop" else None,
            "prompt": self.prompt,
            "prompt_template": self.prompt_template,
            "dtype": self.dtype,
            "precision": self.precision,
            "seed": self.seed,
            "max_pixels": self.max_pixels,
            "perturb": self.perturb.record() if self.perturb else None,
        }

    @classmethod
    def from_record(cls, p: dict[str, Any]) -> LareParams:
        crop = p["preprocess"] == "crop"
        return cls(
            timestep=int(p["timestep"]), ensemble=int(p["ensemble"]), size=int(p["size"]),
            preprocess=p["preprocess"],
            resample=p.get("resample", None if crop else SCHEMA1_RESAMPLE),
            small_images=p.get("small_images") or pixel_ops.SMALL_IMAGES[0],
            prompt=p["prompt"] or DEFAULT_PROMPT, prompt_template=p["prompt_template"], dtype=p["dtype"],
            precision=p["precision"], seed=int(p["seed"]),
            max_pixels=int(p.get("max_pixels", pixel_ops.DEFAULT_MAX_PIXELS)),
            perturb=Perturbation.from_record(p.get("perturb")), schema1="resample" not in p,
        )  # fmt: skip


@dataclass(frozen=True)
class PixelParams:
    """A pixel artifact's params: the centre crop's window and how a smaller image is enlarged."""

    size: int
    small_images: str = pixel_ops.SMALL_IMAGES[0]
    max_pixels: int = pixel_ops.DEFAULT_MAX_PIXELS
    perturb: Perturbation | None = None

    def to_record(self) -> dict[str, Any]:
        enlarged = "tiled" if self.small_images == "tile" else "reflect-101 padded"
        return {
            "size": self.size,
            "geometry": f"centre crop, {enlarged} when smaller",
            "small_images": self.small_images,
            "max_pixels": self.max_pixels,
            "perturb": self.perturb.record() if self.perturb else None,
        }

    @classmethod
    def from_record(cls, p: dict[str, Any]) -> PixelParams:
        return cls(
            int(p["size"]),
            p.get("small_images", cls.small_images),
            int(p.get("max_pixels", cls.max_pixels)),
            Perturbation.from_record(p.get("perturb")),
        )
