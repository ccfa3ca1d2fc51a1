"""Runs: named by fingerprint, resumable bitwise, never retrained, trained from the cache alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from stages.configs import TrainConfig
from stages.detectors import lol
from stages.genimage.synthetic import make_genimage
from stages.train import run_train
from tests.helpers import ONE_THREAD, TINY_TRAIN, extract_cache, lines_said, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory) -> list[Path]:
    """sdv14 and adm caches whose image folders are deleted after extraction."""
    root = tmp_path_factory.mktemp("two")
    caches = []
    for k, subset in enumerate(("sdv14", "adm")):
        make_genimage(root / "data", subset, {"train": 5, "val": 3}, seed=10 + k)
        caches.append(extract_cache(root / "data", root / "cache", subset))
    shutil.rmtree(root / "data")  # training must need nothing but the caches
    return caches


def cfg_for(caches, out, **kw) -> TrainConfig:
    base = dict(
        caches=[str(c) for c in caches], method="egre", out=str(out), epochs=3, batch_size=4, lr=1e-3,
        crop_size=32, backbone="tiny-RN", backbone_weights="random", progress=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_cli_trains_from_deleted_folder_concatenated_resumes_and_is_not_retrained(two_caches, tmp_path):
    args = ["train", "--from-cache", str(two_caches[0]), str(two_caches[1]), "--method", "lol",
            "--epochs", "2", "--batch-size", "4", "--max-per-class", "4", "--out", str(tmp_path / "runs"),
            "--no-progress", *TINY_TRAIN]  # fmt: skip
    first = run_cli(*args, "--stop-after", "1", env=ONE_THREAD)
    run = Path(first.stdout.strip())
    assert run.parent == tmp_path / "runs" and run.name.startswith("lol-adm+sdv14-")
    assert (run / "epoch-001.safetensors").is_file() and not (run / "done.json").exists()
    second = run_cli(*args, env=ONE_THREAD)
    assert "resuming" in second.stderr and Path(second.stdout.strip()) == run
    assert (run / "done.json").is_file() and (run / "epoch-002.json").is_file()
    assert not (run / "epoch-001.optim.safetensors").exists()  # only the latest optimizer state is kept
    cfg = cfg_for(two_caches, tmp_path / "runs", method="lol", epochs=2, batch_size=4, max_per_class=4)
    with lines_said() as said:
        assert run_train(cfg) == run
    assert said == [f"up to date: {run}"]  # not retrained

    sample = json.loads((run / "sample.json").read_text())
    assert [c["subset"] for c in sample["caches"]] == ["sdv14", "adm"]  # both caches, concatenated
    labels = [lab for c in sample["caches"] for lab in c["labels"]]
    assert sorted(labels) == [0] * 4 + [1] * 4  # --max-per-class: 4 real + 4 generated
    params = json.loads((run / "params.json").read_text())
    assert params["hparams"]["mask_range"] == [0.6, 0.8] and params["lare_alignment"].startswith("aligned")
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))  # no pickle


@pytest.mark.parametrize("memory_rows", [16384, 7])  # rows held in memory, or streamed by shard
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(two_caches, tmp_path, memory_rows):
    whole = run_train(cfg_for(two_caches[:1], tmp_path / "a", memory_rows=memory_rows))
    part = run_train(cfg_for(two_caches[:1], tmp_path / "b", stop_after=1, memory_rows=memory_rows))
    assert part.name == whole.name  # stopping is not part of what the run is
    assert not (part / "done.json").exists()
    resumed = run_train(cfg_for(two_caches[:1], tmp_path / "b", memory_rows=memory_rows))
    for name in ("epoch-002.safetensors", "epoch-003.safetensors", "epoch-003.optim.safetensors"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


@pytest.mark.parametrize("memory_rows", [16384, 7])
def test_loader_workers_change_no_bit(two_caches, tmp_path, memory_rows):
    """Shards read by 2 worker processes (the CLI) or in this process: the same weights, bit for bit."""
    args = ["train", "--from-cache", str(two_caches[0]), "--method", "lol", "--epochs", "2", "--batch-size",
            "4", "--lr", "1e-3", "--crop-size", "32", "--backbone", "tiny-RN", "--backbone-weights", "random",
            "--memory-rows", str(memory_rows), "--out", str(tmp_path / "two"), "--no-progress"]  # fmt: skip
    two = Path(run_cli(*args, "--loader-workers", "2", env=ONE_THREAD).stdout.strip())
    cfg = cfg_for(two_caches[:1], tmp_path / "none", method="lol", epochs=2, memory_rows=memory_rows)
    none = run_train(dataclasses.replace(cfg, loader_workers=0))
    assert none.name == two.name
    for name in ("epoch-001.safetensors", "epoch-002.safetensors", "epoch-002.optim.safetensors"):
        assert (two / name).read_bytes() == (none / name).read_bytes(), name


def test_precision_is_recorded_in_the_fingerprint(two_caches, tmp_path):
    fp32 = run_train(cfg_for(two_caches[:1], tmp_path, epochs=1))
    bf16 = run_train(cfg_for(two_caches[:1], tmp_path, epochs=1, precision="bf16"))
    assert fp32 != bf16  # bf16 autocast (here on the CPU) is another run
    assert json.loads((bf16 / "params.json").read_text())["precision"] == "bf16"
    assert json.loads((fp32 / "params.json").read_text())["precision"] == "fp32"  # auto on the CPU
    for kw, match in (({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16"),
                      ({"loader_workers": -2}, "--loader-workers must be -1")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            run_train(cfg_for(two_caches[:1], tmp_path / "bad", **kw))
    assert not (tmp_path / "bad").exists()


def test_fingerprint_follows_parameters_and_sampling_is_seeded(two_caches, tmp_path):
    a = run_train(cfg_for(two_caches, tmp_path, epochs=1, max_per_class=3))
    b = run_train(cfg_for(two_caches, tmp_path, epochs=1, max_per_class=3, seed=1))
    assert a != b
    rows = [json.loads((r / "sample.json").read_text())["caches"] for r in (a, b)]
    assert [c["rows"] for c in rows[0]] != [c["rows"] for c in rows[1]]
    again = run_train(cfg_for(two_caches, tmp_path / "other", epochs=1, max_per_class=3))
    assert again.name == a.name and (again / "sample.json").read_text() == (a / "sample.json").read_text()


def test_tampered_cache_is_refused_unless_no_verify(two_caches, tmp_path):
    cache = tmp_path / "copy.zarr"
    shutil.copytree(two_caches[0], cache)
    shard = sorted((cache / "pixels").glob("*/crops/c/0/0/0/0"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"failed verification: shard 0 of pixels/.*crops/c/0/0/0/0"):
        run_train(cfg_for([cache], tmp_path / "runs", epochs=1))
    with pytest.raises(UserError, match="pass --no-verify to use it anyway"):
        run_train(cfg_for([cache], tmp_path / "runs", epochs=1))
    run_train(cfg_for([cache], tmp_path / "runs", epochs=1, verify=False))


def test_streamed_epoch_visits_every_row_once_in_full_batches(two_caches):
    import torch

    from stages.runs.batches import EpochBatches
    from stages.runs.cachedata import CacheData

    data = CacheData([str(c) for c in two_caches])
    rows = data.rows("train")
    labels = torch.from_numpy(rows.label)
    stream = EpochBatches(data, rows, labels, batch_size=3, memory_rows=7, progress=False)
    memory = EpochBatches(data, rows, labels, batch_size=3, memory_rows=10**6, progress=False)
    assert stream.stream and not memory.stream
    batches = list(stream.epoch(torch.Generator().manual_seed(0)))
    seen = np.concatenate([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(rows)))  # every row exactly once
    assert all(len(b[0]) == 3 for b in batches[:-1])  # only the epoch's last batch may be short
    for pos, crops, maps, y in batches:  # each row comes with its own crop, map and label
        assert torch.equal(crops, memory.crops[pos]) and torch.equal(maps, memory.maps[pos])
        assert torch.equal(y, labels[pos])
    again = [b[0].tolist() for b in stream.epoch(torch.Generator().manual_seed(0))]
    assert again == [b[0].tolist() for b in batches]  # the order is the generator's


def test_unloadable_backbone_is_one_line_and_leaves_no_run(learn_set, tmp_path):
    """Offline, the default RN50 `openai` weights cannot be fetched: one line, and no half-made run."""
    with pytest.raises(
        UserError, match="could not load the RN50 backbone weights 'openai'.*--backbone-weights"
    ) as e:
        run_train(cfg_for([learn_set[1]], tmp_path / "runs", backbone="RN50", backbone_weights="openai"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_bad_numbers_are_one_line_and_leave_no_run(learn_set, tmp_path):
    for kw, match in (
        ({"crop_size": 512}, "smaller than the 512 px"),
        ({"epochs": -1}, "--epochs must"),
        ({"patience": -1}, "--patience must"),
        ({"max_per_class": "lots"}, "--max-per-class takes a positive number or 'all'"),
        ({"max_per_class": 0}, "--max-per-class must be positive"),
        ({"val_fraction": 1.0}, "--val-fraction must lie strictly between 0 and 1"),
    ):
        with pytest.raises(UserError, match=match):
            run_train(cfg_for([learn_set[1]], tmp_path / "runs", **kw))
    for fraction in ("0", "1.2"):  # as the user types it: one line, exit 2
        proc = run_cli("train", "--from-cache", str(learn_set[1]), "--out", str(tmp_path / "runs"),
                       "--val-fraction", fraction, *TINY_TRAIN, check=False)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert (
            proc.stderr.startswith("Error: --val-fraction must lie strictly between 0 and 1")
            and fraction in proc.stderr
        )
    assert not (tmp_path / "runs").exists()


def _spoil_val_split(cache: Path, copy: Path) -> int:
    """Copy a cache and overwrite the LaRE maps (NaN) and pixels (noise) of its val-split rows in place.

    The manifest is untouched (same artifact fingerprints, so the same run name); only --no-verify
    reads the copy. Returns how many rows were spoiled."""
    import zarr

    from stages.runs.cachedata import CacheData

    shutil.copytree(cache, copy)
    src = CacheData([str(copy)]).sources[0]
    val = np.flatnonzero((src.columns["split"] == "val") & src.usable)
    group = zarr.open_group(str(copy), mode="r+")
    maps, crops = group[f"{src.lare}/maps"], group[f"{src.pixels}/crops"]
    for r in val.tolist():
        maps[r] = np.full(maps.shape[1:], np.nan, dtype=maps.dtype)
        crops[r] = np.random.default_rng(r).integers(0, 256, crops.shape[1:], dtype=np.uint8)
    return len(val)


def test_val_split_is_never_read_and_validation_comes_from_the_train_split(two_caches, tmp_path):
    """Spoiling every val-split row of the cache changes no bit of training: no such row enters a
    batch, a validation score or the calibration of thresholds (NaN maps would poison any). The
    validation slice is a seeded, label-stratified part of the train split, disjoint from the
    training rows."""
    assert _spoil_val_split(two_caches[0], tmp_path / "spoiled.zarr") == 6
    clean = run_train(cfg_for(two_caches[:1], tmp_path / "a", epochs=2))
    spoiled = run_train(cfg_for([tmp_path / "spoiled.zarr"], tmp_path / "b", epochs=2, verify=False))
    assert clean.name == spoiled.name
    for name in ("epoch-001.safetensors", "epoch-002.safetensors", "done.json", "calibration.json"):
        assert (clean / name).read_bytes() == (spoiled / name).read_bytes(), name
    calibration = json.loads((clean / "calibration.json").read_text())  # scored the slice, no val row
    assert np.isfinite(calibration["validation_ece"]) and calibration["n_real"] == 1
    for e in (1, 2):
        a, b = (json.loads((r / f"epoch-{e:03d}.json").read_text()) for r in (clean, spoiled))
        assert a["val"] == b["val"] and np.isfinite(a["val"]["auc"]) and a["val"]["n"] == 2

    sample = json.loads((clean / "sample.json").read_text())
    (train,), (val,) = sample["caches"], sample["validation"]
    assert all(p.startswith("train/") for p in train["paths"] + val["paths"])
    assert not set(train["rows"]) & set(val["rows"])
    assert sorted(val["labels"]) == [0, 1]  # round(0.05 * 5) -> at least one row per label
    assert len(train["rows"]) + len(val["rows"]) == 10  # every other train-split row trains
    other = run_train(cfg_for(two_caches[:1], tmp_path / "c", epochs=1, seed=3))
    (val3,) = json.loads((other / "sample.json").read_text())["validation"]
    assert val3["rows"] != val["rows"]  # seeded: another seed holds out other rows
    assert json.loads((clean / "params.json").read_text())["hparams"]["val_fraction"] == 0.05


def test_plateau_schedule_and_early_stop_follow_the_validation_scores(two_caches, tmp_path):
    """The learning rate of every epoch is what torch's ReduceLROnPlateau (the reference's settings)
    gives on the recorded validation AUCs; the best epoch is the recorded one; --patience ends a run
    that many epochs after its best."""
    import torch

    from stages.train import best_epoch

    for patience, epochs in ((0, 7), (1, 7)):
        cfg = cfg_for(two_caches, tmp_path / f"p{patience}", epochs=epochs, patience=patience, min_val_rows=1)
        with lines_said() as said:
            run = run_train(cfg)
        params = json.loads((run / "params.json").read_text())
        assert params["hparams"]["plateau"] == {"mode": "max", "factor": 0.5, "patience": 4, "min_lr": 1e-7}
        done = json.loads((run / "done.json").read_text())
        records = {
            e: json.loads((run / f"epoch-{e:03d}.json").read_text()) for e in range(1, done["epochs"] + 1)
        }
        history = {e: r["val"] for e, r in records.items()}
        assert done["best"] == best_epoch(history) and done["best_val"] == history[done["best"]]
        assert max(r["auc"] for r in history.values()) == history[done["best"]]["auc"]
        if patience and done["epochs"] < epochs:
            assert done["epochs"] - done["best"] == patience and "--patience" in done["stopped"]
        else:
            assert done["epochs"] == epochs and "--epochs" in done["stopped"]
        (summary,) = [line for line in said if line.startswith("done after")]
        assert f"best epoch {done['best']}" in summary
        replay = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            replay, mode="max", factor=0.5, patience=4, min_lr=1e-7
        )
        for e, r in records.items():
            sched.step(r["val"]["auc"])
            assert [g["lr"] for g in r["param_groups"]] == [replay.param_groups[0]["lr"]], e
    assert done["epochs"] < 7  # patience 1 on a 2-row validation slice: stopped early


def test_lol_trains_on_the_papers_setting_by_default(tmp_path):
    """--method lol: 1,600 + 1,600 rows unless --max-per-class; a BigGAN training cache gets lr 5e-7
    unless --lr is given, and the log says so."""
    make_genimage(tmp_path / "data", "biggan", {"train": 4, "val": 1}, seed=5)
    cache = extract_cache(tmp_path / "data", tmp_path / "cache", "biggan")
    tiny = ("--backbone", "tiny-RN", "--backbone-weights", "random", "--crop-size", "32")
    args = ("train", "--from-cache", str(cache), "--method", "lol", "--epochs", "1", "--no-progress", *tiny,
            "--out", str(tmp_path / "runs"))  # fmt: skip
    proc = run_cli(*args, env=ONE_THREAD)
    params = json.loads((Path(proc.stdout.strip()) / "params.json").read_text())
    hp = params["hparams"]
    defaults = TrainConfig(caches=[])  # the options not typed take TrainConfig's defaults, LoL's own its
    assert (params["seed"], hp["val_fraction"], hp["memory_rows"], hp["mask_range"]) == (
        defaults.seed,
        defaults.val_fraction,
        defaults.memory_rows,
        list(lol.Options().mask_range),
    )
    assert hp["lr"] == 5e-7 and "lr 5e-07: the lol paper's rate for this training subset" in proc.stderr
    assert hp["max_per_class"] == 1600 and "fewer than --max-per-class 1600" in proc.stderr
    cfg = cfg_for([cache], tmp_path / "runs", method="lol", epochs=1, lr=1e-3, max_per_class="all")
    with lines_said() as said:
        hp = json.loads((run_train(cfg) / "params.json").read_text())["hparams"]
    assert hp["lr"] == 1e-3 and hp["max_per_class"] is None and not [m for m in said if m.startswith("lr")]


def test_resume_restores_the_plateau_schedule_and_the_validation_history(two_caches, tmp_path):
    """Stopped at epoch 7 and resumed, a 10-epoch EGRE run is bitwise the uninterrupted one, the
    plateau schedule's reduction included: here the validation AUC peaks at epoch 5 and the rate
    halves at epoch 10; a schedule restarted at the resume would count its bad epochs from 8."""
    kw = dict(epochs=10, patience=0, min_val_rows=1)
    whole = run_train(cfg_for(two_caches[:1], tmp_path / "a", **kw))
    run_train(cfg_for(two_caches[:1], tmp_path / "b", stop_after=7, **kw))
    resumed = run_train(cfg_for(two_caches[:1], tmp_path / "b", **kw))

    def lrs(run: Path) -> list[float]:
        return [
            json.loads((run / f"epoch-{e:03d}.json").read_text())["param_groups"][0]["lr"]
            for e in range(1, 11)
        ]

    assert lrs(whole) == lrs(resumed) and lrs(whole)[-1] == 5e-4  # the schedule did reduce, after the stop
    for name in ("epoch-010.safetensors", "done.json"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


def test_best_epoch_never_chosen_by_a_nan_auc_and_ties_go_to_the_lower_loss_then_the_later():
    """No AUC without both labels: such an epoch is never the best (None when none has one); among
    equal AUCs the lower validation loss wins, then the later (more trained) epoch."""
    import math

    from stages.train import best_epoch, validation_metrics

    v = validation_metrics(np.array([1, 1]), np.array([0.9, 0.6]))
    assert math.isnan(v["auc"]) and math.isnan(v["ap"]) and v["acc"] == 1.0 and v["loss"] > 0
    nan = {1: {"auc": math.nan, "loss": 0.5}, 2: {"auc": math.nan, "loss": 0.4}}
    assert best_epoch(nan) is None
    assert best_epoch({**nan, 3: {"auc": 0.6, "loss": 0.9}}) == 3
    assert (
        best_epoch({1: {"auc": 0.9, "loss": 0.5}, 2: {"auc": 0.9, "loss": 0.3}, 3: {"auc": 0.8, "loss": 0.1}})
        == 2
    )
    assert (
        best_epoch({1: {"auc": 1.0, "loss": 0.3}, 2: {"auc": 1.0, "loss": 0.3}, 3: {"auc": 0.9, "loss": 0.1}})
        == 2
    )


def test_selection_rule_needs_min_val_rows_of_each_label():
    from stages.configs import MIN_VAL_ROWS
    from stages.train import selection_rule

    assert MIN_VAL_ROWS == 50
    assert selection_rule(np.array([0] * 50 + [1] * 50), 50) is None
    why = selection_rule(np.array([0] * 50 + [1] * 49), 50)
    assert why.startswith("validation slice of 50 real + 49 generated rows, fewer than --min-val-rows 50")
    assert "model selection is off" in selection_rule(np.array([1, 1]), 1)  # one label: no AUC at all


@pytest.mark.parametrize(("per_label", "max_per_class", "selects"), [(980, None, False), (1000, None, True),
                                                                     (5000, 1600, True)])  # fmt: skip
def test_the_default_slice_selects_from_1000_training_rows_per_label(per_label, max_per_class, selects):
    """docs/training.md: with --val-fraction 0.05 a slice chooses epochs from about 1,000 rows per label on,
    and LoL's 1,600 + 1,600 hold out 80 + 80."""
    from stages.configs import MIN_VAL_ROWS
    from stages.runs.cachedata import Rows
    from stages.train import hold_out, selection_rule

    labels = np.repeat([0, 1], per_label)
    rows = Rows(np.zeros(len(labels), dtype=int), np.arange(len(labels)), labels)
    _, val = hold_out(rows, 0.05, max_per_class, seed=0)
    assert (selection_rule(val.label, MIN_VAL_ROWS) is None) == selects
    if max_per_class == 1600:
        assert (val.label == 0).sum() == (val.label == 1).sum() == 80


def test_a_small_validation_slice_keeps_the_last_epoch_without_early_stop_or_plateau(two_caches, tmp_path):
    """Typed as a user would: on a 1 + 1 row validation slice, --patience 1 stops nothing, the learning
    rate never moves, the best epoch is the last, and done.json and the log say why (the log once, the done
    line referring to it)."""
    args = ["train", "--from-cache", str(two_caches[0]), "--method", "egre", "--epochs", "6",
            "--patience", "1", "--batch-size", "4", "--out", str(tmp_path / "runs"), "--no-progress",
            *TINY_TRAIN]  # fmt: skip
    proc = run_cli(*args, env=ONE_THREAD)
    run = Path(proc.stdout.strip())
    done = json.loads((run / "done.json").read_text())
    assert done["epochs"] == 6 and done["best"] == 6 and "--epochs 6 reached" in done["stopped"]
    assert done["selection"]["by"] == "last"
    assert done["selection"]["why"].startswith("validation slice of 1 real + 1 generated rows, fewer than")
    notes = [line for line in proc.stderr.splitlines() if "model selection is off" in line]
    assert notes == [f"note: {done['selection']['why']}"]  # the reason once, at the start
    assert proc.stderr.count(done["selection"]["why"]) == 1
    (done_line,) = [line for line in proc.stderr.splitlines() if line.startswith("done after epoch")]
    assert done_line == (
        "done after epoch 6: --epochs 6 reached; best epoch = last epoch 6 "
        "(model selection off, see the note above)"
    )
    lrs = {
        json.loads((run / f"epoch-{e:03d}.json").read_text())["param_groups"][0]["lr"] for e in range(1, 7)
    }
    assert lrs == {1e-3}
    assert json.loads((run / "params.json").read_text())["hparams"]["min_val_rows"] == 50
    proc = run_cli(*args, "--min-val-rows", "1", env=ONE_THREAD)  # selection forced on: another run
    done = json.loads((Path(proc.stdout.strip()) / "done.json").read_text())
    assert done["selection"] == {"by": "validation AUC"} and "model selection is off" not in proc.stderr


def test_the_batch_code_is_in_a_runs_fingerprint(two_caches, monkeypatch):
    """How batches are cut (stages.runs.batches: LoL's crop offsets, issue 21) names the run: a change there
    gives new runs, never a finished run called up to date."""
    from stages import train
    from stages.runs import batches, cachedata

    cfg = cfg_for(two_caches[:1], "unused", method="lol")
    data = cachedata.CacheData(cfg.caches, split="train")
    _, params = train.plan_run(cfg, data)
    real = train.stage_code
    monkeypatch.setattr(train, "stage_code", lambda *parts: real(*(p for p in parts if p is not batches)))
    assert train.plan_run(cfg, data)[1]["fingerprint"] != params["fingerprint"]


def test_auto_precision_is_bf16_on_cuda_only_and_fp32_stays_on_offer():
    """docs/training.md: the one default where EGRE training departs from the reference's fp32."""
    from stages.train import resolve_precision

    assert resolve_precision("auto", "cuda") == resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cpu") == resolve_precision("fp32", "cuda") == "fp32"
