"""A perturbation SPEC (`--perturb`) as text, steps and record, without the image code (so torch-free).

`Perturbation.parse` checks a SPEC and gives its canonical form; `record()` is what an artifact's
`perturb` param holds, `{spec, only, seed}`, and `from_record` reads it back: the one shape that
extraction writes, the artifact choice filters by, and `stages.features.perturb` applies (where the
families and their values are described). Parsing is a table, FAMILIES: a family's name -> the rule
that reads its values. `pipeline cache info` and `--help` read this module, never the image code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import xxhash

from pipeline.errors import UserError

CODE_ID = "stages.perturb_spec"  # the name its code is hashed under, wherever the file lives

ONLY = ("generated", "real")  # --perturb-only: the class a perturbation is applied to
ONLY_LABEL = {"generated": 1, "real": 0}
FRANK_MODES = ("noise", "blur", "jpeg", "crop")  # the order Frank's `combined` cycles them in
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


@dataclass(frozen=True)
class Step:
    """A generic family with its value, drawn per image; `key` names its computation (family, unit)."""

    family: str
    value: Draw
    unit: str = ""  # blur: "sigma" or "" (kernel size); resize: "px" or "" (factor)

    @property
    def key(self) -> tuple[str, str]:
        return self.family, self.unit

    def text(self) -> str:
        if self.unit == "sigma":
            return f"blur:sigma={self.value.text()}"
        return f"{self.family}:{self.value.text()}{self.unit}"

    def drawn(self, rng: np.random.Generator) -> float:
        """The image's value: the step's first draw from the row's generator."""
        return self.value.draw(rng)


@dataclass(frozen=True)
class SourceStep:
    """A source family's step, `family:mode` or `family:mode=VALUE`; its computation draws itself
    (Frank's modes, in this order: (combined) which of the four, the 0.5 coin, then their values)."""

    family: str
    mode: str
    value: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.family, self.mode

    def text(self) -> str:
        return f"{self.family}:{self.mode}" + ("" if self.value is None else f"={self.value:g}")

    def drawn(self, rng: np.random.Generator) -> float | None:
        return self.value


@dataclass(frozen=True)
class Generic:
    """How a generic family's value reads: an optional unit (blur's `sigma=` prefix, resize's `px`
    suffix), whole numbers or not, and `check` (draw, unit) -> why the value is wrong, or None."""

    check: Callable[[Draw, str], str | None]
    unit: str = ""
    integer: bool = False  # whole numbers when no unit is given

    def parse(self, family: str, arg: str, spec: str) -> Step:
        unit = ""
        if self.unit == "sigma" and arg.startswith("sigma="):
            unit, arg = "sigma", arg[len("sigma=") :]
        if self.unit == "px" and arg.endswith("px"):
            unit, arg = "px", arg[:-2]
        value = Draw.parse(arg, integer=self.integer and not unit, spec=spec)
        if why := self.check(value, unit):
            raise _bad(spec, why)
        return Step(family, value, unit)


def _jpeg(d: Draw, unit: str) -> str | None:
    whole = d.lo >= 1 and d.hi <= 100 and d.lo == int(d.lo) and d.hi == int(d.hi)
    return None if whole else "JPEG quality is a whole number in 1..100"


def _blur(d: Draw, unit: str) -> str | None:
    if unit:
        return "a blur sigma is positive" if d.lo <= 0 else None
    if any(v < 3 or v % 2 != 1 for v in (d.choices or (d.lo, d.hi))):
        return "a blur kernel size is an odd whole number >= 3 (or use blur:sigma=S)"
    return None


def _crop(d: Draw, unit: str) -> str | None:
    return None if d.lo >= 0 and d.hi < 100 else "a crop percentage is in [0, 100)"


def _resize(d: Draw, unit: str) -> str | None:
    if d.lo <= 0 or (not unit and d.hi > 1) or (unit and d.lo != int(d.lo)):
        return "resize takes a factor in (0, 1] or a whole number of pixels, e.g. 112px"
    return None


@dataclass(frozen=True)
class Source:
    """A source family's modes, each with what its value is ("": none, "px", "sigma")."""

    modes: dict[str, str]

    def parse(self, family: str, arg: str, spec: str) -> SourceStep:
        mode, sep, number = arg.partition("=")
        if mode not in self.modes:
            modes = ", ".join(m + ("=N" if v else "") for m, v in self.modes.items())
            raise _bad(spec, f"{family} takes one of {modes}, not '{arg}'")
        value = self.modes[mode]
        if bool(sep) != bool(value):
            raise _bad(spec, f"{family}:{mode} " + ("needs =N" if value else "takes no value"))
        if not value:
            return SourceStep(family, mode)
        kind = "whole number" if value == "px" else "number"
        if not re.fullmatch(_NUMBER, number) or float(number) <= 0 or (value == "px" and "." in number):
            raise _bad(spec, f"{family}:{mode}= takes a positive {kind}")
        return SourceStep(family, mode, float(number))


FAMILIES: dict[str, Generic | Source] = {
    "jpeg": Generic(_jpeg, integer=True),
    "blur": Generic(_blur, unit="sigma", integer=True),
    "noise": Generic(lambda d, unit: None),
    "crop": Generic(_crop),
    "resize": Generic(_resize, unit="px"),
    "frank": Source(dict.fromkeys((*FRANK_MODES, "combined"), "")),
    "genimage": Source({"lowres": "px"}),
    "aigcdetect": Source({"half": "", "blur": "sigma"}),
}


def _step(text: str, spec: str) -> Step | SourceStep:
    family, sep, arg = text.partition(":")
    if family not in FAMILIES or not sep or not arg:
        raise _bad(spec, f"'{text}' is not FAMILY:VALUE with a known family")
    return FAMILIES[family].parse(family, arg, spec)


@dataclass(frozen=True)
class Perturbation:
    """A checked SPEC (canonical), the class it applies to and its seed: an artifact's `perturb` param.

    Equal when SPEC and class are: that is what `--perturb SPEC --perturb-only CLASS` selects
    artifacts by (the seed says which draw, and is not a selector)."""

    spec: str
    only: str | None = None  # None: every row; "generated" or "real": that class only
    seed: int = field(default=0, compare=False)

    @classmethod
    def parse(cls, spec: str, seed: int = 0, only: str | None = None) -> Perturbation:
        """A SPEC such as `jpeg:10-75` or `noise:5-20+blur:3,5,7,9` (stages.features.perturb says each)."""
        text = _text(spec)
        if only is not None and only not in ONLY:
            raise UserError(f"--perturb-only must be one of {', '.join(ONLY)}, not '{only}'")
        return cls("+".join(s.text() for s in _steps(text, spec)), only, seed)

    @classmethod
    def from_record(cls, record: dict | None) -> Perturbation | None:
        """What an artifact's params record (None: a clean artifact, or one written before this)."""
        if not record:
            return None
        return cls(record["spec"], record.get("only"), int(record["seed"]))

    def record(self) -> dict:
        """What an artifact's params hold (and so its fingerprint)."""
        return {"spec": self.spec, "only": self.only, "seed": self.seed}

    @cached_property
    def steps(self) -> tuple[Step | SourceStep, ...]:
        return _steps(self.spec, self.spec)

    def applies(self, label: int) -> bool:
        return self.only is None or ONLY_LABEL[self.only] == int(label)

    def rng(self, image_id: str) -> np.random.Generator:
        """The generator of every draw for one image: seeded by (seed, image content id, SPEC)."""
        key = xxhash.xxh3_64_intdigest(f"{self.seed}:{image_id}:{self.spec}".encode())
        return np.random.default_rng(key)


def _text(spec: str) -> str:
    """The SPEC in lower case without spaces; raises UserError when that is empty."""
    text = "".join(str(spec).split()).lower()
    if not text:
        raise _bad(spec, "empty")
    return text


def _steps(text: str, spec: str) -> tuple[Step | SourceStep, ...]:
    """The steps of a SPEC's `text`, left to right; raises UserError (naming `spec`) when malformed."""
    return tuple(_step(part, spec) for part in text.split("+"))


def canonical(spec: str) -> str:
    """The SPEC as recorded (lower case, no spaces, values as parsed); raises UserError when malformed."""
    return Perturbation.parse(spec).spec


def describe(p: Perturbation | None) -> str:
    """`clean`, or the SPEC with the class it applies to, for tables and listings."""
    if p is None:
        return "clean"
    return p.spec + (f" ({p.only} only)" if p.only else "")


def requested(spec: str | None, only: str | None = None, seed: int = 0) -> Perturbation | None:
    """`--perturb SPEC [--perturb-only CLASS]`, checked; None: clean. Extraction records it, readers
    look artifacts up by it."""
    if spec is None:
        if only is not None:
            raise UserError("--perturb-only needs --perturb SPEC")
        return None
    return Perturbation.parse(spec, seed, only)
