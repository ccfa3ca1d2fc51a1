"""Perturbations of a decoded image, for robustness studies: a SPEC names them, composed with `+`.

This module computes them (`apply`); stages.features.perturb_spec parses a SPEC into the record
artifacts carry, without torch.

Generic families (each value drawn per image):
    jpeg:Q  jpeg:LO-HI          re-encode with Pillow's JPEG encoder at quality Q (drawn per image)
    blur:K  blur:3,5,7,9        Gaussian blur, kernel size K (odd), sigma by OpenCV's kernel-size formula
                                (OpenCV asked for sigma 0 uses fixed tables for K <= 7 instead)
    blur:sigma=S                Gaussian blur of that sigma, kernel by OpenCV's sigma rule
    noise:VAR  noise:5-20       additive Gaussian noise of that variance (pixel units), rounded, clipped
    crop:P  crop:5-20           random crop keeping (100 - P)% of width and height, bicubic back to size
    resize:F  resize:112px      bicubic downscale by F, or the shorter side to that many pixels

Source families, each one source's code as written (the issue's reading of the sources' code, checked
against their public repositories; docs/REFERENCE_NOTES.md is silent on all three):
    frank:noise|blur|jpeg|crop  Frank et al. (2020), `create_perturbed_imagedata.py`: each image is
                                perturbed with probability 0.5; noise of STANDARD DEVIATION U(5, 20),
                                truncated to uint8; blur kernel 3, 5, 7 or 9 at sigma 4 (OpenCV's
                                BORDER_DEFAULT passed as sigmaX), reflect-101 border; JPEG at quality 95
                                (the drawn quality is passed as an unknown cv2 flag and ignored) of the
                                RGB array encoded as if it were BGR; a CENTRED crop of U(5, 20)% (half
                                per side, truncated), back to size with OpenCV's bicubic (a = -0.75)
    frank:combined              one of the four per image; Frank cycles them in file order, we draw
                                which from the image's generator (equal shares in expectation)
    genimage:lowres=PX          shorter side to PX (Pillow bicubic), then back to the original size
                                (Pillow bicubic). GenImage's degradation code was not found; the
                                filters are our choice, the round trip follows the issue's reading
    aigcdetect:half             AIGCDetectBenchmark's test-time `resize`: Pillow bilinear (through
                                torchvision) to int(h/2) x int(w/2), then the benchmark's load resize,
                                bilinear, shorter side to 256 (its 224 centre crop is our geometry's)
    aigcdetect:blur=S           scipy.ndimage.gaussian_filter of sigma S per channel on uint8 (truncate
                                4, 'reflect' border: the edge pixel repeated), as the benchmark calls it

`LO-HI` draws uniformly in the range (integers for jpeg), `a,b,c` draws one of the values. Steps run
left to right (`noise:5-20+blur:3,5,7,9+jpeg:10-75+crop:5-20` is LoL's Figure A7 chain). Every draw of
an image comes from one generator seeded by (seed, image content id, canonical SPEC), so an image is
perturbed the same way on every worker, in every batch and after every resume: Frank's coin and
`combined`'s choice too. The generic families follow the LoL paper's Appendix A TEXT (families and
ranges, docs/REFERENCE_NOTES.md, "Robustness"); it is silent on the blur sigma, the crop's placement and the
noise's rounding, which are chosen as said here. LoL says its perturbations follow Frank et al.; Frank's
code differs from that text (see `frank:`), so both are offered.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as tvf

from stages.features.perturb_spec import FRANK_MODES, Perturbation

CODE_ID = "stages.perturb"  # the name its code is hashed under, wherever the file lives


def sigma_for_kernel(k: int) -> float:
    """OpenCV's (and torchvision's) sigma for a kernel size: 0.3 * ((k - 1) / 2 - 1) + 0.8."""
    return 0.3 * ((k - 1) * 0.5 - 1) + 0.8


def kernel_for_sigma(sigma: float) -> int:
    """OpenCV's kernel size for a sigma on 8-bit images: round(6 * sigma + 1), made odd."""
    return int(round(sigma * 6 + 1)) | 1


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    """The image encoded by Pillow's JPEG encoder (libjpeg's standard tables scaled to `quality`)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """The image after a JPEG encode at `quality` and a decode."""
    with Image.open(io.BytesIO(jpeg_bytes(rgb, quality))) as img:
        return np.asarray(img.convert("RGB"))


def gaussian_blur(rgb: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """A k x k Gaussian of that sigma with a reflect-101 border (OpenCV's default), rounded to uint8;
    a kernel larger than the image is cut to what reflect padding allows."""
    h, w = rgb.shape[:2]
    k = min(k, (2 * min(h, w) - 1) | 1)
    x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)
    return tvf.gaussian_blur(x, [k, k], [sigma, sigma]).permute(1, 2, 0).numpy()


def pil_resize(rgb: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Pillow's resize to `size` (width, height) with that filter (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, resample))


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(width, height) of an h x w image scaled by `scale`, rounded, at least 1."""
    return max(1, round(w * scale)), max(1, round(h * scale))


# ---- generic families: the value is drawn (stages.features.perturb_spec.Step) before the computation
def _noise(rgb: np.ndarray, rng: np.random.Generator, variance: float) -> np.ndarray:
    noise = rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(math.sqrt(variance))
    return np.clip(np.rint(rgb.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def _crop(rgb: np.ndarray, rng: np.random.Generator, percent: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = max(1, round(h * (1 - percent / 100))), max(1, round(w * (1 - percent / 100)))
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
    return pil_resize(rgb[top : top + ch, left : left + cw], (w, h), Image.Resampling.BICUBIC)


def _resize(rgb: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    return pil_resize(rgb, scaled_size(h, w, scale), Image.Resampling.BICUBIC)


def _resize_px(rgb: np.ndarray, rng: np.random.Generator, px: float) -> np.ndarray:
    return _resize(rgb, rng, px / min(rgb.shape[:2]))


# ---- source families: one source's computation as its code runs it (module docstring) --------------
AIGCDETECT_LOAD_SIZE = 256  # AIGCDetectBenchmark's --loadSize: the shorter side every test image gets


def opencv_cubic(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV's INTER_CUBIC resize to h x w (Keys a = -0.75, half-pixel centres, edges replicated),
    through torch's bicubic in float32, rounded: within one grey level of cv2's fixed-point result
    (tested), without making OpenCV a dependency."""
    x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _frank_noise(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    std = rng.uniform(5.0, 20.0)  # Frank names it the variance, then multiplies the noise by it
    return np.clip(rgb + std * rng.standard_normal(rgb.shape), 0, 255).astype(np.uint8)  # truncates


def _frank_blur(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return gaussian_blur(rgb, (3, 5, 7, 9)[int(rng.integers(4))], 4.0)  # sigma: cv2.BORDER_DEFAULT = 4


def _frank_jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # cv2.imencode's default quality; it reads Frank's RGB array as BGR, so its YCbCr has R and B swapped
    return jpeg_roundtrip(np.ascontiguousarray(rgb[..., ::-1]), 95)[..., ::-1]


def _frank_crop(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    share = rng.uniform(0.05, 0.2)
    dy, dx = int(h * share * 0.5), int(w * share * 0.5)
    # Frank slices [d:-d] (empty when d is 0) and asks cv2 for (h, w) as (width, height), a transpose of
    # non-square images; on his square images both equal this
    return opencv_cubic(rgb[dy : h - dy, dx : w - dx], h, w)


FRANK = dict(zip(FRANK_MODES, (_frank_noise, _frank_blur, _frank_jpeg, _frank_crop), strict=True))


def _frank(mode: str):
    def apply(rgb: np.ndarray, rng: np.random.Generator, value: float | None) -> np.ndarray:
        op = FRANK[FRANK_MODES[int(rng.integers(len(FRANK_MODES)))] if mode == "combined" else mode]
        return op(rgb, rng) if rng.random() > 0.5 else rgb  # Frank: `np.random.sample() > .5`

    return apply


def _genimage_lowres(rgb: np.ndarray, rng: np.random.Generator, px: float | None) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = pil_resize(rgb, scaled_size(h, w, px / min(h, w)), Image.Resampling.BICUBIC)
    return pil_resize(small, (w, h), Image.Resampling.BICUBIC)


def _aigcdetect_half(rgb: np.ndarray, rng: np.random.Generator, value: float | None) -> np.ndarray:
    h, w = rgb.shape[:2]
    bilinear = tvf.InterpolationMode.BILINEAR
    half = tvf.resize(Image.fromarray(rgb), [int(h / 2), int(w / 2)], interpolation=bilinear)
    return np.asarray(tvf.resize(half, AIGCDETECT_LOAD_SIZE, interpolation=bilinear))


def _aigcdetect_blur(rgb: np.ndarray, rng: np.random.Generator, sigma: float | None) -> np.ndarray:
    return ndimage.gaussian_filter(rgb, sigma=(sigma, sigma, 0))  # truncate 4, mode 'reflect', uint8


# A step's computation by its key, (family, unit) or (family, mode): the image, the row's generator
# (for every random choice) and the step's value (drawn for a generic family; a source mode's own).
Op = Callable[[np.ndarray, np.random.Generator, Any], np.ndarray]
APPLY: dict[tuple[str, str], Op] = {
    ("jpeg", ""): lambda rgb, rng, q: jpeg_roundtrip(rgb, int(q)),
    ("blur", ""): lambda rgb, rng, k: gaussian_blur(rgb, int(k), sigma_for_kernel(int(k))),
    ("blur", "sigma"): lambda rgb, rng, s: gaussian_blur(rgb, kernel_for_sigma(s), s),
    ("noise", ""): _noise,
    ("crop", ""): _crop,
    ("resize", ""): _resize,
    ("resize", "px"): _resize_px,
    **{("frank", m): _frank(m) for m in (*FRANK_MODES, "combined")},
    ("genimage", "lowres"): _genimage_lowres,
    ("aigcdetect", "half"): _aigcdetect_half,
    ("aigcdetect", "blur"): _aigcdetect_blur,
}


def apply(p: Perturbation, rgb: np.ndarray, image_id: str, label: int) -> np.ndarray:
    """The decoded image perturbed as `p` says: its steps left to right, every draw from the image's
    generator (unchanged for a row of the class `p` does not apply to)."""
    if not p.applies(label):
        return rgb
    rng = p.rng(image_id)
    for step in p.steps:
        rgb = APPLY[step.key](rgb, rng, step.drawn(rng))
    return np.ascontiguousarray(rgb)
