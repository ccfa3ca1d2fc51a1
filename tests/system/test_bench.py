"""The benchmark scripts run to the end in quick mode on the CPU (their figures are never asserted):
the one GPU command must not fail on first contact with a GPU for a reason a CPU run would show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

BENCH = ROOT / "bench"


def run_bench(script: str, *args: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out), *args], check=True,
                   env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    return json.loads(next(out.glob("*.json")).read_text())


def test_gpu_bench_quick_mode_measures_every_section(tmp_path):
    """torch.compile and the two-process bit check are left out here (minutes on two cores)."""
    r = run_bench("gpu.py", "--device", "cpu", "--skip", "compile", "bits", out=tmp_path)
    assert r["errors"] == {} and r["skipped"] == []
    names = {x["name"] for x in r["runs"]} | {x["name"] for x in r["levers"]}
    assert {"png", "channels_last off", "SDPA off (classic attention)", "cudnn benchmark"} <= names
    for run in r["runs"] + r["levers"]:
        assert {"size", "ensemble", "ours_images_per_s", "compiled", "gpu_busy_fraction"} <= run.keys()
    assert {"egre_samples_per_s", "lol_samples_per_s", "eval_images_per_s", "detect_images_per_s"} <= r[
        "train"
    ].keys()
    assert set(r["decode_images_per_s_per_core"]) == {"jpeg", "png"}
    assert (tmp_path / "gpu-cpu-tiny-quick.md").is_file()


def test_loader_bench_quick_mode_writes_its_ratios(tmp_path):
    r = run_bench("train_loader.py", out=tmp_path)
    assert {"loader_epoch_2_vs_0_workers", "prep_egre_batch48_batched_vs_per_sample"} <= r["ratios"].keys()
    assert (tmp_path / "train_loader-cpu.md").is_file()


def test_small_set_bench_quick_mode_writes_its_rows(tmp_path):
    r = run_bench("small_set.py", out=tmp_path)
    (row,) = [x for x in r["rows"] if x["labels"] == "true"]
    assert row["artifact"] == "upsample" and row["method"] == "egre" and row["n"] == 32
    assert row["selection"] == "last" and 0 <= row["ap"] <= 1
    assert (tmp_path / "small_set-current-quick.md").is_file()


def test_ddp_bench_quick_mode_measures_both_methods_at_one_and_two_ranks(tmp_path):
    r = run_bench("ddp.py", out=tmp_path)
    assert {(x["method"], x["ranks"]) for x in r["rows"]} == {(m, n) for m in ("egre", "lol") for n in (1, 2)}
    assert all(x["samples_per_s"] > 0 and x["rows"] > 0 for x in r["rows"])
    assert (tmp_path / "ddp-cpu-quick.md").is_file()
