"""Shared fixtures: a private tool home (the tiny SD model is built once per session), synthetic data,
and the `cli` / `slow` marks. The plain helpers the tests import are in tests/helpers.py."""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from pathlib import Path

import pytest

from stages.genimage.synthetic import make_genimage
from tests import helpers
from tests.helpers import extract_cache, tiny_run, torch_threads

# ---- `make test-fast`: the suite without the tests marked slow --------------------------------------
# A test that starts a process (the `pipeline` command through run_cli, any subprocess, or a local
# dask cluster's workers) is marked `cli` and `slow` here, whether it does so itself, through a
# fixture, or through a helper of its module, of this file or of tests/helpers.py; a test that
# trains for long is marked `slow` where it is written.
STARTS_A_PROCESS = re.compile(r"\b(subprocess\.(run|Popen|call|check_\w+)|extract_dask\.connect)\(")


def _callers(functions: dict[str, str], known: set[str]) -> set[str]:
    """The names among `functions` (name -> source) that start a process, directly or by calling one
    of `known` or of each other (to a fixed point)."""
    found = set(known)
    while True:
        calls = re.compile(rf"\b({'|'.join(map(re.escape, sorted(found)))})\(") if found else None
        more = {
            name
            for name, src in functions.items()
            if name not in found and (STARTS_A_PROCESS.search(src) or (calls and calls.search(src)))
        }
        if not more:
            return found
        found |= more


def _module_functions(module) -> dict[str, str]:
    return {
        name: inspect.getsource(f)
        for name, f in vars(module).items()
        if inspect.isfunction(f) and f.__module__ == module.__name__
    }


# ---- two workers (`-n 2`): a module's shared fixture built once, not once per worker ---------------
# pytest-xdist's `load` deals tests out one by one, so two tests of a module sharing a module-scoped
# fixture (the README datasets' 13 extractions, say) mostly land on both workers and each builds it.
# (`--dist loadgroup` would group them by mark, but this pytest's node ids ignore the group xdist
# appends.) Here `load` hands out a module that defines a module-scoped fixture as one unit, to one
# worker, and any other test alone; the units are handed out largest first (xdist's loadscope
# order), so the single tests fill in at the end and neither worker idles.
@functools.cache
def _defines_a_module_fixture(path: str) -> bool:
    return bool(re.search(r"@pytest\.fixture\(scope=\"module\"", (helpers.ROOT / path).read_text()))


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # another --dist: xdist's own

    from xdist.scheduler import LoadScopeScheduling

    class SharedModuleFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if _defines_a_module_fixture(path) else nodeid

    return SharedModuleFixtures(config, log)


def pytest_collection_modifyitems(config, items):
    here = _callers(_module_functions(helpers) | _module_functions(sys.modules[__name__]), set())
    per_module: dict[str, set[str]] = {}
    for item in items:
        module = item.module
        if module.__name__ not in per_module:
            per_module[module.__name__] = _callers(_module_functions(module), here)
        names = per_module[module.__name__]
        calls = re.compile(rf"\b({'|'.join(map(re.escape, sorted(names)))})\(")
        defs = getattr(item, "_fixtureinfo", None)
        fixtures = [d.func for ds in (defs.name2fixturedefs.values() if defs else ()) for d in ds]
        sources = [inspect.getsource(f) for f in [item.function, *fixtures] if _has_source(f)]
        if any(STARTS_A_PROCESS.search(src) or calls.search(src) for src in sources):
            item.add_marker(pytest.mark.cli)
            item.add_marker(pytest.mark.slow)


def _has_source(f) -> bool:
    try:
        inspect.getsource(f)
    except (OSError, TypeError):
        return False
    return True


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


@pytest.fixture(scope="session")
def learn_set(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, cache) of a synthetic sdv14 set: 24 train + 16 val images per class."""
    root = tmp_path_factory.mktemp("learn")
    make_genimage(root / "data", "sdv14", {"train": 24, "val": 16}, seed=3)
    return root / "data", extract_cache(root / "data", root / "cache")


@pytest.fixture
def one_thread():
    """`torch_threads(1)` around a test (the modules that train tiny models use it throughout)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def egre_run(learn_set, tmp_path_factory) -> Path:
    """A short EGRE run (tiny backbone, 2 epochs) on `learn_set`, for evaluation and detection tests."""
    return tiny_run(learn_set[1], tmp_path_factory.mktemp("runs"), "egre", epochs=2)
