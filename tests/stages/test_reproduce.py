"""`pipeline reproduce`: each table's plan is the paper's protocol; the whole lol-table1 protocol runs end
to end at a tiny --scale on synthetic sets, as a user types it, and a rerun redoes nothing."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from stages import papers, reproduce
from stages.configs import ExtractConfig, ReproduceConfig, TrainConfig
from stages.genimage.synthetic import make_genimage
from stages.reproduce import GENIMAGE, Cell, make_plan
from tests.helpers import ONE_THREAD, ROOT, run_cli


def _plan(table: str, **kw):
    return make_plan(ReproduceConfig(table=table, data_root="/nowhere", **kw))


def test_table1_trains_one_lol_run_per_subset_on_1600_per_class_tested_on_all_eight():
    plan = _plan("lol-table1")
    assert plan.protocol.method == "lol" and plan.protocol.epoch == "last5"
    assert [t.subset for t in plan.trainings] == list(GENIMAGE) == plan.tests
    assert all(dict(t.options) == {"max_per_class": 1600} for t in plan.trainings)
    assert all(e.splits == ("train", "val") for e in plan.extracts.values())
    # the reference's maps (SD v1.5, t 200, e 4, the class prompt) and a 512 px window
    ecfg = plan.extracts["sdv14"]
    assert (ecfg.model, ecfg.timestep, ecfg.ensemble) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        200,
        4,
    )
    assert (ecfg.prompt_template, ecfg.pixel_size) == ("a photo of a {cls}", 512)
    # BigGAN's run gets LoL's 5e-7 (no --lr given), the others 5e-6
    cfg = ReproduceConfig(table="lol-table1", data_root="/nowhere")
    lrs = {
        t.subset: reproduce.train_config(cfg, plan, t, "c").hparams({t.subset})["lr"] for t in plan.trainings
    }
    assert lrs["biggan"] == 5e-7 and {v for k, v in lrs.items() if k != "biggan"} == {5e-6}


def test_table2_and_table3_are_their_grids_on_sdv14_and_lare2_is_egre_on_sdv14_or_sdv15():
    t2 = _plan("lol-table2")
    assert {t.subset for t in t2.trainings} == {"sdv14"} and len(t2.trainings) == 30
    per_class = {(t.row, dict(t.options)["backbone"]): dict(t.options)["max_per_class"] for t in t2.trainings}
    assert per_class[("400", "RN50")] == 200 and per_class[("323994", "ViT-L-14")] == "all"
    assert {papers.lookup("lol-table2", t.row, t.column, "acc") is not None for t in t2.trainings} == {True}
    t3 = _plan("lol-table3")
    ranges = {(dict(t.options)["mask_range"], dict(t.options)["aspect_range"]) for t in t3.trainings}
    assert len(ranges) == 15 and ((0.6, 0.8), (0.33, 3.0)) in ranges
    assert {papers.lookup("lol-table3", t.row, t.column, "acc") is not None for t in t3.trainings} == {True}
    assert _plan("lol-table2", scale=0.5).trainings[-1].options[0] == ("max_per_class", 80998)
    for table, subset in (("lare2", "sdv14"), ("lare2-reference", "sdv15")):
        plan = _plan(table)
        assert plan.protocol.method == "egre" and [t.subset for t in plan.trainings] == [subset]
        assert plan.extracts[subset].small_images == "reflect" and plan.protocol.epoch == "best"
        assert plan.extracts["adm"].splits == ("val",)  # a subset only tested on needs its val split


def test_a_cell_agrees_within_the_papers_std_or_the_stated_points():
    with_std = papers.lookup("lol-table3", "0.6-0.8", "0.33-3.0", "acc")  # 96.0 +- 0.7
    assert Cell("acc", "r", "c", 95.4, 0.1, with_std).verdict == "within"
    assert Cell("acc", "r", "c", 95.2, 0.1, with_std).verdict == "outside"
    no_std = papers.lookup("lol-table1", "LoL", "sdv14", "acc")  # 94.4, no std: TOLERANCE_POINTS
    assert Cell("acc", "r", "c", 94.4 - reproduce.TOLERANCE_POINTS, math.nan, no_std).verdict == "within"
    assert Cell("acc", "r", "c", 91.0, math.nan, no_std).verdict == "outside"
    assert Cell("acc", "r", "c", math.nan, math.nan, no_std).verdict == "not run"
    assert Cell("acc", "r", "c", 50.0, math.nan, None).verdict == "no paper figure"
    assert reproduce.summary(
        [Cell("acc", "r", "c", 95.4, 0.1, with_std), Cell("acc", "r", "c", 1, 0, None)]
    ) == ("1 of 1 cells within the paper's +- std (or +-2 points where it prints no std)")


def test_the_time_estimate_reads_the_measured_extraction_rates():
    bench = json.loads((ROOT / "bench" / "results" / "extract-cpu-tiny.json").read_text())
    (e4,) = [r["ours_images_per_s"] for r in bench["runs"] if (r["size"], r["ensemble"]) == (256, 4)]
    rate = reproduce.extraction_rate(ExtractConfig(data_root="d", subset="sdv14", model="tiny", device="cpu"))
    assert rate == (e4, "bench/results/extract-cpu-tiny.json, cpu")
    sd15 = reproduce.extraction_rate(ExtractConfig(data_root="d", subset="sdv14", device="cuda", size=512))
    assert sd15 is not None and "extract-cuda-random-sd15-sweep.json" in sd15[1]
    assert (
        reproduce.extraction_rate(ExtractConfig(data_root="d", subset="sdv14", model="tiny", size=32)) is None
    )


def test_the_train_config_of_a_run_is_the_tables_under_the_users_options():
    cfg = ReproduceConfig(table="lol-table3", data_root="d", train={"backbone": "tiny-RN", "epochs": 5})
    plan = make_plan(cfg)
    tcfg = reproduce.train_config(cfg, plan, plan.trainings[0], "c")
    assert isinstance(tcfg, TrainConfig) and (
        tcfg.backbone,
        tcfg.epochs,
        tcfg.method_options["mask_range"],
    ) == (
        "tiny-RN",
        5,
        (0.0, 0.2),
    )
    assert "--backbone tiny-RN" in "; ".join(cfg.deviations())
    assert ReproduceConfig(table="lol-table1", data_root="d").deviations() == []


TINY = ["--model", "tiny", "--device", "cpu", "--size", "32", "--pixel-size", "64", "--preprocess", "crop",
        "--rows-per-shard", "8", "--backbone", "tiny-RN", "--backbone-weights", "random", "--crop-size", "32",
        "--lr", "1e-3", "--epochs", "5", "--batch-size", "4", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_lol_table1_end_to_end_at_a_tiny_scale_then_up_to_date_then_a_changed_scale_retrains_only(tmp_path):
    """The whole protocol (extract, a run per training subset, last-five-epoch evaluations on every test
    subset, the table) on two synthetic subsets, 6 + 6 training images a run (--scale 0.004 of 1,600):
    5 epochs, the fewest for LoL's final five."""
    for seed, subset in enumerate(("sdv14", "adm")):
        make_genimage(tmp_path / "data", subset, {"train": 8, "val": 4}, seed=seed)
    out = tmp_path / "out"
    args = ["reproduce", "lol-table1", "--data-root", str(tmp_path / "data"), "--subsets", "sdv14,adm",
            "--scale", "0.004", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *TINY]  # fmt: skip
    plan = run_cli(*args, "--dry-run", env=ONE_THREAD).stdout
    assert (
        "adm [train, val]: to extract, 24 images" in plan
        and "sdv14 on sdv14 (max_per_class 6): to train" in plan
    )
    assert "evaluate (4: each run on 2 test subsets, epochs last5): 0 done, 4 to do" in plan
    assert "a cheaper or other version: subsets sdv14, adm" in plan and not (out / "lol-table1.md").exists()

    first = run_cli(*args, env=ONE_THREAD)
    assert first.stdout.count("wrote ") == 3
    with open(out / "lol-table1.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["metric"], r["column"]) for r in rows] == [
        (m, c) for m in ("acc", "ap") for c in ("sdv14", "adm", "mean")
    ]
    sdv14 = rows[0]
    assert sdv14["paper_%"] == "94.40" and sdv14["source"] == "LoL Table 1 (Sec. 4.4)"
    assert float(sdv14["diff"]) == pytest.approx(float(sdv14["ours_%"]) - 94.4, abs=0.011)
    assert rows[2]["paper_%"] == "92.45"  # the mean of Table 1 over the two subsets (--subsets)
    assert rows[3]["verdict"] == "no paper figure"  # Figure 5's AP per subset is not in the text
    results = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert len(results) == 4 and {len(r["per_epoch"]) for r in results} == {5}
    acc = {(r["train_subsets"][0], r["test_subset"]): 100 * r["metrics"]["acc"] for r in results}
    assert float(sdv14["ours_%"]) == pytest.approx(
        (acc["sdv14", "sdv14"] + acc["adm", "sdv14"]) / 2, abs=0.01
    )
    md = (out / "lol-table1.md").read_text()
    assert "CHEAPER VERSION" in md and re.search(r"^\d+ of 3 cells within the paper's", md, re.M), md
    assert (out / "lol-table1.png").stat().st_size > 10_000

    again = run_cli(*args, env=ONE_THREAD)
    assert "rows done" not in again.stderr and "epoch 1:" not in again.stderr, again.stderr
    assert again.stderr.count("up to date") == 2 + 2 + 4  # two caches, two runs, four evaluations
    done = run_cli(*args, "--dry-run", env=ONE_THREAD).stdout
    assert "to extract" not in done and "to train" not in done and "4 done, 0 to do" in done

    smaller = run_cli(*[a if a != "0.004" else "0.003" for a in args], env=ONE_THREAD)
    assert (
        "rows done" not in smaller.stderr and smaller.stderr.count("epoch 5: loss") == 2
    )  # runs anew, caches kept


@pytest.mark.slow
def test_lare2_trains_egre_on_sdv14_at_a_tiny_scale_and_says_its_papers_figures_are_absent(tmp_path):
    for seed, subset in enumerate(("sdv14", "adm")):
        make_genimage(tmp_path / "data", subset, {"train": 6, "val": 3}, seed=seed)
    out = tmp_path / "out"
    tiny = [a if a != "5" else "2" for a in TINY]  # EGRE scores its best epoch: two suffice
    args = ["reproduce", "lare2", "--data-root", str(tmp_path / "data"), "--subsets", "sdv14,adm", "--scale",
            "0.001", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *tiny]  # fmt: skip
    run_cli(*args, env=ONE_THREAD)
    with open(out / "lare2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["verdict"] for r in rows} == {"no paper figure"} and len(rows) == 6
    (result,) = [json.loads(p.read_text()) for p in (out / "results").glob("*__adm-*.json")]
    assert result["method"] == "egre" and result["train_subsets"] == ["sdv14"]
    assert result["epoch_choice"] == "best" and float(rows[1]["ours_%"]) == pytest.approx(
        100 * result["metrics"]["acc"], abs=0.01
    )
    md = (out / "lare2.md").read_text()
    assert papers.LARE2_ABSENT in md and "no cell has a paper figure to compare with" in md


@pytest.mark.slow
def test_a_killed_reproduction_resumes_inside_the_run_it_was_in(tmp_path):
    """A run of the plan interrupted after epoch 2 (as a kill leaves it): --dry-run says so, and the
    command goes on from epoch 3 instead of starting the run again."""
    from stages.extract import run_extract_covering
    from stages.train import run_train
    from tests.helpers import lines_said, torch_threads

    make_genimage(tmp_path / "data", "sdv14", {"train": 8, "val": 4})
    tiny_extract = {"model": "tiny", "device": "cpu", "size": 32, "pixel_size": 64, "preprocess": "crop",
                    "rows_per_shard": 8, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    tiny_train = {"backbone": "tiny-RN", "backbone_weights": "random", "crop_size": 32, "lr": 1e-3,
                  "epochs": 5, "batch_size": 4, "device": "cpu"}  # fmt: skip
    cfg = ReproduceConfig(
        table="lol-table1", data_root=str(tmp_path / "data"), out=str(tmp_path / "out"), subsets=["sdv14"],
        scale=0.004, extract=tiny_extract, train=tiny_train, progress=False,
    )  # fmt: skip
    plan = make_plan(cfg)
    with torch_threads(1):
        cache = run_extract_covering(plan.extracts["sdv14"]).cache
        tcfg = reproduce.train_config(cfg, plan, plan.trainings[0], cache)
        tcfg.stop_after = 2
        run = run_train(tcfg)
        plan_text = reproduce.plan_text(cfg)
        assert "sdv14 on sdv14 (max_per_class 6): to train, resumes after epoch 2" in plan_text
        with lines_said() as logs:
            reproduce.run_reproduce(cfg)
    assert f"resuming {run.name} after epoch 2" in logs
    assert [m.split(":")[0] for m in logs if re.match(r"epoch \d+:", m)] == ["epoch 3", "epoch 4", "epoch 5"]


def test_make_reproduce_runs_the_command(tmp_path):
    make_genimage(tmp_path / "data", "sdv14", {"train": 2, "val": 1})
    import subprocess

    proc = subprocess.run(
        ["make", "-s", "reproduce", "TABLE=lol-table1", f"DATA={tmp_path / 'data'}",
         f"CACHE={tmp_path / 'c'}", f"RESULTS={tmp_path / 'r'}",
         "EXTRA=--subsets sdv14 --model tiny --device cpu --dry-run"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "reproduce lol-table1: LoL Table 1" in proc.stdout
        and "sdv14 [train, val]: to extract, 6 images" in proc.stdout
    )
    assert f"output: {tmp_path / 'r' / 'reproduce' / 'lol-table1'}.md" in proc.stdout


def test_a_bad_table_or_scale_is_one_line(tmp_path):
    for extra in (["lol-table9"], ["lol-table1", "--scale", "2"]):
        proc = run_cli("reproduce", *extra, "--data-root", str(tmp_path), check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_readme_lists_every_table():
    readme = (ROOT / "README.md").read_text()
    listed = readme.split("\n## Reproduce the papers", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^- `([a-z0-9-]+)`", listed, flags=re.M) == list(reproduce.PROTOCOLS)
