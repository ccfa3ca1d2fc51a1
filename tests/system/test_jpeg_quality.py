"""JPEG quality in the index, its mix per class in `cache info`, training restricted by it, and
picking a perturbed artifact that a cache does not hold."""

from __future__ import annotations

import json

from stages.genimage import index
from stages.genimage.synthetic import make_genimage
from tests.helpers import ONE_THREAD, TINY_TRAIN, run_cli


def test_the_index_records_each_jpeg_quality_and_info_shows_the_mix(tmp_path):
    make_genimage(tmp_path, "sdv14", {"train": 3}, seed=1, format_only_quality=80)
    idx = index.scan(index.DataSource.genimage(tmp_path, "sdv14"), progress=False)
    real = idx.columns["label"] == 0
    assert set(idx.columns["jpeg_quality"][real]) == {80} and set(idx.columns["jpeg_quality"][~real]) == {-1}
    mix = index.format_mix(idx.columns)
    assert mix == {"real": {"jpeg q80": 3}, "generated": {"png": 3}}
    old = {k: v for k, v in idx.columns.items() if k != "jpeg_quality"}  # an index written before the column
    assert index.format_mix(old)["real"] == {"jpeg q?": 3}


def test_train_keeps_real_rows_of_one_quality_and_says_when_there_are_none(learn_set, tmp_path):
    _, cache = learn_set  # real images: JPEG at 95 or PNG
    info = run_cli("cache", "info", str(cache)).stdout
    assert "  real: " in info and "jpeg q95 x" in info and "  generated: " in info
    base = ["train", "--from-cache", str(cache), "--method", "lol", "--out", str(tmp_path), "--epochs", "1",
            "--batch-size", "16", *TINY_TRAIN, "--no-progress"]  # fmt: skip
    run = run_cli(*base, "--real-jpeg-quality", "95", env=ONE_THREAD).stdout.strip()
    (sample,) = json.loads((tmp_path / run.split("/")[-1] / "sample.json").read_text())["caches"]
    real = [p for p, lab in zip(sample["paths"], sample["labels"], strict=True) if lab == 0]
    generated = [p for p, lab in zip(sample["paths"], sample["labels"], strict=True) if lab == 1]
    assert real and all(p.endswith(".JPEG") for p in real)
    assert any(p.endswith(".png") for p in generated)  # generated rows are not restricted

    proc = run_cli(*base, "--real-jpeg-quality", "50", check=False)
    assert proc.returncode == 2 and "no usable training real rows of JPEG quality 50" in proc.stderr
    proc = run_cli(*base, "--perturb", "jpeg:33", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no complete LaRE artifact jpeg:33 (it holds: clean" in proc.stderr
