"""Training, evaluation and detection under torchrun (gloo on CPU, loopback), as the README types them:
the same run as one process accumulating the same micro-batches, the same results, one writer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stages.runs import distributed
from tests.helpers import ONE_THREAD, TINY_TRAIN, run_cli, torch_threads

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"

# 2 ranks against one process accumulating their 2 micro-batches: measured bitwise equal (0.0) on
# this CPU; allowed, the float reordering of gloo's gradient sum against a sequential accumulation.
TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(nproc: int = 2, port: int | None = None, nodes: tuple[int, int] | None = None) -> list[str]:
    """`torchrun ... -m pipeline` on loopback; `nodes` (count, this node's rank) for several machines."""
    where = ["--rdzv-endpoint", f"127.0.0.1:{port or free_port()}"]
    many = ["--nnodes", str(nodes[0]), "--node-rank", str(nodes[1])] if nodes else []
    return [TORCHRUN, "--nproc-per-node", str(nproc), *many, *where, "-m", "pipeline"]


def torchrun(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*torchrun_args(), *args], capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_args(cache: Path, out: Path, method: str = "egre", epochs: int = 2, *extra: str) -> list[str]:
    return [
        "train", "--from-cache", str(cache), "--method", method, "--out", str(out), "--epochs", str(epochs),
        "--batch-size", "16", *TINY_TRAIN, "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def reference(cache: Path, out: Path, method: str, epochs: int, micro_batches: int, **kw) -> Path:
    """One process, in-process, each global batch cut into `micro_batches` (gradients accumulated)."""
    from stages.configs import TrainConfig
    from stages.train import run_train

    cfg = TrainConfig(
        caches=[str(cache)], method=method, out=str(out), epochs=epochs, batch_size=16, lr=1e-3,
        crop_size=32, backbone="tiny-RN", backbone_weights="random", progress=False, device="cpu",
        micro_batches=micro_batches, **kw,
    )  # fmt: skip
    with torch_threads(1):
        return run_train(cfg)


def the_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def weight_gap(a: Path, b: Path, epoch: int) -> float:
    """The largest absolute difference between two runs' weights (BatchNorm's statistics included)."""
    x, y = (load_file(str(r / f"epoch-{epoch:03d}.safetensors")) for r in (a, b))
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def records(run: Path, epoch: int) -> dict:
    return json.loads((run / f"epoch-{epoch:03d}.json").read_text())


def test_two_ranks_are_one_process_accumulating_two_micro_batches(learn_set, tmp_path):
    """EGRE, streamed (--memory-rows 20: each rank reads its share of every shuffle buffer): the weights
    of 2 ranks are those of one process accumulating the 2 micro-batches, within TOLERANCE, and the
    validation figures and losses equal; one process on the whole batch is another run (BatchNorm
    normalises per micro-batch on CPU), by far more than the tolerance."""
    cache = learn_set[1]
    proc = torchrun(*train_args(cache, tmp_path / "ddp", "egre", 2, "--memory-rows", "20"))
    ddp = the_run(tmp_path / "ddp")
    assert proc.stdout.strip().splitlines() == [str(ddp)]  # rank 0 alone speaks
    acc = reference(cache, tmp_path / "acc", "egre", 2, micro_batches=2, memory_rows=20)
    whole = reference(cache, tmp_path / "whole", "egre", 2, micro_batches=1, memory_rows=20)
    assert acc.name == ddp.name  # the same fingerprint: the same run
    assert weight_gap(ddp, acc, 2) <= TOLERANCE
    assert weight_gap(ddp, whole, 2) > 1000 * TOLERANCE
    for e in (1, 2):
        assert records(ddp, e)["val"] == records(acc, e)["val"]
        assert records(ddp, e)["loss"] == pytest.approx(records(acc, e)["loss"], abs=TOLERANCE)
    params = json.loads((ddp / "params.json").read_text())
    assert params["world_size"] == 2
    assert params["micro_batches"] == {"count": 2, "batchnorm": "per micro-batch"}
    assert "micro_batches" not in json.loads((whole / "params.json").read_text())
    assert (ddp / "done.json").read_text() == (acc / "done.json").read_text()
    assert (ddp / "calibration.json").read_text() == (acc / "calibration.json").read_text()
    assert not list(ddp.glob("*.tmp*"))


def test_two_nodes_on_loopback(learn_set, tmp_path):
    """`--nnodes 2`: two torchrun agents (node ranks 0 and 1), one process each, train LoL as one
    process accumulating 2 micro-batches does."""
    cache, port = learn_set[1], free_port()
    args = train_args(cache, tmp_path / "ddp", "lol", 1)
    nodes = [
        subprocess.Popen(
            [*torchrun_args(1, port, (2, k)), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **ONE_THREAD},
        )  # fmt: skip
        for k in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    ddp = the_run(tmp_path / "ddp")
    acc = reference(cache, tmp_path / "acc", "lol", 1, micro_batches=2)
    assert acc.name == ddp.name
    assert weight_gap(ddp, acc, 1) <= TOLERANCE
    assert records(ddp, 1)["val"] == records(acc, 1)["val"]


def _ranks_of(agent: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun `agent` started (read from /proc)."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(e.split("=", 1) for e in (p / "environ").read_text().split("\0") if "=" in e)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and "RANK" in env:
            found[int(env["RANK"])] = int(p.name)
    return found


def test_a_rank_killed_mid_run_ends_the_job_and_the_same_command_resumes(learn_set, tmp_path):
    """SIGKILL rank 1 once epoch 1 is written: torchrun ends the job, no epoch is half written, and
    the same command resumes after the last finished epoch to the weights of a run never killed."""
    cache = learn_set[1]
    args = train_args(cache, tmp_path / "ddp", "egre", 3)
    cmd = [*torchrun_args(), *args]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **ONE_THREAD})  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((tmp_path / "ddp").glob("*/epoch-001.json")):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    os.kill(_ranks_of(job.pid)[1], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    run = the_run(tmp_path / "ddp")
    assert not (run / "done.json").exists()
    from stages.runs.checkpoint import finished_epochs

    kept = finished_epochs(run)
    assert kept and kept == list(range(1, len(kept) + 1)) and kept[-1] < 3, err
    assert {p.name for p in run.glob("epoch-*.json")} == {f"epoch-{e:03d}.json" for e in kept}
    for e in kept:
        load_file(str(run / f"epoch-{e:03d}.safetensors"))  # whole
    resumed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run.name} after epoch {kept[-1]}" in resumed.stdout + resumed.stderr
    never_killed = reference(cache, tmp_path / "acc", "egre", 3, micro_batches=2)
    assert weight_gap(run, never_killed, 3) <= TOLERANCE


def test_eval_and_detect_under_two_ranks_write_what_one_process_writes(learn_set, egre_run, tmp_path):
    """The rows dealt to 2 ranks by batches (5 rows: batches straddle the ranks' shares) and gathered:
    eval's CSV and JSON, detect's CSV, byte for byte those of one process at the same batch size."""
    cache = learn_set[1]
    for n, out in ((1, "one"), (2, "two")):
        cmd = ["eval", "--checkpoint", str(egre_run), "--from-cache", str(cache), "--out",
               str(tmp_path / out), "--batch-size", "5", "--device", "cpu", "--no-progress"]  # fmt: skip
        torchrun(*cmd) if n == 2 else run_cli(*cmd, env=ONE_THREAD)
    for suffix in (".csv", ".json"):
        (one,), (two,) = (list((tmp_path / d).glob(f"*{suffix}")) for d in ("one", "two"))
        assert one.name == two.name and one.read_bytes() == two.read_bytes()
    folder = learn_set[0] / "stable_diffusion_v_1_4" / "imagenet_ai_0419_sdv4" / "val"
    for n, out in ((1, "one.csv"), (2, "two.csv")):
        cmd = ["detect", str(folder), "--checkpoint", str(egre_run), "--out", str(tmp_path / out),
               "--batch-size", "3", "--device", "cpu", "--no-progress"]  # fmt: skip
        proc = torchrun(*cmd) if n == 2 else run_cli(*cmd, env=ONE_THREAD)
        assert proc.stdout.count("scored ") == 1
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()


def test_a_batch_not_divisible_by_the_ranks_and_a_damaged_cache_stop_every_rank_in_one_line(
    learn_set, tmp_path
):
    cache = learn_set[1]
    odd = torchrun(*train_args(cache, tmp_path / "runs", "egre", 1, "--batch-size", "5"), check=False)
    assert odd.returncode != 0
    assert odd.stderr.count("Error: the global batch of 5 rows (--batch-size) is not divisible") == 1
    assert not (tmp_path / "runs").exists()
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(cache, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    art = next(a for p, a in manifest["artifacts"].items() if p.startswith("lare"))
    key = sorted(next(iter(art["shards"].values()))["files"])[-1]
    (damaged / key).write_bytes(b"damaged")
    bad = torchrun(*train_args(damaged, tmp_path / "runs", "egre", 1), check=False, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.count("failed verification") == 1, bad.stderr
    assert not (tmp_path / "runs").exists()


# ---- the shares, in one process (a rank's view faked) ----------------------------------------------
def test_each_rank_verifies_and_reads_only_its_share(learn_set, monkeypatch):
    """Verification: the ranks' shares of a cache's objects are disjoint and cover all of them. Reads:
    with 2 ranks each reads its half of the shard blocks (in memory and streamed), and the batches
    it yields after the exchange are bitwise one process's."""
    from pipeline.integrity import manifest_files, verify
    from pipeline.store import CacheStore
    from stages.runs import batches, cachedata

    cache = learn_set[1]
    store = CacheStore(str(cache), mode="r")
    checked: list[str] = []
    monkeypatch.setattr(CacheStore, "checksum", lambda self, key: checked.append(key) or "x")
    for k in (0, 1):
        verify(store, share=(k, 2))
    assert sorted(checked) == sorted(manifest_files(store.manifest())) and len(set(checked)) == len(checked)
    monkeypatch.undo()

    data = cachedata.CacheData([str(cache)], split="train")
    rows = data.rows("train")
    labels = torch.from_numpy(rows.label)
    for memory_rows in (10_000, 20):  # in memory; streamed through shuffle buffers of 20 rows
        one = list(batches.EpochBatches(data, rows, labels, 16, memory_rows, False).epoch(torch.Generator()))
        read: dict[int, list[int]] = {0: [], 1: []}
        for rank in (0, 1):
            feed, got = _as_rank(rank, data, rows, labels, memory_rows, read, monkeypatch)
            assert len(got) == len(one)
            for (p1, c1, m1, y1), (p2, c2, m2, y2) in zip(one, got, strict=True):
                assert np.array_equal(p1, p2) and torch.equal(c1, c2) and torch.equal(m1, m2)
                assert torch.equal(y1, y2)
        blocks = len(batches.shard_blocks(data, rows))
        assert sorted(read[0] + read[1]) == list(range(blocks))  # each block read once, in all
        assert abs(len(read[0]) - len(read[1])) <= 1


def _as_rank(rank, data, rows, labels, memory_rows, read, monkeypatch):
    """An epoch's batches as rank `rank` of 2 sees them: the other rank's share of each exchange is
    read here from the cache (as that rank would send it); `read` collects the blocks this one read."""
    from stages.runs import batches

    blocks = batches.shard_blocks(data, rows)
    state: dict = {"parts": [list(range(len(blocks)))]}  # in memory: one exchange of every block
    original_read, original_buffers = batches.BlockReads.__getitem__, batches.EpochBatches._buffers

    def spy(self, k):
        read[rank].append(k)
        return original_read(self, k)

    def buffers(self, order):  # streamed: one exchange per shuffle buffer, in order
        parts = original_buffers(self, order)
        state["parts"] = list(parts)
        return parts

    def exchange(pos, crops, maps):
        part = state["parts"].pop(0)
        theirs = [blocks[b] for j, b in enumerate(part) if j % 2 != rank] or [np.zeros(0, int)]
        at = np.concatenate(theirs)
        c, m = data.load(rows[at], progress=False) if len(at) else (crops[:0].numpy(), maps[:0].numpy())
        other = (torch.from_numpy(at), torch.from_numpy(c), torch.from_numpy(m))
        return [(pos, crops, maps), other][:: 1 if rank == 0 else -1]

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank, 2))
    monkeypatch.setattr(distributed, "all_gather_rows", exchange)
    monkeypatch.setattr(batches.BlockReads, "__getitem__", spy)
    monkeypatch.setattr(batches.EpochBatches, "_buffers", buffers)
    feed = batches.EpochBatches(data, rows, labels, 16, memory_rows, False)
    got = list(feed.epoch(torch.Generator()))
    monkeypatch.undo()
    return feed, got
