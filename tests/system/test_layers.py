"""The import layers of the project, read from every file's syntax tree.

Data flows one way, and so do imports: genimage (the dataset) -> features (the LaRE and pixel recipe)
-> runs (cache data, batches, checkpoints), which also uses detectors -> a module per command on top
(stages/*.py). `pipeline/` is orchestration that stages use; it calls into stages only from its CLI,
inside the commands (so that `pipeline --help` starts without torch).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

# What each subpackage of stages may import from stages, besides itself; the command modules (the
# top level of stages) may import anything in stages, and no subpackage imports a command.
MAY_IMPORT = {
    "genimage": set(),
    "features": {"genimage"},
    "detectors": {"genimage"},
    "runs": {"genimage", "features", "detectors"},
}


def _imports(path: Path, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module or `package.name`) of every import in `path`; from-imports name each
    imported name under its module, so that `from stages import extract` reads as stages.extract."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, (
                f"{path}:{node.lineno}: a relative import (the project imports absolutely)"
            )
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _stages_layer(name: str) -> str | None:
    """The layer an imported name belongs to: a subpackage of stages, `command`, or None outside stages."""
    parts = name.split(".")
    if parts[0] != "stages" or len(parts) < 2:
        return None
    return parts[1] if (ROOT / "stages" / parts[1] / "__init__.py").exists() else "command"


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_subpackage_of_stages_has_a_layer():
    subpackages = {p.parent.name for p in (ROOT / "stages").glob("*/__init__.py")}
    assert subpackages == set(MAY_IMPORT)


def test_stages_import_one_way():
    wrong = []
    for path in _files("stages"):
        rel = path.relative_to(ROOT / "stages")
        own = rel.parts[0] if len(rel.parts) > 1 else "command"
        allowed = {own} | MAY_IMPORT.get(own, set(MAY_IMPORT) | {"command"})
        for line, name in _imports(path):
            layer = _stages_layer(name)
            if name.startswith("pipeline.cli") or (layer is not None and layer not in allowed):
                wrong.append(f"stages/{rel}:{line} ({own}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_pipeline_calls_into_stages_only_from_its_cli_and_lazily():
    wrong = []
    for path in _files("pipeline"):
        rel = path.relative_to(ROOT)
        in_cli = rel.parts[1] == "cli"
        anywhere = {(line, name) for line, name in _imports(path) if name.split(".")[0] == "stages"}
        at_top = {(line, name) for line, name in _imports(path, True) if name.split(".")[0] == "stages"}
        wrong += [f"{rel}:{line} imports {name}" for line, name in sorted(at_top if in_cli else anywhere)]
    assert not wrong, "\n".join(wrong)


def test_the_tests_of_a_module_are_where_its_path_says():
    """tests/ mirrors the code: the unit tests of pipeline/x.py are tests/pipeline/test_x.py, those of
    stages/features/lare.py tests/stages/features/test_lare.py (test_lare_<aspect>.py for more files
    on one module); what crosses modules (resume, learnability, the README's promises) is in
    tests/system/. A test file named after no module, or a folder mirroring no package, fails here."""
    modules = {
        p.relative_to(ROOT).with_suffix("").as_posix()
        for package in ("pipeline", "stages")
        for p in _files(package)
        if p.stem not in ("__init__", "__main__")
    }
    packages = {
        p.parent.relative_to(ROOT).as_posix() for package in ("pipeline", "stages") for p in _files(package)
    }
    modules |= packages  # a subpackage's tests may be one file: tests/pipeline/test_cli.py
    tests = ROOT / "tests"
    for path in sorted(tests.rglob("test_*.py")):
        where = path.parent.relative_to(tests).as_posix()
        if where == "system":
            continue
        assert where in packages, f"{path.relative_to(ROOT)}: tests/{where} mirrors no package"
        name = path.stem.removeprefix("test_")
        named = {m for m in modules if "/" in m and m.rsplit("/", 1)[0] == where}
        assert any(
            name == m.rsplit("/", 1)[1] or name.startswith(m.rsplit("/", 1)[1] + "_") for m in named
        ), f"{path.relative_to(ROOT)} names no module of {where}/"
    assert not list(tests.glob("test_*.py")), "a test file directly in tests/: put it in its module's folder"
