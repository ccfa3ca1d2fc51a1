"""Settings shared by every stage: where the tool keeps its own files, which device to use."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError

DEFAULT_DEVICE = "auto"  # every command's --device default (stage configs and function signatures read it)


def home() -> Path:
    """The tool's own cache (tiny models, weight-hash stat cache); `PIPELINE_HOME` overrides it."""
    env = os.environ.get("PIPELINE_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lare-pipeline"


def loader_workers(chosen: int, device: str, most: int, gpus: int = 1) -> int:
    """DataLoader processes for `--loader-workers chosen` (-1: automatic): none on CPU, where they would
    compete with the model for the cores; on a GPU all cores but two (reading or decoding must outrun
    it), shared evenly by `gpus` processes (one per GPU) on this host, from 2 up to the stage's `most`."""
    if chosen >= 0:
        return chosen
    if not device.startswith("cuda"):
        return 0
    return max(2, min(most, ((os.cpu_count() or 4) - 2) // gpus))


def describe_loader_workers(most: int) -> str:
    """`loader_workers`'s rule in words, for the stage's `most`: its --loader-workers help says it."""
    return (
        f"-1 (automatic): none on CPU; on GPUs all cores but two, shared among them, at least 2 and at "
        f"most {most} per GPU"
    )


def resolve_precision(precision: str, device: str, offered: tuple[str, ...], on_cuda: str) -> str:
    """`--precision`: `auto` is the stage's `on_cuda` on a CUDA device (tensor cores) and fp32 elsewhere
    (half precision only costs time on a CPU); another name must be one the stage `offers`, a subset of
    the names stages.features.lare.PRECISIONS gives dtypes."""
    if precision != "auto" and precision not in offered:
        raise UserError(f"--precision must be one of auto, {', '.join(offered)}, not '{precision}'")
    if precision == "auto":
        return on_cuda if device.startswith("cuda") else "fp32"
    return precision


def describe_precision(offered: tuple[str, ...], on_cuda: str) -> str:
    """`resolve_precision`'s rule in words, for the stage's `offered` and `on_cuda`: its --precision help."""
    return f"auto ({on_cuda} on CUDA, fp32 elsewhere) or one of {', '.join(offered)}"


def resolve_device(device: str, here: bool = True) -> str:
    """`auto` means the GPU when there is one; any other device is checked, so that a command given one
    this machine cannot use stops in one line before it creates anything, not in a CUDA error after a
    cache, run or results file was begun. Only cpu, cuda and cuda:N are accepted (the code places
    work by those names). `here=False`: the work runs elsewhere (a dask scheduler's workers, which may
    hold GPUs this client lacks), so only the spelling is checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda") or device.strip() != device:
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if here and kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(
                f"--device {device}: no usable CUDA device on this machine; use --device cpu or auto"
            )
        index = torch.device(device).index
        if index is not None and index >= count:
            raise UserError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    return device
