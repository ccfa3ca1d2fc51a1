"""A run on disk and in memory: its record, epoch checkpoints, the choice of an epoch, loading, scoring.

    <run>/params.json            the run's parameters and its model's constructor arguments ("model")
    <run>/epoch-NNN.safetensors  weights; epoch-NNN.optim.safetensors the latest optimizer state
    <run>/epoch-NNN.json         written last: the epoch is finished
    <run>/done.json              last and best epoch
    <run>/calibration.json       thresholds fit on the validation slice (stages.runs.calibrate), written after
    <run>/README.md, curves.png, tensorboard/, evals/   model card and curves (stages.runs.card, .curves)
    <run>/run-manifest.json      written last: every file's checksum (pipeline.runstore)

Training writes these and evaluation and detection read them, all through this module (as
nanoGPT's sample.py imports the model, not the trainer): save and load mirror each other, and the
network is built from the constructor arguments the run saved. Every write is whole (atomic).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.runstore import DONE, PARAMS, weights_file
from pipeline.storage import atomic_write
from stages.detectors import backbone
from stages.detectors import method as method_registry
from stages.detectors.detector import Detector
from stages.detectors.method import Method
from stages.runs import cachedata, distributed
from stages.runs.batches import make_inputs
from stages.runs.records import DoneRecord, EpochRecord, RunParams

CODE_ID = "stages.checkpoint"  # the name its code is hashed under, wherever the file lives


# The names of the run's files (the layout above): every other stage builds a run's paths with these.
# Those that sharing reads too (PARAMS, DONE, weights_file) are pipeline.runstore's, defined there once.
SAMPLE = "sample.json"


def _optim_file(epoch: int) -> str:
    return f"epoch-{epoch:03d}.optim.safetensors"


def _record_file(epoch: int) -> str:
    return f"epoch-{epoch:03d}.json"


def read_json(path: Path) -> Any:
    """A run file's JSON; None when the file is absent (a run not finished, not calibrated...)."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_params(run: Path) -> RunParams:
    """The run's record (params.json), which every run directory holds."""
    return json.loads((run / PARAMS).read_text())


def is_run(run: Path) -> bool:
    """Whether `run` is a run directory (it holds params.json)."""
    return (run / PARAMS).is_file()


def is_done(run: Path) -> bool:
    """Whether the run has finished training (done.json, written last)."""
    return (run / DONE).is_file()


def epoch_record(run: Path, epoch: int) -> EpochRecord:
    """The record of a finished epoch: loss, validation scores, param groups, the schedule's state."""
    return json.loads((run / _record_file(epoch)).read_text())


def epoch_records(run: Path) -> dict[int, EpochRecord]:
    """The records of every finished epoch, by epoch."""
    return {e: epoch_record(run, e) for e in finished_epochs(run)}


def atomic_json(path: Path, obj: Any) -> None:
    """Write JSON whole (the store's fsynced atomic write)."""
    atomic_write(str(path), json.dumps(obj, indent=1, sort_keys=True).encode())


def atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors whole as safetensors (no pickle)."""
    atomic_write(str(path), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def build_model(params: RunParams, pretrained: bool = True) -> Detector:
    """The network of a run from its record: the method's constructor with the saved arguments,
    initialised from the run's seed and (pretrained) the backbone weights of its spec.

    pretrained=False builds the architecture only, for loading a checkpoint that holds every weight:
    evaluation and detection need neither the download nor the original weight file.
    """
    weights = params["backbone"]["spec_weights"] if pretrained else "random"
    spec = backbone.BackboneSpec(params["backbone"]["arch"], weights)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.CRITICAL)  # open_clip logs random weights, failed downloads
    try:
        visual = backbone.load_visual(spec, params["hparams"]["crop_size"], seed=params["seed"])
    finally:
        logging.getLogger().setLevel(level)
    torch.manual_seed(params["seed"])
    return method_registry.get(params["method"]).model(visual, **params["model"])


def save_epoch(run: Path, epoch: int, model, opt, info: dict) -> None:
    atomic_safetensors(run / weights_file(epoch), model.state_dict())
    state = opt.state_dict()
    tensors = {f"{pid}.{k}": v for pid, s in state["state"].items() for k, v in s.items()}
    atomic_safetensors(run / _optim_file(epoch), tensors)
    atomic_json(run / _record_file(epoch), {**info, "epoch": epoch, "param_groups": state["param_groups"]})
    for old in run.glob("epoch-*.optim.safetensors"):
        if old.name != _optim_file(epoch):
            old.unlink()


def finished_epochs(run: Path) -> list[int]:
    """Epochs whose record (written last) and weights exist."""
    out = []
    for p in run.glob("epoch-*.json"):
        m = re.fullmatch(r"epoch-(\d{3})\.json", p.name)
        if m and (run / weights_file(int(m.group(1)))).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def load_epoch(run: Path, epoch: int, model, opt=None) -> None:
    model.load_state_dict(load_file(str(run / weights_file(epoch))))
    if opt is None:
        return
    info = epoch_record(run, epoch)
    flat = load_file(str(run / _optim_file(epoch)))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


@dataclass
class Run:
    """A run and its model, loaded for evaluation or detection (or being trained). `method` is the
    registry's object, looked up once; its name is the record's (params["method"])."""

    path: Path
    params: RunParams
    model: Detector
    device: str = "cpu"
    epoch: int = 0  # whose weights the model holds
    method: Method = field(init=False)

    def __post_init__(self) -> None:
        self.method = method_registry.get(self.params["method"])

    def use_epoch(self, epoch: int) -> None:
        """Load the weights of another finished epoch into the model."""
        load_epoch(self.path, epoch, self.model)
        self.epoch = epoch

    @torch.inference_mode()
    def scores(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """P(generated) of a prepared batch, on the CPU."""
        return self.model.score(self.model(x.to(self.device), maps.to(self.device))).cpu()

    @property
    def name(self) -> str:
        return self.path.name


def predict(
    run: Run, data: cachedata.CacheData, rows: cachedata.Rows, batch_size: int, progress: bool
) -> np.ndarray:
    """Scores of the rows in batches of `batch_size`. Under torchrun each rank scores every size-th
    batch and the scores are gathered: the very batches, so the very bits, of one process."""
    mine = distributed.batch_share(len(rows), batch_size)
    local = _predict(run, data, rows[mine], batch_size, progress and distributed.world().main)
    return distributed.gather_batches(local, len(rows), batch_size)


@torch.inference_mode()
def _predict(
    run: Run, data: cachedata.CacheData, rows: cachedata.Rows, batch_size: int, progress: bool
) -> np.ndarray:
    """Scores of the rows, read from the cache a block of rows at a time (memory stays bounded); the
    block a whole number of batches, so the batches are rows [k b, (k+1) b) whatever the block."""
    hp = run.params["hparams"]
    aligned = run.params["aligned"]
    scores = []
    block = batch_size * max(1, 1024 // batch_size)
    bar = tqdm(total=len(rows), desc=f"eval {run.name}", unit="img", disable=not progress)
    for b0 in range(0, len(rows), block):
        part = rows[b0 : b0 + block]
        crops, maps = (torch.from_numpy(a).to(run.device) for a in data.load(part, progress=False))
        for i in range(0, len(part), batch_size):  # cropped on the model's device
            x, m = make_inputs(
                run.method, hp, crops[i : i + batch_size], maps[i : i + batch_size], False, None, aligned
            )
            scores.append(run.scores(x, m).numpy())
            bar.update(len(x))
    bar.close()
    return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)


# What decides a run's weights (training saves, resumes and validates with these): the trainer's
# code version hashes them alone, so choosing and loading an epoch (below) can change without
# retraining every run.
TRAINING = (atomic_json, atomic_safetensors, build_model, save_epoch, load_epoch, Run, predict, _predict)

EPOCH_CHOICES = "best, last or an epoch number"


def select_epochs(path: str | Path, choice: str | int = "best", several: bool = False) -> list[int]:
    """The epochs `--epoch` names in a finished run: best (by validation), last, N, or (`several`) last5."""
    run = Path(path)
    if not is_run(run):
        raise UserError(f"{run} is not a run directory (no {PARAMS})")
    if not is_done(run):
        raise UserError(f"{run} has not finished training (no {DONE}): rerun `pipeline train` to resume it")
    record: DoneRecord = read_json(run / DONE)
    last = int(record["epochs"])
    kept = [e for e in finished_epochs(run) if e <= last]
    choice = str(choice)
    if choice == "best":
        if "best" not in record:
            raise UserError(
                f"{run.name} has no validation scores (trained before --val-fraction existed): "
                "pass --epoch last or an epoch number"
            )
        return [int(record["best"])]
    if choice == "last":
        return [last]
    if choice == "last5" and several:
        if len(kept) < 5:
            raise UserError(f"--epoch last5 needs 5 finished epochs; {run.name} has {len(kept)}")
        return kept[-5:]
    if not choice.isdigit():
        allowed = f"{EPOCH_CHOICES}{', or last5' if several else ''}"
        raise UserError(f"--epoch takes {allowed}, not '{choice}'")
    if int(choice) not in kept:
        raise UserError(f"{run.name} has no finished epoch {choice} (it has {kept[0]}..{kept[-1]})")
    return [int(choice)]


def load_run(path: str | Path, device: str = "cpu", epoch: str | int = "best") -> Run:
    """A finished run with the weights of `epoch` (see select_epochs), in evaluation mode on `device`."""
    run = Path(path)
    (chosen,) = select_epochs(run, epoch)
    params = read_params(run)
    if "model" not in params:
        raise UserError(f"{run.name} was trained by an older version (no model arguments saved): retrain it")
    model = build_model(params, pretrained=False)
    model.load_state_dict(load_file(str(run / weights_file(chosen))))
    model.to(device).eval()
    return Run(run, params, model, device, chosen)
