import sys
import textwrap
import types

from pipeline.fingerprint import canonical_json, checksum_files, code_version, fingerprint
from tests.helpers import ROOT


def _module(name: str, source: str) -> types.ModuleType:
    import linecache

    filename = f"<{name}>"
    source = textwrap.dedent(source)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = types.ModuleType(name)
    mod.__file__ = filename
    exec(compile(source, filename, "exec"), mod.__dict__)
    sys.modules[name] = mod
    return mod


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_code_version_ignores_docstrings_and_comments_not_code():
    base = code_version(_module("m1", 'def f(x):\n    """Doc."""\n    return x + 1\n'))
    same = code_version(_module("m1", 'def f(x):\n    """Other doc."""\n    # note\n    return x + 1\n'))
    changed = code_version(_module("m1", 'def f(x):\n    """Doc."""\n    return x + 2\n'))
    assert base == same
    assert base != changed


def test_checksum_files_uses_relative_names_and_stat_cache(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(sub)
    files = [tmp_path / "a" / "config.json", tmp_path / "b" / "config.json"]
    cache = tmp_path / "stat.json"
    first = checksum_files(tmp_path, files, stat_cache=cache)
    assert cache.exists()
    assert checksum_files(tmp_path, files, stat_cache=cache) == first
    (tmp_path / "b" / "config.json").write_text("changed")
    assert checksum_files(tmp_path, files, stat_cache=cache) != first


# ---- the LaRE artifact's fingerprint covers everything that decides a map ---------------------------
_FP_SCRIPT = """
from types import SimpleNamespace
from stages.configs import ExtractConfig
from stages.extract import lare_artifact
cfg = ExtractConfig(data_root=".", subset="sdv14", prompt_template="a photo of a {cls}")
model = SimpleNamespace(weights="w" * 64, identity=lambda: {"spec": "x"})
print(lare_artifact(cfg, "i" * 64, model, "fp32", (4, 32)).fingerprint)
"""


def _edit_text(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _edit_val_table(path):
    import gzip

    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    lines[0] = str((int(lines[0]) + 1) % 1000)
    path.write_bytes(gzip.compress("\n".join(lines).encode(), mtime=0))


EDITS = {
    "class table": lambda s: _edit_text(s / "data" / "imagenet_classes.tsv", "\ttench\n", "\ttinca\n"),
    "val ground truth": lambda s: _edit_val_table(s / "data" / "imagenet_val_classes.txt.gz"),
    "resize filter": lambda s: _edit_text(
        s / "features" / "pixels.py", "Image.Resampling.BICUBIC}", "Image.Resampling.BILINEAR}"
    ),
    "name parsing": lambda s: _edit_text(
        s / "genimage" / "classes.py", "if len(prefix) <= 3:", "if len(prefix) <= 4:"
    ),
    "prompt building": lambda s: _edit_text(
        s / "features" / "lare.py", 'padding="max_length"', 'padding="longest"'
    ),
    "model input": lambda s: _edit_text(s / "features" / "lare.py", "/ 255.0 - 0.5) * 2)", "/ 127.5 - 1.0))"),
    "recipe": lambda s: _edit_text(
        s / "features" / "recipe.py",
        "return pixels.centre_crop(rgb, self.size, self.small_images)",
        "return rgb",
    ),
    "perturbation": lambda s: _edit_text(
        s / "features" / "perturb.py", 'format="JPEG", quality=', 'format="JPEG", optimize=True, quality='
    ),
}


def _package_copy(tmp_path, name, edit=None):
    """A copy of the package with `edit` applied to its `stages/`."""
    import shutil

    root = ROOT
    tree = tmp_path / name
    for package in ("stages", "pipeline"):
        shutil.copytree(root / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        edit(tree / "stages")
    return tree


def _lare_fingerprints(trees):
    """The LaRE artifact fingerprint each package copy computes (in parallel subprocesses)."""
    import subprocess

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FP_SCRIPT], cwd=tree, stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tree), "OMP_NUM_THREADS": "1"},
        )
        for tree in trees
    ]  # fmt: skip
    outs = [p.communicate()[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outs


def test_lare_fingerprint_covers_tables_filter_parsing_and_recipe(tmp_path):
    """Edit a copy of the package as a developer would: each value-deciding edit names a new artifact,
    while docstrings and comments do not."""

    def cosmetic(stages):
        _edit_text(stages / "genimage" / "classes.py", '"""ImageNet classes', '"""The ImageNet classes')
        _edit_text(
            stages / "features" / "recipe.py",
            "    return torch.from_numpy(",
            "    # a comment\n    return torch.from_numpy(",
        )
        _edit_text(
            stages / "features" / "pixels.py", "# The LaRE reference calls", "# The LaRE^2 reference calls"
        )

    names = ["base", "cosmetic", *EDITS]
    edits = [None, cosmetic, *EDITS.values()]
    trees = [_package_copy(tmp_path, n.replace(" ", "-"), e) for n, e in zip(names, edits, strict=True)]
    base, same, *changed = _lare_fingerprints(trees)
    assert len(base) == 64 and same == base
    fps = dict(zip(EDITS, changed, strict=True))
    assert all(fp != base for fp in fps.values()), fps
    assert len(set(fps.values())) == len(fps)


def test_code_version_of_single_functions_ignores_their_neighbours(tmp_path, monkeypatch):
    """A run's code version hashes the checkpoint functions that decide its weights, not the module:
    editing how an epoch is chosen or loaded retrains nothing; editing a hashed function does."""
    import importlib
    import sys

    from pipeline.fingerprint import code_version
    from stages.runs import checkpoint

    assert (
        checkpoint.load_run not in checkpoint.TRAINING and checkpoint.select_epochs not in checkpoint.TRAINING
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    src = 'def decides(x):\n    """Doc."""\n    return x + 1\n\n\ndef chooses(x):\n    return x\n'
    (tmp_path / "cv_probe.py").write_text(src)
    mod = importlib.import_module("cv_probe")
    before = code_version(mod.decides), code_version(mod)
    (tmp_path / "cv_probe.py").write_text(
        src.replace("return x\n", "return -x\n").replace("Doc.", "Other doc.")
    )
    mod = importlib.reload(sys.modules["cv_probe"])
    assert code_version(mod.decides) == before[0] and code_version(mod) != before[1]
    (tmp_path / "cv_probe.py").write_text(src.replace("x + 1", "x + 2"))
    mod = importlib.reload(sys.modules["cv_probe"])
    assert code_version(mod.decides) != before[0]


def _move_lare_and_pixels(stages):
    """Move lare.py and pixels.py from `stages/features/` into another subpackage, `stages/maths/`,
    their imports following."""
    (stages / "maths").mkdir()
    (stages / "maths" / "__init__.py").write_text("")
    for name in ("lare", "pixels"):
        (stages / "features" / f"{name}.py").rename(stages / "maths" / f"{name}.py")
    for path in stages.rglob("*.py"):
        text = path.read_text()
        text = text.replace("from stages.features import lare as", "from stages.maths import lare as")
        text = text.replace("from stages.features import pixels as", "from stages.maths import pixels as")
        text = text.replace(
            "from stages.features import params, perturb, perturb_spec, pixels",
            "from stages.features import params, perturb, perturb_spec\nfrom stages.maths import pixels",
        )
        path.write_text(text)


def test_moving_a_module_changes_no_fingerprint(tmp_path):
    """Each module is hashed under its declared CODE_ID and the project's import paths are erased:
    moving files into a subpackage (the copy still runs: the script imports the moved modules) keeps
    the LaRE fingerprint, while an edit of the moved code still changes it."""

    def edited(stages):
        _move_lare_and_pixels(stages)
        _edit_text(stages / "maths" / "lare.py", "/ 255.0 - 0.5) * 2)", "/ 127.5 - 1.0))")  # "model input"

    trees = [_package_copy(tmp_path, n, e) for n, e in (("base", None), ("moved", _move_lare_and_pixels),
                                                         ("moved-edited", edited))]  # fmt: skip
    assert not (trees[1] / "stages" / "features" / "lare.py").exists()
    assert (trees[1] / "stages" / "maths" / "lare.py").exists()
    base, moved, edited_fp = _lare_fingerprints(trees)
    assert moved == base and edited_fp != base


def test_a_string_naming_a_project_module_is_hashed_without_its_subpackages():
    """A registry's list of modules to import (stages.detectors.method's BUILTIN) is an import path
    too: moving stages/egre.py to stages/detectors/ kept every run's name."""
    at = lambda path: _module("stages.m", f'CODE_ID = "stages.m"\nBUILTIN = ("{path}",)\n')  # noqa: E731
    assert code_version(at("stages.detectors.egre")) == code_version(at("stages.egre"))
    assert code_version(at("stages.lol")) != code_version(at("stages.egre"))


def test_a_project_module_without_code_id_is_refused_and_outside_modules_use_their_name():
    import pytest

    from pipeline.fingerprint import code_identity

    with pytest.raises(ValueError, match="declares no CODE_ID"):
        code_version(_module("stages.undeclared", "def f(x):\n    return x\n"))
    outside = _module("my_methods", "def f(x):\n    return x\n")
    assert code_identity(outside) == "my_methods" and code_identity(outside.f) == "my_methods.f"
    declared = _module("stages.declared", 'CODE_ID = "stages.elsewhere"\n\ndef f(x):\n    return x\n')
    assert code_identity(declared.f) == "stages.elsewhere.f"
