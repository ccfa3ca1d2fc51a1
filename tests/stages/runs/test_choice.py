"""Which artifacts a command reads (stages.runs.choice), on hand-made manifests: the split an index
covers, complete before unfinished, the perturbation, the `--lare`/`--pixels` selectors (fingerprint
prefix or key=value), the run's own artifact before a newer one; each refusal one line."""

import pytest

from pipeline.errors import UserError
from stages.runs.choice import Choice, choose, selectable_fields

TRAIN_VAL, VAL_ONLY = "a" * 64, "b" * 64  # index fingerprints


def _lare(fp: str, index: str = TRAIN_VAL, created: str = "2026-01-01", complete: bool = True, **params):
    return {
        "kind": "lare",
        "fingerprint": fp,
        "complete": complete,
        "created_at": created,
        "upstream": {"index": index},
        "params": {"timestep": 200, "dtype": "float16", "size": 64, **params},
        "model": {"spec": "tiny", "weights": "w1"},
    }


def _manifest(*arts: dict) -> dict:
    return {
        "indexes": {
            f"index/{TRAIN_VAL[:16]}": {"splits": ["train", "val"]},
            f"index/{VAL_ONLY[:16]}": {"splits": ["val"]},
        },
        "artifacts": {f"lare/{a['fingerprint'][:16]}": a for a in arts},
    }


def _path(found: tuple[str, dict]) -> str:
    return found[1]["fingerprint"][:8]


def test_the_newest_complete_artifact_covering_the_split_is_chosen():
    m = _manifest(
        _lare("1111" * 16, created="2026-01-01"),
        _lare("2222" * 16, created="2026-03-01"),
        _lare("3333" * 16, created="2026-05-01", complete=False),  # newer, unfinished
        _lare("4444" * 16, index=VAL_ONLY, created="2026-06-01"),  # newer, no train split
    )
    assert _path(choose(m, "c.zarr", "lare", "train", None)) == "22222222"
    assert _path(choose(m, "c.zarr", "lare", "val", None)) == "44444444"
    assert _path(choose(m, "c.zarr", "lare", "train", None, index_fp=TRAIN_VAL)) == "22222222"
    only_unfinished = _manifest(_lare("3333" * 16, complete=False))
    assert (
        _path(choose(only_unfinished, "c.zarr", "lare", "train", None, allow_incomplete=True)) == "33333333"
    )
    with pytest.raises(UserError, match="holds no complete LaRE artifact covering split 'train'"):
        choose(only_unfinished, "c.zarr", "lare", "train", None)
    with pytest.raises(UserError, match="no complete pixel artifact.*extract with --pixels"):
        choose(m, "c.zarr", "pixels", "train", None)


def test_selectors_take_a_fingerprint_prefix_or_parameter_filters():
    m = _manifest(
        _lare("1111" * 16, dtype="float32"), _lare("2222" * 16, timestep=100), _lare("22223333" * 8)
    )
    assert _path(choose(m, "c.zarr", "lare", "train", "1111")) == "11111111"
    assert _path(choose(m, "c.zarr", "lare", "train", "22223")) == "22223333"
    assert _path(choose(m, "c.zarr", "lare", "train", "dtype=float32")) == "11111111"
    assert _path(choose(m, "c.zarr", "lare", "train", "timestep=100, dtype='float16'")) == "22222222"
    assert _path(choose(m, "c.zarr", "lare", "train", "model=tiny,timestep=100")) == "22222222"
    for bad in ("22", "22..", "lare/2222"):  # too short to name one, not hex
        with pytest.raises(UserError, match=f"--lare takes a fingerprint prefix .*not '{bad}'"):
            choose(m, "c.zarr", "lare", "train", bad)
    with pytest.raises(UserError, match="--lare 2222 matches 2 artifacts of c.zarr: lare/2222222222222222 "):
        choose(m, "c.zarr", "lare", "train", "2222")
    with pytest.raises(UserError, match="--lare timestep=200 matches 2 artifacts"):
        choose(m, "c.zarr", "lare", "train", "timestep=200")
    with pytest.raises(UserError, match="no parameter 'steps'; the artifacts have dtype, model, size"):
        choose(m, "c.zarr", "lare", "train", "steps=1")
    with pytest.raises(UserError, match="--lare: 'dtype' is not key=value"):
        choose(m, "c.zarr", "lare", "train", "timestep=100,dtype")
    with pytest.raises(UserError, match="matches --lare dtype=float64; `pipeline cache info c.zarr` lists"):
        choose(m, "c.zarr", "lare", "train", "dtype=float64")
    assert selectable_fields(m["artifacts"]["lare/1111111111111111"]) == (
        "timestep=200 dtype=float32 size=64 model=tiny"
    )


def test_a_run_prefers_the_artifact_it_was_trained_on_then_one_like_it():
    trained, alike, other = (
        _lare("1111" * 16),
        _lare("2222" * 16, created="2026-02-01"),
        _lare("3333" * 16, created="2026-03-01", timestep=100),
    )
    run = {
        "caches": [{"lare": trained["fingerprint"]}],
        "lare": {"params": trained["params"], "model": trained["model"]},
    }
    rank = Choice(run=run).rank("lare")
    assert _path(choose(_manifest(trained, alike, other), "c.zarr", "lare", "val", None, rank)) == "11111111"
    assert _path(choose(_manifest(alike, other), "c.zarr", "lare", "val", None, rank)) == "22222222"
    assert (
        _path(choose(_manifest(alike, other), "c.zarr", "lare", "val", None)) == "33333333"
    )  # no run: newest
    assert Choice().rank("lare") is None


def test_a_perturbation_is_chosen_only_when_asked_for():
    from stages.features.perturb_spec import requested

    record = {"spec": "jpeg:75", "only": None, "seed": 0}
    clean, jpeg = _lare("1111" * 16), _lare("2222" * 16, created="2026-02-01", perturb=record)
    m = _manifest(clean, jpeg)
    assert _path(choose(m, "c.zarr", "lare", "train", None)) == "11111111"  # newer, but perturbed
    assert _path(choose(m, "c.zarr", "lare", "train", None, perturb=requested("jpeg:75"))) == "22222222"
    assert _path(choose(m, "c.zarr", "lare", "train", "2222")) == "22222222"  # a prefix: perturbed or not
    with pytest.raises(UserError, match=r"holds no complete LaRE artifact .*\(it holds: .*jpeg:75"):
        choose(_manifest(jpeg), "c.zarr", "lare", "train", None)


def test_perturbation_options_are_checked_and_recorded_in_one_place():
    """What extraction records for --perturb/--perturb-only is what training and evaluation look up."""
    import pytest

    from pipeline.errors import UserError
    from stages.configs import ExtractConfig
    from stages.features.perturb_spec import Perturbation, requested
    from stages.runs.choice import perturbation_of

    cfg = ExtractConfig(".", "sdv14", perturb="JPEG: 10-75", perturb_only="generated", seed=3)
    assert cfg.perturbation().record() == {"spec": "jpeg:10-75", "only": "generated", "seed": 3}
    recorded = perturbation_of({"params": {"perturb": cfg.perturbation().record()}})
    wanted = requested("JPEG: 10-75", "generated")
    assert recorded == wanted == Perturbation("jpeg:10-75", "generated")
    assert requested(None) is None and ExtractConfig(".", "sdv14").perturbation() is None
    unpaired = ExtractConfig(".", "sdv14", perturb_only="real")
    for check in (lambda: requested(None, "real"), unpaired.check):
        with pytest.raises(UserError, match="--perturb-only needs --perturb SPEC"):
            check()
