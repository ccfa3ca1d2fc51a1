"""Perturbations of a decoded image, for robustness studies: a SPEC names them, composed with `+`.

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
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from PIL import Image
from scipy import ndimage
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as tvf

from pipeline.errors import UserError

CODE_ID = "stages.perturb"  # the name its code is hashed under, wherever the file lives

FAMILIES = ("jpeg", "blur", "noise", "crop", "resize", "frank", "genimage", "aigcdetect")
ONLY = ("generated", "real")  # --perturb-only: the class a perturbation is applied to
ONLY_LABEL = {"generated": 1, "real": 0}
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"


def _bad(spec: str, why: str) -> UserError:
    return UserError(
        f"bad --perturb '{spec}': {why}; expected FAMILY:VALUE steps joined by '+', families "
        f"{', '.join(FAMILIES)} (e.g. jpeg:96, jpeg:10-75, blur:3,5,7,9, blur:sigma=3, noise:5-20, "
        "crop:5-20, resize:0.5, resize:112px, frank:noise, frank:combined, genimage:lowres=112, "
        "aigcdetect:half, aigcdetect:blur=1)"
    )


@dataclass(frozen=True)
class Draw:
    """A value: one of `choices`, or uniform in [lo, hi] (whole numbers when `integer`)."""

    choices: tuple[float, ...] | None
    lo: float
    hi: float
    integer: bool

    @classmethod
    def parse(cls, text: str, integer: bool, spec: str) -> Draw:
        if re.fullmatch(rf"({_NUMBER})-({_NUMBER})", text):
            lo, hi = (float(v) for v in text.split("-"))
            if lo > hi:
                raise _bad(spec, f"range '{text}' has LOW > HIGH")
            return cls(None, lo, hi, integer)
        if re.fullmatch(rf"({_NUMBER})(,({_NUMBER}))*", text):
            values = tuple(float(v) for v in text.split(","))
            return cls(values, min(values), max(values), integer)
        raise _bad(spec, f"'{text}' is not a number, LOW-HIGH or a,b,c")

    def draw(self, rng: np.random.Generator) -> float:
        if self.choices is not None:
            return (
                self.choices[int(rng.integers(len(self.choices)))]
                if len(self.choices) > 1
                else self.choices[0]
            )
        if self.integer:
            return float(rng.integers(int(self.lo), int(self.hi) + 1))
        return float(rng.uniform(self.lo, self.hi))

    def text(self) -> str:
        if self.choices is not None:
            return ",".join(f"{v:g}" for v in self.choices)
        return f"{self.lo:g}-{self.hi:g}"


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


@dataclass(frozen=True)
class Step:
    """One family with its value; `apply` uses the row's generator for every random choice."""

    family: str
    value: Draw
    unit: str = ""  # blur: "sigma" or "" (kernel size); resize: "px" or "" (factor)

    def text(self) -> str:
        if self.unit == "sigma":
            return f"blur:sigma={self.value.text()}"
        return f"{self.family}:{self.value.text()}{self.unit}"

    def apply(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        v = self.value.draw(rng)
        h, w = rgb.shape[:2]
        if self.family == "jpeg":
            return jpeg_roundtrip(rgb, int(v))
        if self.family == "blur":
            if self.unit == "sigma":
                return gaussian_blur(rgb, kernel_for_sigma(v), v)
            return gaussian_blur(rgb, int(v), sigma_for_kernel(int(v)))
        if self.family == "noise":
            noise = rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(math.sqrt(v))
            return np.clip(np.rint(rgb.astype(np.float32) + noise), 0, 255).astype(np.uint8)
        if self.family == "crop":
            ch, cw = max(1, round(h * (1 - v / 100))), max(1, round(w * (1 - v / 100)))
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            return pil_resize(rgb[top : top + ch, left : left + cw], (w, h), Image.Resampling.BICUBIC)
        # resize
        scale = v / min(h, w) if self.unit == "px" else v
        return pil_resize(rgb, scaled_size(h, w, scale), Image.Resampling.BICUBIC)


# ---- source families: one source's computation as its code runs it (module docstring) --------------
FRANK_MODES = ("noise", "blur", "jpeg", "crop")  # the order Frank's `combined` cycles them in
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


@dataclass(frozen=True)
class SourceOp:
    """A source family's mode: its computation and what its value is ("": none, "px", "sigma")."""

    apply: Callable[[np.ndarray, np.random.Generator, float | None], np.ndarray]
    value: str = ""


SOURCES: dict[tuple[str, str], SourceOp] = {
    **{("frank", m): SourceOp(_frank(m)) for m in (*FRANK_MODES, "combined")},
    ("genimage", "lowres"): SourceOp(_genimage_lowres, "px"),
    ("aigcdetect", "half"): SourceOp(_aigcdetect_half),
    ("aigcdetect", "blur"): SourceOp(_aigcdetect_blur, "sigma"),
}


@dataclass(frozen=True)
class SourceStep:
    """A source family's step, `family:mode` or `family:mode=VALUE`. Frank's modes draw, in this
    order: (combined) which of the four, the 0.5 coin, then the perturbation's own values."""

    family: str
    mode: str
    value: float | None = None

    def text(self) -> str:
        return f"{self.family}:{self.mode}" + ("" if self.value is None else f"={self.value:g}")

    def apply(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return SOURCES[self.family, self.mode].apply(rgb, rng, self.value)


def _source_step(family: str, arg: str, spec: str) -> SourceStep:
    mode, sep, number = arg.partition("=")
    op = SOURCES.get((family, mode))
    if op is None:
        modes = ", ".join(m + ("=N" if o.value else "") for (f, m), o in SOURCES.items() if f == family)
        raise _bad(spec, f"{family} takes one of {modes}, not '{arg}'")
    if bool(sep) != bool(op.value):
        raise _bad(spec, f"{family}:{mode} " + ("needs =N" if op.value else "takes no value"))
    if not op.value:
        return SourceStep(family, mode)
    kind = "whole number" if op.value == "px" else "number"
    if not re.fullmatch(_NUMBER, number) or float(number) <= 0 or (op.value == "px" and "." in number):
        raise _bad(spec, f"{family}:{mode}= takes a positive {kind}")
    return SourceStep(family, mode, float(number))


def _step(text: str, spec: str) -> Step | SourceStep:
    family, sep, arg = text.partition(":")
    if family not in FAMILIES or not sep or not arg:
        raise _bad(spec, f"'{text}' is not FAMILY:VALUE with a known family")
    if any(f == family for f, _ in SOURCES):
        return _source_step(family, arg, spec)
    unit = ""
    if family == "blur" and arg.startswith("sigma="):
        unit, arg = "sigma", arg[len("sigma=") :]
    if family == "resize" and arg.endswith("px"):
        unit, arg = "px", arg[:-2]
    value = Draw.parse(arg, integer=family == "jpeg" or (family == "blur" and not unit), spec=spec)
    lo, hi = value.lo, value.hi
    if family == "jpeg" and not (lo >= 1 and hi <= 100 and lo == int(lo) and hi == int(hi)):
        raise _bad(spec, "JPEG quality is a whole number in 1..100")
    if family == "blur" and not unit and any(v < 3 or v % 2 != 1 for v in (value.choices or (lo, hi))):
        raise _bad(spec, "a blur kernel size is an odd whole number >= 3 (or use blur:sigma=S)")
    if family == "blur" and unit and lo <= 0:
        raise _bad(spec, "a blur sigma is positive")
    if family == "crop" and not (lo >= 0 and hi < 100):
        raise _bad(spec, "a crop percentage is in [0, 100)")
    if family == "resize" and (lo <= 0 or (not unit and hi > 1) or (unit and lo != int(lo))):
        raise _bad(spec, "resize takes a factor in (0, 1] or a whole number of pixels, e.g. 112px")
    return Step(family, value, unit)


@dataclass(frozen=True)
class Perturbation:
    """A parsed SPEC: its steps, and the canonical text that names it in params and fingerprints."""

    steps: tuple[Step | SourceStep, ...]
    seed: int = 0
    only: str | None = None  # None: every row; "generated" or "real": that class only

    @property
    def spec(self) -> str:
        return "+".join(s.text() for s in self.steps)

    def record(self) -> dict:
        """What an artifact's params hold (and so its fingerprint)."""
        return {"spec": self.spec, "only": self.only, "seed": self.seed}

    def applies(self, label: int) -> bool:
        return self.only is None or ONLY_LABEL[self.only] == int(label)

    def rng(self, image_id: str) -> np.random.Generator:
        key = xxhash.xxh3_64_intdigest(f"{self.seed}:{image_id}:{self.spec}".encode())
        return np.random.default_rng(key)

    def __call__(self, rgb: np.ndarray, image_id: str, label: int) -> np.ndarray:
        if not self.applies(label):
            return rgb
        rng = self.rng(image_id)
        for step in self.steps:
            rgb = step.apply(rgb, rng)
        return np.ascontiguousarray(rgb)


def canonical(spec: str) -> str:
    """The SPEC as recorded (lower case, no spaces, values as parsed); raises UserError when malformed."""
    return parse(spec).spec


def parse(spec: str, seed: int = 0, only: str | None = None) -> Perturbation:
    """A SPEC such as `jpeg:10-75` or `noise:5-20+blur:3,5,7,9` (see the module docstring)."""
    text = "".join(str(spec).split()).lower()
    if not text:
        raise _bad(spec, "empty")
    if only is not None and only not in ONLY:
        raise UserError(f"--perturb-only must be one of {', '.join(ONLY)}, not '{only}'")
    return Perturbation(tuple(_step(part, spec) for part in text.split("+")), seed, only)


def from_record(record: dict | None) -> Perturbation | None:
    """The perturbation an artifact's params record (None: a clean artifact, or one written before this)."""
    if not record:
        return None
    return parse(record["spec"], int(record["seed"]), record.get("only"))


def describe(record: dict | None) -> str:
    """`clean`, or the SPEC with the class it applies to, for tables and listings."""
    if not record:
        return "clean"
    return record["spec"] + (f" ({record['only']} only)" if record.get("only") else "")
