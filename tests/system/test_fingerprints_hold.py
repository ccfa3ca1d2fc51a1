"""The fingerprints of a fixed extraction, run and evaluation, written down as they were when the house
moved (issue 31): a refactor that keeps what the code computes keeps every name, so a cache extracted
before it is reused, not recomputed, and a finished run is still up to date.

A move that changes a hashed module's syntax tree but not its values maps the new hash to the old one in
`pipeline/code_versions.json` (pipeline.fingerprint.published), justified by the values below, which
a real change moves. A change that moves a value is a new code version: these literals are then updated
in the same commit, and the commit says why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from stages.genimage.synthetic import make_genimage
from tests.helpers import extract_cache, tiny_run, torch_threads

# the artifacts of the fixed extraction, by path: (fingerprint, code_version)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "index/6fec448c42c187be": ("6fec448c42c187bee6e168c5891dd6fafcfd5deb840a16773e2d0ee720507678", ""),
    "index/af93c4da67bffed0": ("af93c4da67bffed084e2da3fc7793b9805a5a5fe6107637ea5fdc1a539b3b8ce", ""),
    "lare/04216c44d54a3d52": (
        "04216c44d54a3d52e68e23d8f4eee509d92f8bfbf6e330b209a75725069ddecf",
        "136428340537dc240fe50753856792fd",
    ),
    "lare/d35828c25c10b052": (
        "d35828c25c10b05274c7a08f35ed925ee9c287ebb8cffe1b4b2fc4ceed31c231",
        "136428340537dc240fe50753856792fd",
    ),
    "pixels/3d4be09522437d4b": (
        "3d4be09522437d4b67fc82561f13f327ced495965094a803317832b21bfe81b1",
        "5ed51fff211a510d",
    ),
    "pixels/7d2206d0265f82f2": (
        "7d2206d0265f82f26b7fd79559ed364c592ec0ab1433323b7f33c578e77794fe",
        "5ed51fff211a510d",
    ),
}
RUNS: dict[str, str] = {
    "egre": "egre-sdv14-a9c5b383a42b",
    "lol": "lol-sdv14-9a146c94ee75",
}  # method -> run directory name (its fingerprint's first 12 hex digits)
RUN_FINGERPRINTS: dict[str, str] = {
    "egre": "a9c5b383a42b3ce35c2c8ae9e41a1007568c9bd41798dcd77633e8aa16f1e203",
    "lol": "9a146c94ee75a45d918063e1d03d5313292bcfe66a61bff655f089ae7331facd",
}
EVAL_STEMS: list[str] = ["egre-sdv14-a9c5b383a42b__sdv14-d17ab992.json"]
# the values, to a tolerance that holds across CPUs: (sum, sum of |x|) of the maps in float64
_VALUES = {"lare": "maps", "pixels": "crops"}
MAP_SUMS: dict[str, tuple[float, float]] = {
    "lare/04216c44d54a3d52": (3392.151695251465, 3392.151695251465),
    "lare/d35828c25c10b052": (1110.9584045410156, 1110.9584045410156),
    "pixels/3d4be09522437d4b": (17900510.0, 17900510.0),
    "pixels/7d2206d0265f82f2": (5273106.0, 5273106.0),
}
WEIGHT_SUMS: dict[str, float] = {"egre": 31801.1806552357, "lol": 18058.691925037747}


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed")
    make_genimage(root / "data", "sdv14", {"train": 4, "val": 2}, seed=31)
    cache = extract_cache(root / "data", root / "cache")
    extract_cache(root / "data", root / "cache", perturb="jpeg:60-90+blur:3", splits=("val",))
    runs = {m: tiny_run(cache, root / "runs", m, epochs=1) for m in ("egre", "lol")}
    return cache, runs, root


def _artifacts(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    named = {path: (art["fingerprint"], art["code_version"]) for path, art in manifest["artifacts"].items()}
    return named | {path: (index["fingerprint"], "") for path, index in manifest["indexes"].items()}


def test_the_fixed_extraction_keeps_its_fingerprints(fixed):
    cache, _, _ = fixed
    assert _artifacts(cache) == ARTIFACTS


def test_the_fixed_runs_keep_their_fingerprints(fixed):
    _, runs, _ = fixed
    assert {m: r.name for m, r in runs.items()} == RUNS
    got = {m: json.loads((r / "params.json").read_text())["fingerprint"] for m, r in runs.items()}
    assert got == RUN_FINGERPRINTS


def test_the_fixed_evaluation_keeps_its_key(fixed):
    from stages.configs import EvalConfig
    from stages.evaluate import run_eval

    cache, runs, root = fixed
    with torch_threads(1):
        run_eval(EvalConfig(checkpoint=runs["egre"], caches=[str(cache)], out=root / "res", progress=False))
    assert sorted(p.name for p in (root / "res").glob("*.json")) == EVAL_STEMS


def test_the_fixed_extraction_keeps_its_values(fixed):
    cache, _, _ = fixed
    group = zarr.open_group(str(cache), mode="r")
    got = {}
    for path in ARTIFACTS:
        if path.startswith(("lare/", "pixels/")):
            data = np.asarray(group[path][_VALUES[path.split("/")[0]]][:], dtype=np.float64)
            got[path] = (float(data.sum()), float(np.abs(data).sum()))
    assert got.keys() == MAP_SUMS.keys()
    for path, sums in MAP_SUMS.items():
        assert got[path] == pytest.approx(sums, rel=1e-5), path


def test_the_fixed_runs_keep_their_weights(fixed):
    from safetensors.numpy import load_file

    _, runs, _ = fixed
    for method, run in runs.items():
        weights = load_file(str(run / "epoch-001.safetensors"))
        total = sum(float(np.abs(w.astype(np.float64)).sum()) for w in weights.values())
        assert total == pytest.approx(WEIGHT_SUMS[method], rel=1e-4), method


# the code versions the fixed artifacts were published under, by what they name
PUBLISHED = {
    "lare": "136428340537dc240fe50753856792fd",  # code, then the class tables' bytes
    "pixels": "5ed51fff211a510d",
    "train egre": "5456735be5d91ebd",
    "train lol": "b8acfe2bcd6514ce",
    "scoring": "83d9d47406c1f5ca",
}


def _versions() -> dict[str, str]:
    from stages import evaluate, train
    from stages.features import recipe

    return {
        "lare": recipe.lare_code_version(),
        "pixels": recipe.pixel_code_version(),
        "train egre": train.training_code("egre"),
        "train lol": train.training_code("lol"),
        "scoring": evaluate.scoring_code(),
    }


def test_the_stage_code_versions_are_the_published_ones(monkeypatch):
    got = _versions()
    if got != PUBLISHED:
        monkeypatch.setattr("pipeline.code_versions.published", lambda v: v)
        raw = _versions()
        hint = "\n".join(f"  {kind}: hashed {raw[kind]}, published {PUBLISHED[kind]}" for kind in raw)
        pytest.fail(
            "a stage's code version moved. If the values tests of this file pass (maps, crops, weights "
            "unchanged), the move is a refactor: map each new hash to the published one in "
            f"pipeline/code_versions.json; else update the literals here and say why:\n{hint}"
        )


def map_refactor(why: str) -> dict[str, str]:
    """Declare the current code a refactor of the published one: each moved hash -> its published
    name in pipeline/code_versions.json. Run it only when this file's values tests pass:
    `python -m tests.system.test_fingerprints_hold "issue N: what moved"`."""
    from pipeline import code_versions

    code_versions._same_as.cache_clear()
    table = json.loads(code_versions.TABLE.read_text())
    published = code_versions.published
    code_versions.published = lambda v: v  # the raw hashes
    try:
        raw = _versions()
    finally:
        code_versions.published = published
    added = {}
    for kind, version in raw.items():
        new, old = version[:16], PUBLISHED[kind][:16]  # lare: the code's half (the tables' is not code)
        if new != old and new not in table:
            table[new] = {"same_as": old, "what": kind, "why": why}
            added[new] = old
    code_versions.TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return added


if __name__ == "__main__":
    import sys

    print(map_refactor(" ".join(sys.argv[1:]) or "a refactor"))
