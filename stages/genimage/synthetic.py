"""A small synthetic dataset in GenImage's folder layout, for the demo and the tests.

The generated class carries a real, simple generator artifact: it is made at a quarter of its
resolution and upsampled, as many generators' last stages do, so it lacks the per-pixel sensor
noise of the "real" class. Formats (JPEG / PNG) and sizes are drawn independently of the label,
so the only signal a detector can learn is the artifact itself. `artifact="grid"` marks the
generated class with faint lines every 8 px instead: an artifact nothing here was tuned on.

With `format_only_quality=Q` it is the opposite: both classes are drawn alike and differ ONLY in file
format (real: JPEG at quality Q, generated: PNG), GenImage's format bias in its purest form. A
detector that scores well there has learned the format, which the JPEG-Q control must expose.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from stages.genimage.classes import synsets
from stages.genimage.index import SUBSETS

SIZES = ((256, 256), (320, 240), (200, 180), (288, 352), (512, 384), (160, 224))
ARTIFACTS = ("upsample", "grid")
GENERATOR_TAG = {
    "adm": "adm",
    "biggan": "biggan",
    "glide": "glide",
    "midjourney": "midjourney",
    "sdv14": "sdv4",
    "sdv15": "sdv5",
    "vqdm": "vqdm",
    "wukong": "wukong",
}


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random content: a few octaves of upsampled colour noise (float, 0..255)."""
    out = np.zeros((h, w, 3), dtype=np.float32)
    for cells, amp in ((3, 90.0), (8, 45.0), (24, 20.0)):
        grid = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
        img = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        out += (np.asarray(img, dtype=np.float32) / 127.5 - 1) * amp
    return out + 128.0


GRID_STEP = 8  # px between the lines of the "grid" artifact
GRID_LEVEL = 25.0  # grey levels the lines add


def make_image(
    rng: np.random.Generator, h: int, w: int, generated: bool, artifact: str = "upsample"
) -> np.ndarray:
    """One image; `artifact` is what marks a generated one: "upsample" (made at a quarter of the
    resolution, then upsampled) or "grid" (a photo-like image with faint lines every GRID_STEP px,
    an artifact the project's defaults were never tuned on)."""
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, not {artifact!r}")
    if generated and artifact == "grid":
        img = _scene(rng, h, w) + rng.normal(0, 8, size=(h, w, 3))
        yy, xx = np.mgrid[:h, :w]
        img += GRID_LEVEL * (((yy % GRID_STEP) == 0) | ((xx % GRID_STEP) == 0))[..., None]
        return np.clip(img, 0, 255).astype(np.uint8)
    if generated:
        small = _scene(rng, max(h // 4, 8), max(w // 4, 8)) + rng.normal(
            0, 6, size=(max(h // 4, 8), max(w // 4, 8), 3)
        )
        small = np.clip(small, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))
    return np.clip(_scene(rng, h, w) + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_genimage(
    root: str | Path,
    subset: str = "sdv14",
    per_class: dict[str, int] | None = None,
    seed: int = 0,
    layout: str = "genimage",
    format_only_quality: int | None = None,
    artifact: str = "upsample",
) -> Path:
    """Write `per_class[split]` real and generated images per split; returns the subset folder.

    layout "genimage": `<root>/<top>/<archive>/{train,val}/{ai,nature}` (nested as GenImage ships);
    layout "binary": `<root>/<alias>/{train,val}/{0_real,1_fake}`. `artifact`: see make_image.
    """
    per_class = per_class or {"train": 16, "val": 8}
    archive, top = SUBSETS[subset]
    if layout == "genimage":
        base, dirs = Path(root) / top / archive, {1: "ai", 0: "nature"}
    elif layout == "binary":
        base, dirs = Path(root) / subset, {1: "1_fake", 0: "0_real"}
    else:
        raise ValueError(layout)
    wnids = synsets()
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, folder in dirs.items():
            out = base / split / folder
            out.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                h, w = SIZES[int(rng.integers(len(SIZES)))]
                fmt = "JPEG" if rng.random() < 0.5 else "PNG"
                cls = int(rng.integers(1000))
                rgb = make_image(rng, h, w, bool(label) and format_only_quality is None, artifact)
                if format_only_quality is not None:
                    fmt = "PNG" if label else "JPEG"
                ext = ".JPEG" if fmt == "JPEG" else ".png"
                name = (
                    f"{cls:03d}_{GENERATOR_TAG[subset]}_{k:05d}{ext}" if label else f"{wnids[cls]}_{k}{ext}"
                )
                (out / name).write_bytes(encode_image(rgb, fmt, format_only_quality or 95))
    return base
