"""`pipeline detect`: any folder, LaRE computed on the fly as at extraction, bad files listed."""

from __future__ import annotations

import csv
import shutil

import pytest

from stages.configs import DetectConfig, EvalConfig
from stages.detect import run_detect
from stages.evaluate import run_eval
from tests.helpers import ONE_THREAD, add_bad_files, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_detect_scores_like_eval_and_lists_bad_files(egre_run, learn_set, tmp_path):
    data, cache = learn_set
    (subset_dir,) = [p for p in data.rglob("imagenet_ai_0419_sdv4") if p.is_dir()]
    folder = tmp_path / "images"
    shutil.copytree(subset_dir / "val" / "ai", folder / "nested" / "ai")
    shutil.copytree(subset_dir / "val" / "nature", folder / "nature")
    bad = add_bad_files(folder)
    run_eval(EvalConfig(egre_run, [str(cache)], tmp_path / "results", progress=False))
    (result,) = (tmp_path / "results").glob("*.csv")
    with open(result) as f:
        expected = {r["path"].split("/")[-1]: float(r["score"]) for r in csv.DictReader(f)}

    out = tmp_path / "scores.csv"
    proc = run_cli("detect", str(folder), "--checkpoint", str(egre_run), "--out", str(out), "--device", "cpu",
                   env=ONE_THREAD)  # fmt: skip
    assert "scored 32 image(s), 4 unreadable" in proc.stdout
    with open(out) as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    for name, reason in bad.items():
        assert rows[name]["decision"] == "error" and rows[name]["error"].startswith(reason)
    for name, score in expected.items():  # the on-the-fly LaRE map equals the cached one (fp16 ulp)
        assert float(rows[name]["score"]) == pytest.approx(score, abs=2e-3), name
        assert rows[name]["decision"] == ("generated" if float(rows[name]["score"]) > 0.5 else "real")

    # Another batch size (and batches that mix unreadable files with images): same rows, same order.
    again = tmp_path / "scores-b3.csv"
    assert run_detect(DetectConfig(folder, egre_run, again, batch_size=3, progress=False)) == (32, 4)
    with open(out) as f, open(again) as g:
        first, second = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["path"] for r in first] == [r["path"] for r in second] == sorted(r["path"] for r in first)
    for a, b in zip(first, second, strict=True):
        assert a["decision"] == b["decision"] and a["error"] == b["error"]
        if a["score"]:
            assert float(a["score"]) == pytest.approx(float(b["score"]), abs=2e-3)


def test_detection_crops_with_the_runs_recorded_window(egre_run, learn_set, tmp_path):
    import json

    from stages.runs.cachedata import CacheData

    params = json.loads((egre_run / "params.json").read_text())
    assert params["pixels"] == CacheData([str(learn_set[1])], verify=False).pixel_params
    assert params["pixels"]["small_images"] == "tile"

    # the same weights recorded with the other rule: a small image is cropped (and so scored) otherwise
    from PIL import Image

    other = tmp_path / "reflect-run"
    shutil.copytree(egre_run, other)
    params["pixels"]["small_images"] = "reflect"
    (other / "params.json").write_text(json.dumps(params))
    small = tmp_path / "small.png"
    Image.open(next(learn_set[0].rglob("*.png"))).convert("RGB").crop((0, 0, 20, 12)).save(small)
    scores = []
    for run in (egre_run, other):
        run_detect(DetectConfig(small, run, tmp_path / f"{run.name}.csv", progress=False))
        with open(tmp_path / f"{run.name}.csv") as f:
            scores.append(float(next(csv.DictReader(f))["score"]))
    assert scores[0] != scores[1]


def test_a_run_trained_on_schema_1_maps_is_refused(egre_run, learn_set, tmp_path):
    """Detection would compute schema-2 maps for a head trained on schema-1 (bilinear) maps: refused."""
    import json

    old = tmp_path / "old-run"
    shutil.copytree(egre_run, old)
    params = json.loads((old / "params.json").read_text())
    params["lare"]["params"].pop("resample")
    (old / "params.json").write_text(json.dumps(params))
    (old / "run-manifest.json").unlink()  # such a run predates run manifests too
    img = next(learn_set[0].rglob("*.png"))
    proc = run_cli(
        "detect", str(img), "--checkpoint", str(old), "--out", str(tmp_path / "s.csv"), check=False
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "cache schema 1" in lines[0], proc.stderr
