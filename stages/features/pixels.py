"""Decoding one image safely, and the two geometries the caches use: resize (bicubic), and a centre crop.

The crop never resamples: a resampled image loses exactly the high-frequency traces detectors
look for. An image smaller than the crop is enlarged without resampling either by tiling copies of
itself (LoL's stitching) or by reflect-101 padding (the EGRE reference's albumentations
`PadIfNeeded`, centred); docs/REFERENCE_NOTES.md, EGRE "Images" and LoL.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

from pipeline.errors import first_line

CODE_ID = "stages.pixels"  # the name its code is hashed under, wherever the file lives

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; GenImage's largest images are far smaller


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the cache."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode file bytes to an RGB uint8 array (H, W, 3), or raise BadImage with a reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(
                    f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
                )
            img.load()
            return np.array(img.convert("RGB"))
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data; all are recorded
        raise BadImage(f"corrupt or truncated: {first_line(e)}") from None


SMALL_IMAGES = ("tile", "reflect")  # --small-images; the first is the default


def centre_crop(rgb: np.ndarray, size: int, small: str) -> np.ndarray:
    """Centre `size` x `size` crop; a side shorter than `size` is first tiled or reflect-101 padded."""
    return crop_tiled(rgb, size) if small == "tile" else crop_reflect(rgb, size)


def crop_reflect(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre crop after padding each short side to `size` with reflect-101 (numpy's `reflect` mode:
    the edge pixel is not repeated, cv2's BORDER_REFLECT_101), the padding split evenly as
    albumentations' centred PadIfNeeded does."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        rgb = np.pad(rgb, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
        h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def crop_tiled(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre `size` x `size` crop, tiling the image first along any side shorter than `size`."""
    h, w = rgb.shape[:2]
    reps = (math.ceil(size / h), math.ceil(size / w), 1)
    if reps != (1, 1, 1):
        rgb = np.tile(rgb, reps)
        h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


# The LaRE reference calls `Image.resize((256, 256))` with no filter: Pillow's default for an RGB image,
# bicubic (docs/REFERENCE_NOTES.md, "Preprocess"). Named explicitly so a Pillow default change cannot move it.
RESAMPLE = "bicubic"
_FILTERS = {"bicubic": Image.Resampling.BICUBIC}


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Straight resize to `size` x `size` (bicubic), aspect ratio not kept: the LaRE reference's geometry."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), _FILTERS[RESAMPLE]))
