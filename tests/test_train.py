"""Runs: named by fingerprint, resumable bitwise, never retrained, trained from the cache alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_THREAD, TINY_TRAIN, extract_cache, run_cli

from pipeline.errors import UserError
from stages.synthetic import make_genimage
from stages.train import TrainConfig, run_train

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
    said = []
    cfg = cfg_for(two_caches, tmp_path / "runs", method="lol", epochs=2, batch_size=4, max_per_class=4)
    assert run_train(cfg, log=said.append) == run and said == [f"up to date: {run}"]  # not retrained

    sample = json.loads((run / "sample.json").read_text())
    assert [c["subset"] for c in sample["caches"]] == ["sdv14", "adm"]  # both caches, concatenated
    labels = [lab for c in sample["caches"] for lab in c["labels"]]
    assert sorted(labels) == [0] * 4 + [1] * 4  # --max-per-class: 4 real + 4 generated
    params = json.loads((run / "params.json").read_text())
    assert params["hparams"]["mask_range"] == [0.6, 0.8] and params["lare_alignment"].startswith("aligned")
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))  # no pickle


@pytest.mark.parametrize("memory_rows", [16384, 7])  # rows held in memory, or streamed by shard
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(two_caches, tmp_path, memory_rows):
    whole = run_train(cfg_for(two_caches[:1], tmp_path / "a", memory_rows=memory_rows), log=lambda m: None)
    part = run_train(
        cfg_for(two_caches[:1], tmp_path / "b", stop_after=1, memory_rows=memory_rows), log=lambda m: None
    )
    assert part.name == whole.name  # stopping is not part of what the run is
    assert not (part / "done.json").exists()
    resumed = run_train(cfg_for(two_caches[:1], tmp_path / "b", memory_rows=memory_rows), log=lambda m: None)
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
    none = run_train(dataclasses.replace(cfg, loader_workers=0), log=lambda m: None)
    assert none.name == two.name
    for name in ("epoch-001.safetensors", "epoch-002.safetensors", "epoch-002.optim.safetensors"):
        assert (two / name).read_bytes() == (none / name).read_bytes(), name


def test_precision_is_recorded_in_the_fingerprint(two_caches, tmp_path):
    fp32 = run_train(cfg_for(two_caches[:1], tmp_path, epochs=1), log=lambda m: None)
    bf16 = run_train(cfg_for(two_caches[:1], tmp_path, epochs=1, precision="bf16"), log=lambda m: None)
    assert fp32 != bf16  # bf16 autocast (here on the CPU) is another run
    assert json.loads((bf16 / "params.json").read_text())["precision"] == "bf16"
    assert json.loads((fp32 / "params.json").read_text())["precision"] == "fp32"  # auto on the CPU
    for kw, match in (({"precision": "fp8"}, "--precision must be one of auto, fp32, bf16"),
                      ({"loader_workers": -2}, "--loader-workers must be -1")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            run_train(cfg_for(two_caches[:1], tmp_path / "bad", **kw))
    assert not (tmp_path / "bad").exists()


def test_fingerprint_follows_parameters_and_sampling_is_seeded(two_caches, tmp_path):
    a = run_train(cfg_for(two_caches, tmp_path, epochs=1, max_per_class=3), log=lambda m: None)
    b = run_train(cfg_for(two_caches, tmp_path, epochs=1, max_per_class=3, seed=1), log=lambda m: None)
    assert a != b
    rows = [json.loads((r / "sample.json").read_text())["caches"] for r in (a, b)]
    assert [c["rows"] for c in rows[0]] != [c["rows"] for c in rows[1]]
    again = run_train(cfg_for(two_caches, tmp_path / "other", epochs=1, max_per_class=3), log=lambda m: None)
    assert again.name == a.name and (again / "sample.json").read_text() == (a / "sample.json").read_text()


def test_tampered_cache_is_refused_unless_no_verify(two_caches, tmp_path):
    cache = tmp_path / "copy.zarr"
    shutil.copytree(two_caches[0], cache)
    shard = sorted((cache / "pixels").glob("*/crops/c/0/0/0/0"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"failed verification: shard 0 of pixels/.*crops/c/0/0/0/0"):
        run_train(cfg_for([cache], tmp_path / "runs", epochs=1), log=lambda m: None)
    with pytest.raises(UserError, match="pass --no-verify to use it anyway"):
        run_train(cfg_for([cache], tmp_path / "runs", epochs=1), log=lambda m: None)
    run_train(cfg_for([cache], tmp_path / "runs", epochs=1, verify=False), log=lambda m: None)


def test_streamed_epoch_visits_every_row_once_in_full_batches(two_caches):
    import torch

    from stages.batches import EpochBatches
    from stages.cachedata import CacheData

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
    for kw, match in (({"crop_size": 512}, "smaller than the 512 px"), ({"epochs": -1}, "--epochs must")):
        with pytest.raises(UserError, match=match):
            run_train(cfg_for([learn_set[1]], tmp_path / "runs", **kw))
    assert not (tmp_path / "runs").exists()
