"""Settings shared by every stage: where the tool keeps its own files, which device to use."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The tool's own cache (tiny models, weight-hash stat cache); `PIPELINE_HOME` overrides it."""
    env = os.environ.get("PIPELINE_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lare-pipeline"


def resolve_device(device: str) -> str:
    """`auto` means the GPU when there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
