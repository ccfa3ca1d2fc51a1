"""Perturbations of a decoded image, for robustness studies: a SPEC names them, composed with `+`.

    jpeg:Q  jpeg:LO-HI          re-encode with Pillow's JPEG encoder at quality Q (drawn per image)
    blur:K  blur:3,5,7,9        Gaussian blur, kernel size K (odd), sigma by OpenCV's kernel-size rule
    blur:sigma=S                Gaussian blur of that sigma, kernel by OpenCV's sigma rule
    noise:VAR  noise:5-20       additive Gaussian noise of that variance (pixel units), rounded, clipped
    crop:P  crop:5-20           random crop keeping (100 - P)% of width and height, bicubic back to size
    resize:F  resize:112px      bicubic downscale by F, or the shorter side to that many pixels

`LO-HI` draws uniformly in the range (integers for jpeg), `a,b,c` draws one of the values. Steps run
left to right (`noise:5-20+blur:3,5,7,9+jpeg:10-75+crop:5-20` is LoL's Figure A7 chain). Every draw of
an image comes from one generator seeded by (seed, image content id, canonical SPEC), so an image is
perturbed the same way on every worker, in every batch and after every resume. The LoL paper's
Appendix A gives the families and ranges (docs/REFERENCE_NOTES.md, "Robustness"); it is silent on the
blur sigma, the crop's placement and the noise's rounding, which are chosen as said here.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from PIL import Image
from torchvision.transforms.v2 import functional as tvf

from pipeline.errors import UserError

CODE_ID = "stages.perturb"  # the name its code is hashed under, wherever the file lives

FAMILIES = ("jpeg", "blur", "noise", "crop", "resize")
ONLY = ("generated", "real")  # --perturb-only: the class a perturbation is applied to
ONLY_LABEL = {"generated": 1, "real": 0}
_NUMBER = r"\d+(?:\.\d*)?|\.\d+"


def _bad(spec: str, why: str) -> UserError:
    return UserError(
        f"bad --perturb '{spec}': {why}; expected FAMILY:VALUE steps joined by '+', families "
        f"{', '.join(FAMILIES)} (e.g. jpeg:96, jpeg:10-75, blur:3,5,7,9, blur:sigma=3, noise:5-20, "
        "crop:5-20, resize:0.5, resize:112px)"
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
            with Image.open(io.BytesIO(jpeg_bytes(rgb, int(v)))) as img:
                return np.asarray(img.convert("RGB"))
        if self.family == "blur":
            sigma, k = (
                (v, kernel_for_sigma(v)) if self.unit == "sigma" else (sigma_for_kernel(int(v)), int(v))
            )
            k = min(k, (2 * min(h, w) - 1) | 1)  # reflect padding needs half a kernel inside the image
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
            return tvf.gaussian_blur(x, [k, k], [sigma, sigma]).permute(1, 2, 0).numpy()
        if self.family == "noise":
            noise = rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(math.sqrt(v))
            return np.clip(np.rint(rgb.astype(np.float32) + noise), 0, 255).astype(np.uint8)
        if self.family == "crop":
            ch, cw = max(1, round(h * (1 - v / 100))), max(1, round(w * (1 - v / 100)))
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            window = Image.fromarray(np.ascontiguousarray(rgb[top : top + ch, left : left + cw]))
            return np.asarray(window.resize((w, h), Image.Resampling.BICUBIC))
        # resize
        scale = v / min(h, w) if self.unit == "px" else v
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def _step(text: str, spec: str) -> Step:
    family, sep, arg = text.partition(":")
    if family not in FAMILIES or not sep or not arg:
        raise _bad(spec, f"'{text}' is not FAMILY:VALUE with a known family")
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

    steps: tuple[Step, ...]
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
