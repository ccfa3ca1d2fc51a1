"""The detectors a run can train, by name: one `Method` object per method module, in one registry.

Trainer, evaluation and detection look a method up here and never compare its name: a new detector
is one module that builds its `Method` and calls `register`, plus one line in BUILTIN (a test
registers a tiny third method from its own file and trains, evaluates and detects with it). Its own
options (LoL's mask ranges) are a dataclass of `option` fields in that module, with their defaults
and help: `pipeline train` offers them, and a run records them in its hparams.
Nothing here imports torch, so that a command's --help reads the methods' defaults and options in a
fraction of a second: the built-in methods are declared in egre_method and lol_method, their networks
(egre, lol) named there as `Later` references and imported when a run first builds one.
Like open_clip's model configs or diffusers' schedulers, what differs between methods is data on
this object, not `if method == ...` branches elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

    from stages.detectors.detector import Detector

CODE_ID = "stages.method"  # the name its code is hashed under, wherever the file lives

Own = TypeVar("Own")  # a method's options dataclass

# modules that register a method when imported: each declares its method without importing its network
BUILTIN = ("stages.detectors.egre_method", "stages.detectors.lol_method")


# A run's hyper-parameters, as params.json records them ("hparams"; stages.runs.records holds the rest
# of the run's records). Here, with the methods that read them: detectors may not import runs.
class Plateau(TypedDict):
    """EGRE's ReduceLROnPlateau arguments (stages.detectors.egre_method.DEFAULTS)."""

    mode: Literal["min", "max"]
    factor: float
    patience: int
    min_lr: float


class _Hparams(TypedDict):
    epochs: int
    patience: int
    batch_size: int
    lr: float
    betas: list[float]
    grad_clip: float | None
    plateau: Plateau | None
    val_fraction: float
    min_val_rows: int
    crop_size: int
    max_per_class: int | None
    shuffle_labels: bool
    memory_rows: int
    real_jpeg_quality: int | None


class Hparams(_Hparams, total=False):
    """A run's hyper-parameters (TrainConfig.hparams): the options, else the method's defaults, plus
    the method's own (Method.options, read back with `recorded`: LoL's mask_range, aspect_range)."""

    split: str  # the rows' split, where not `train`
    generators: list[str]  # the generators trained on, where not all


def option(default: Any, help: str, parse: Callable[[str, str], Any] | None = None) -> Any:
    """A field of a method's options dataclass (Method.options), declared once: its default, its
    --help text, and `parse(text, flag)` where the command line gives the value as text (a range)."""
    return field(default=default, metadata={"help": help, "parse": parse})


def value_range(text: str, flag: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high), 0 < LOW <= HIGH: a range an option draws from."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes two numbers 'LOW,HIGH', not '{text}'") from None
    if not 0 < lo <= hi:
        raise UserError(f"{flag} needs 0 < LOW <= HIGH, not '{text}'")
    return lo, hi


class Later:
    """A function or class named 'module:name', imported when first called: how a method names its
    network and its input preparation without importing their module (torch) where it is declared."""

    def __init__(self, ref: str):
        self.module, _, self.name = ref.partition(":")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Later('{self.module}:{self.name}')"


@dataclass(frozen=True)
class NoOptions:
    """The options of a method with none of its own."""


@dataclass(frozen=True)
class Method:
    """What the rest of the pipeline needs to know about a detector.

    model(visual, **args) builds the network around the CLIP image tower; the network has
    forward(images, lare_maps), loss(logits, labels) and score(logits) -> P(generated).
    model_args(hparams, lare_channels) are its constructor arguments besides the tower: a run saves
    them in params.json and loading builds from them (save and load mirror each other).
    prepare(images, hparams, train, generator) turns cropped uint8 images into the network's input
    (normalisation; augmentation and masks in training).
    reads_lare: whether the network reads LaRE maps (then evaluation checks that a test cache's maps
    were made like the training maps, detection computes them, and aligned maps are cropped with
    the image). defaults: the method's training hyper-parameters (see TrainConfig.hparams).
    model, prepare and model_args are callables or `Later` references to them.
    options: its own options, a frozen dataclass of `option` fields (lol_method.Options); a run records
    their values among its hyper-parameters (own_hparams).
    """

    name: str
    model: Callable[..., Detector]
    prepare: Callable[[torch.Tensor, Hparams, bool, torch.Generator | None], torch.Tensor]
    reads_lare: bool
    defaults: dict[str, Any]
    model_args: Callable[[Hparams, int], dict[str, Any]] = field(default=lambda hp, lare_channels: {})
    options: type = NoOptions

    def own_hparams(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The method's own options, `given` (by name) over their defaults, as a run's hyper-parameters
        record them (tuples as JSON lists). An option of another method is not this one's (LoL's
        ranges do not reach EGRE); one of no method is a mistake, said in one line."""
        own = {f.name for f in dataclasses.fields(self.options)}
        if unknown := sorted(set(given) - set(own_options())):
            raise UserError(f"no method has the option(s) {', '.join(unknown)}")
        values = dataclasses.asdict(self.options(**{k: v for k, v in given.items() if k in own}))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def network_module(self) -> ModuleType:
        """The module of the method's network (its docstring says what the method is; its code is part
        of a run's code version), imported here."""
        ref = self.model
        return importlib.import_module(ref.module if isinstance(ref, Later) else ref.__module__)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available by its name (a later registration of the same name replaces it)."""
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """The registered methods' names, built-in ones first (in BUILTIN's order), then the others as
    registered."""
    builtin = [importlib.import_module(module).METHOD.name for module in BUILTIN]
    return sorted(REGISTRY, key=lambda n: builtin.index(n) if n in builtin else len(builtin))


def get(name: str) -> Method:
    """The method called `name`; an unknown name is one line for the user."""
    if name not in names():
        raise UserError(f"--method must be one of {', '.join(names())}, not '{name}'")
    return REGISTRY[name]


def per_method(key: str, fmt: Callable[[Any], str] = str) -> str:
    """'egre 50, lol 20': one default of every built-in method, for --help texts (`fmt` writes a value)."""
    return ", ".join(f"{n} {fmt(get(n).defaults[key])}" for n in names())


def recorded(options: type[Own], hp: Mapping[str, object]) -> Own:
    """A method's own options as a run's hyper-parameters recorded them (Method.own_hparams)."""
    values = {f.name: hp[f.name] for f in dataclasses.fields(options)}  # type: ignore[arg-type]
    return options(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class OwnOption:
    """A method's own option as `pipeline train` offers it: --NAME taking `kind` (text where `parse`
    reads it), its help and default (as its method module declares them, `option`)."""

    name: str
    kind: type
    help: str
    default: Any
    parse: Callable[[str, str], Any] | None

    def read(self, value: Any) -> Any:
        """The option's value of what the command line gave."""
        return value if self.parse is None else self.parse(value, f"--{self.name.replace('_', '-')}")


def own_options() -> dict[str, OwnOption]:
    """Every registered method's own options by name (the first method declaring a name gives it)."""
    out: dict[str, OwnOption] = {}
    for name in names():
        options = REGISTRY[name].options
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            parse = f.metadata.get("parse")
            kind = str if parse else hints[f.name]
            out.setdefault(f.name, OwnOption(f.name, kind, f.metadata["help"], f.default, parse))
    return out
