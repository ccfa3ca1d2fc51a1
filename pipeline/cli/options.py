"""Every option the commands share, declared once, and how --help shows the defaults.

An option is declared once, beside its help text: an `Annotated` type (its name, flags and help),
taken by a command as `device: Device = None`. None means "not given": `config` builds the stage's
config dataclass from a command's parsed options in one step and leaves those out, so that the
dataclass (the one place a default is written) decides. `help_defaults` reads those defaults into
--help, and resolves each `{module:function}` in a help text (`late_help`): a rule the stage
applies, in the words of the function that describes it. A detection method's own options are
declared in its method's declaration (stages.detectors.method.option); `with_method_options` offers
them. Nothing here imports torch, nor does a --help (it reads stages.configs and the methods'
declarations); a command imports its stage when it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperOption

T = TypeVar("T")


def given(
    options: Mapping[str, Any],
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    renamed: Mapping[str, str] | None = None,
    shaped: Mapping[str, Callable[[Any], Any]] | None = None,
) -> dict[str, Any]:
    """The options the user gave, of a command's parsed `options` (its `locals()`, taken first thing),
    as fields of its stage's config: None (not given) is left out, so that the config dataclass's
    default, the one place it is written, holds. `renamed`: option -> field where a flag and a field
    differ (`pair` -> `pairs`); `shaped`: option -> what makes the field's value of the option's
    (split_pair, a comma-separated list; a value shaped to None is left out too); `only` / `skip`: the
    options that are, or are not, fields of this config (the command reads the others itself)."""
    renamed, shaped = renamed or {}, shaped or {}
    out = {}
    for name, value in options.items():
        if name in skip or (only is not None and name not in only):
            continue
        if value is not None and name in shaped:
            value = shaped[name](value)
        if value is not None:
            out[renamed.get(name, name)] = value
    return out


def config(
    make: Callable[..., T],
    options: Mapping[str, Any],
    *,
    skip: Collection[str] = (),
    renamed: Mapping[str, str] | None = None,
    shaped: Mapping[str, Callable[[Any], Any]] | None = None,
    **fields: Any,
) -> T:
    """A command's config in one step: `make` (its config dataclass) of the options given (`given`)
    and the `fields` the command computes from the options it reads itself (named in `skip`). An
    option that is no field of the config fails here, loudly, not ignored."""
    return make(**given(options, skip={*skip, *fields}, renamed=renamed, shaped=shaped), **fields)


def listed(text: str) -> tuple[str, ...] | None:
    """A comma-separated option ('adm,biggan'): its values, blanks dropped; None when none is left."""
    return tuple(v.strip() for v in text.split(",") if v.strip()) or None


@functools.cache
def _defaults_of(source: str) -> dict[str, Any]:
    """The defaults of 'module:Name', a config dataclass."""
    module, name = source.split(":")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(getattr(importlib.import_module(module), name)):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _text(value: Any) -> str:
    """A default as --help shows it: tuples as the option takes them (LOW,HIGH), None as none."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _shown_default(option: TyperOption, sources: tuple[str, ...], renamed: dict[str, str]) -> str | None:
    """What `option`'s --help says its default is; None: typer's own rendering (a literal default)."""
    if option.is_flag and not option.secondary_opts:  # --compile, --no-verify: off unless typed
        return "on" if option.default else "off"
    if option.default is not None or option.required:
        return None
    if option.name in renamed:
        source, field = renamed[option.name].rsplit(".", 1)
        value = _defaults_of(source)[field]
    else:
        found = [_defaults_of(s) for s in sources if option.name in _defaults_of(s)]
        value = found[0][option.name] if found else None
    if isinstance(value, bool) and option.secondary_opts:  # --progress/--no-progress: the one in force
        return (option.opts if value else option.secondary_opts)[0].lstrip("-")
    if value is None and sources:  # a training option left to the method (TrainConfig.hparams)
        from stages.detectors import method

        if all(option.name in method.get(n).defaults for n in method.names()):
            return "the method's: " + method.per_method(
                option.name, lambda v: "all" if v is None else _text(v)
            )
    return _text(value)


_LATE = re.compile(r"\{([\w.]+):(\w+)\}")


def late_help(text: str) -> str:
    """`text` with each `{module:function}` replaced by what the function returns: a rule in the words
    of the stage that applies it, from the very constants it applies it with (e.g.
    `{stages.configs:train_precision_help}`), so that no rule is restated in a help text."""
    return _LATE.sub(lambda m: getattr(importlib.import_module(m[1]), m[2])(), text)


def help_defaults(*sources: str, **renamed: str) -> type[TyperCommand]:
    """The command class of a command whose options default to None (`given` leaves them to a stage's
    config) or are flags: its --help shows each option's real default (a flag's: off), read from
    `sources` ('module:Name' of config dataclasses; the first holding the option's name wins) so
    that no default is written twice, and each help text's `{module:function}` parts (late_help).
    Read when --help is printed, from stages.configs and the methods' declarations, which import no
    torch (tests/pipeline/test_cli.py holds it); a command's start pays for none of it.
    `renamed`: option -> 'module:Name.field' where the names differ."""
    declared: dict[str | None, str | None] = {}  # option -> its help as written, `{module:function}` kept

    class Command(TyperCommand):
        def format_help(self, ctx: Any, formatter: Any) -> None:  # typer vendors click's Context
            for param in self.get_params(ctx):  # with a method's own options (with_method_options)
                if not isinstance(param, TyperOption) or param is self.get_help_option(ctx):
                    continue
                said = isinstance(param.show_default, str)  # where declared (with_method_options)
                if not said and (text := _shown_default(param, sources, renamed)):
                    param.show_default = text
                if written := declared.setdefault(param.name, param.help):
                    param.help = late_help(written)
            super().format_help(ctx, formatter)

    return Command


METHOD_OPTIONS = "method_options"  # ctx.meta's key of the method options given (with_method_options)


def with_method_options(command: type[TyperCommand], after: str) -> type[TyperCommand]:
    """`command` also taking every registered method's own options, each declared with its help and
    default in its method module (stages.detectors.method.option), so that a new method's option is
    written there alone; --help lists them after the option `after`. The values given, parsed, reach
    the command in ctx.meta[METHOD_OPTIONS]. The registry is read when the command parses its
    arguments or prints its help, not when `pipeline` starts; the methods' declarations it reads
    import no torch (their networks are imported when a run builds one)."""

    class Command(command):  # type: ignore[valid-type, misc]  # a class made at run time
        def get_params(self, ctx: Any) -> list[Any]:
            params = super().get_params(ctx)
            at = [p.name for p in params].index(after) + 1
            return [*params[:at], *_method_params(), *params[at:]]

        def invoke(self, ctx: Any) -> Any:
            from stages.detectors import method

            own = method.own_options()
            values = {name: ctx.params.pop(name) for name in own}
            ctx.meta[METHOD_OPTIONS] = {
                name: own[name].read(value) for name, value in values.items() if value is not None
            }
            return super().invoke(ctx)

    return Command


def _method_params() -> list[TyperOption]:
    from stages.detectors import method

    return _typer_options(tuple(method.own_options().values()))


@functools.cache
def _typer_options(own: tuple[Any, ...]) -> list[TyperOption]:
    """The options `own` (stages.detectors.method.OwnOption) as typer declares a command's parameters:
    --help renders them as those written in a command's signature."""

    def options(**values: Any) -> None:
        """The methods' own options."""

    options.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                o.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[o.kind | None, typer.Option(help=o.help, show_default=_text(o.default))],
            )
            for o in own
        ]
    )
    app = typer.Typer(add_completion=False)
    app.command()(options)
    return typer.main.get_command(app).params  # type: ignore[return-value]


_JOIN = "\x00"  # joins the two values of a two-valued option into the one token click parses


def two_valued(command: type[TyperCommand], flag: str, shape: str) -> type[TyperCommand]:
    """`command` with `flag` taking two values, repeatable (`--pair A B --pair C D`), which typer does
    not declare: the two tokens after the flag are joined into one, and `split_pair` parts them."""

    class Command(command):  # type: ignore[valid-type, misc]  # a class made at run time
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            joined, k = [], 0
            while k < len(args):
                if args[k] == flag:
                    values = args[k + 1 : k + 3]
                    if len(values) < 2 or any(v.startswith("--") for v in values):
                        from pipeline.errors import UserError

                        raise UserError(f"{flag} takes two values: {shape}")
                    joined += [flag, _JOIN.join(values)]
                    k += 3
                else:
                    joined.append(args[k])
                    k += 1
            return super().parse_args(ctx, joined)

    return Command


def split_pair(token: str) -> tuple[str, str]:
    """The two values of a two-valued option (two_valued)."""
    a, _, b = token.partition(_JOIN)
    return a, b


def usable_device(device: str | None, here: bool = True) -> None:
    """A command's first step: a --device this machine cannot use ends in one line before anything
    (cache, run directory, results) is created; pipeline.config.resolve_device decides."""
    from pipeline.config import DEFAULT_DEVICE, resolve_device

    resolve_device(device or DEFAULT_DEVICE, here)


def log(msg: str) -> None:
    """Progress and notes go to stderr; stdout carries a command's result."""
    typer.echo(msg, err=True)


class _Lines(logging.Handler):
    """The stages' progress lines (their module loggers, INFO and up) as bare lines on stderr (stdout
    where they are the command's result: `results_on_stdout`), the stream read at each line so that a
    test's captured output gets them. Under torchrun, rank 0 alone says what the job does; a warning
    (a file skipped) is every rank's own."""

    err = True

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.environ.get("RANK", "0") == "0"

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(record.getMessage(), err=self.err)


@contextlib.contextmanager
def results_on_stdout() -> Iterator[None]:
    """Inside, the stages' lines go to stdout: `pipeline eval`'s lines are its results."""
    _Lines.err = False
    try:
        yield
    finally:
        _Lines.err = True


def show_progress_lines() -> None:
    """Route the `stages` and `pipeline` loggers to stderr, once."""
    for name in ("stages", "pipeline"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Lines) for h in logger.handlers):
            logger.addHandler(_Lines())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a library's root handler (tensorboard's, say) would print them twice


# --- every command ------------------------------------------------------------------------------
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
Progress = Annotated[bool | None, typer.Option("--progress/--no-progress", help="Show progress bars.")]
Seed = Annotated[
    int | None,
    typer.Option(
        help="Seed of every random draw: extraction's per-image noises and perturbations (keyed by image "
        "content), training's sample, validation slice and epochs."
    ),
]

# --- extraction (extract, robustness) -----------------------------------------------------------
DataRoot = Annotated[
    Path, typer.Option("--data-root", help="Folder holding the GenImage subsets (or one subset).")
]
CacheDir = Annotated[
    str | None, typer.Option("--cache-dir", help="Where <subset>.zarr caches are written (path or URL).")
]
Model = Annotated[
    str | None,
    typer.Option(
        help="Hub id (id@revision), local diffusers folder, or random weights: 'tiny', 'random-sd15'."
    ),
]
Size = Annotated[int | None, typer.Option(help="Side of the square image the VAE encodes.")]
PixelSize = Annotated[
    int | None,
    typer.Option(help="Side of the stored pixel crop, the window training crops come from (no resampling)."),
]
Preprocess = Annotated[
    str | None,
    typer.Option(
        help="resize: straight resize to --size (reference); "
        "crop: resample-free centre crop, aligned with the pixel cache."
    ),
]
Ensemble = Annotated[int | None, typer.Option(help="Noises per image, averaged (e in the paper).")]
RowsPerShard = Annotated[
    int | None, typer.Option(help="Rows per shard (layout only; not part of the fingerprint).")
]
_LARE_BATCH = "Images per LaRE model call. Changes the last bits of the maps only."
LareBatchSize = Annotated[int | None, typer.Option(help=_LARE_BATCH)]  # extract, detect
ExtractBatchSize = Annotated[int | None, typer.Option("--extract-batch-size", help=_LARE_BATCH)]  # robustness
PerturbSpec = Annotated[
    str | None,
    typer.Option(
        "--perturb",
        help="Perturb each decoded image before the geometry, e.g. jpeg:96, jpeg:10-75, blur:3,5,7,9, "
        "blur:sigma=3, noise:5-20, crop:5-20, resize:0.5, resize:112px, or as a source's code runs it: "
        "frank:noise|blur|jpeg|crop|combined, genimage:lowres=112, aigcdetect:half, aigcdetect:blur=1; "
        "steps joined by '+'. "
        "Seeded by (--seed, image content, SPEC); stored beside the clean artifacts.",
    ),
]
PerturbOnly = Annotated[
    str | None, typer.Option("--perturb-only", help="Apply --perturb to one class: generated or real.")
]

# --- training (train, robustness) ---------------------------------------------------------------
Method = Annotated[str | None, typer.Option(help="egre (LaRE^2) or lol (Learning on Less).")]
Backbone = Annotated[
    str | None,
    typer.Option(help="open_clip config: RN50, RN101, ViT-L-14 (lol only), or tiny-RN / tiny-ViT for tests."),
]
BackboneWeights = Annotated[
    str | None, typer.Option(help="openai (download), random, or a local open_clip checkpoint file.")
]
Epochs = Annotated[int | None, typer.Option(help="At most this many epochs.")]
TrainBatchSize = Annotated[int | None, typer.Option(help="Training images per step.")]
Lr = Annotated[float | None, typer.Option(help="Learning rate (LoL: 5e-7 on a BigGAN training cache).")]
CropSize = Annotated[int | None, typer.Option(help="Side of the random (train) / centre (test) crop.")]
MaxPerClass = Annotated[
    str | None,
    typer.Option(
        help="Train on N real + N generated rows of the train split, seeded, or 'all' (LoL's 1600: "
        "the paper's)."
    ),
]

# --- reading caches and runs (train, eval, calibrate, detect) -------------------------------------
ExtraCaches = Annotated[list[str] | None, typer.Argument(help="More caches, as if given after --from-cache.")]
Checkpoint = Annotated[
    str,
    typer.Option(
        "--checkpoint",
        help="A finished run: its directory or URL (file://, s3://, https://, a .zip), checked against "
        "its run-manifest.json.",
    ),
]
NoVerify = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Skip the cache checksum verification; a cache still being extracted (no manifest yet) is "
        "read from its finished shards.",
    ),
]
Lare = Annotated[
    str | None,
    typer.Option(
        "--lare",
        help="Which LaRE artifact of each cache: a fingerprint prefix (see `pipeline cache info`) or "
        "key=value filters, e.g. dtype=float32. none: train the newest, eval the run's own.",
    ),
]
Pixels = Annotated[
    str | None,
    typer.Option(
        "--pixels", help="Which pixel artifact: a fingerprint prefix or key=value filters, e.g. size=256."
    ),
]
PerturbRead = Annotated[
    str | None,
    typer.Option(
        "--perturb", help="Use the artifacts extracted with this --perturb SPEC (none: the clean ones)."
    ),
]
Epoch = Annotated[
    str | None,
    typer.Option(
        "--epoch",
        "--epochs",
        help="Weights to use: best (by the run's validation slice), last, an epoch number, or (eval) "
        "last5: each of the final five scored, mean +- std (LoL's protocol).",
    ),
]
Threshold = Annotated[
    str | None,
    typer.Option(
        help="Score above which an image is called generated: 0.5, a number, or fpr1, fpr5, "
        "balanced: calibrated on the run's validation slice (FPR 1%/5% on its real rows, best balanced "
        "accuracy). The results say which was used."
    ),
]
