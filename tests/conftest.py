"""Shared fixtures: a private tool home (the tiny SD model is built once per session), synthetic data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.synthetic import make_genimage

PIPELINE = shutil.which("pipeline", path=os.path.dirname(sys.executable)) or "pipeline"


@pytest.fixture(scope="session", autouse=True)
def pipeline_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("pipeline-home")
    os.environ["PIPELINE_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return home


@pytest.fixture(scope="session")
def genimage(tmp_path_factory) -> Path:
    """A small synthetic GenImage root (nested archive folders) holding sdv14; read-only for tests."""
    root = tmp_path_factory.mktemp("genimage")
    make_genimage(root, "sdv14", {"train": 6, "val": 4}, seed=1)
    return root


def run_cli(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed `pipeline` command as a user types it."""
    proc = subprocess.run(
        [PIPELINE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def extract_args(data: Path, cache: Path, *extra: str, subset: str = "sdv14") -> list[str]:
    """`pipeline extract` arguments for the tiny model on CPU, 4 rows per shard."""
    return [
        "extract", "--data-root", str(data), "--subset", subset, "--cache-dir", str(cache),
        "--model", "tiny", "--device", "cpu", "--rows-per-shard", "4", *extra,
    ]  # fmt: skip


def artifact_arrays(cache: Path, artifact: str) -> dict[str, bytes]:
    """Raw bytes of every array of an artifact, for bitwise comparison (NaN-safe)."""
    import zarr

    group = zarr.open_group(str(cache), mode="r")[artifact]
    return {name: np.ascontiguousarray(arr[:]).tobytes() for name, arr in group.arrays()}
