"""An evaluation result read back: a current one unchanged, an older one (before the threshold, the
epoch choice, perturbations, splits and generators were recorded) with what that version meant."""

from __future__ import annotations

from stages.runs.results import artifacts_name, from_json, is_result, to_json

CURRENT = {
    "run": "egre-sdv14-0123456789ab", "run_fingerprint": "f" * 64, "method": "egre",
    "train_subsets": ["sdv14"], "train_perturb": "clean", "test_subset": "sdv14", "test_perturb": "jpeg:75",
    "test_cache": {"lare": "a" * 64, "pixels": "b" * 64}, "test_url": "c.zarr", "split": "test",
    "epoch_choice": "last5", "epochs": [1, 2, 3, 4, 5],
    "threshold": {"value": 0.8, "choice": "fpr5", "origin": "calibrated"},
    "test_params": {"lare": {"size": 64}, "pixels": {"size": 64}},
    "metrics": {"n": 4, "acc": 0.5, "threshold": 0.8}, "metrics_std": {"n": 0.0, "acc": 0.1},
    "by_format": {"png": {"n": 4}}, "by_generator": {"sdv14": {"n": 4}},
    "per_epoch": [{"epoch": 1, "metrics": {"n": 4}}],
}  # fmt: skip


def test_a_current_result_reads_back_unchanged():
    assert is_result(CURRENT)
    assert to_json(from_json(CURRENT)) == CURRENT


def test_an_older_result_reads_with_what_its_version_meant():
    old = {k: v for k, v in CURRENT.items() if k not in ("threshold", "epoch_choice", "train_perturb",
           "test_perturb", "split", "by_generator", "test_params", "metrics_std", "per_epoch")}  # fmt: skip
    r = from_json(old)
    assert r["threshold"] == {"value": 0.8, "choice": "0.8", "origin": "given"}
    assert (r["epoch_choice"], r["train_perturb"], r["test_perturb"], r["split"]) == (
        "best",
        "clean",
        "clean",
        "val",
    )
    assert r["by_generator"] == {} and "metrics_std" not in r
    assert from_json({**old, "metrics": {"n": 4}})["threshold"]["value"] == 0.5  # before metrics held it too


def test_the_test_artifacts_are_named_by_parameters_where_recorded():
    assert artifacts_name(from_json(CURRENT)) == artifacts_name(from_json({**CURRENT, "test_cache": {}}))
    old = {k: v for k, v in CURRENT.items() if k != "test_params"}
    assert artifacts_name(from_json(old)) == "aaaaaaaa/bbbbbbbb"
    assert not is_result({"metrics": {}}) and not is_result([1])
