"""Training a detector (EGRE or LoL) from caches: a run directory named by its fingerprint.

    <out>/<method>-<subsets>-<fp12>/
      params.json                  everything that decides the weights (and the fingerprint)
      sample.json                  the training and validation rows (cache, row, content id, path, label)
      epoch-NNN.safetensors        model weights after epoch NNN (every epoch is kept)
      epoch-NNN.optim.safetensors  optimizer state (only the latest is kept: it is what resume needs)
      epoch-NNN.json               written last: the epoch is finished; loss, validation scores,
                                   param groups, the plateau schedule's state
      done.json                    the run is complete (last and best epoch); a rerun returns at once
      calibration.json             thresholds fit on the validation slice (stages.runs.calibrate)
      curves.png, tensorboard/     the training curves, redrawn after every epoch (stages.runs.curves)
      README.md                    the model card (stages.runs.card), written when the run finishes
      run-manifest.json            written last: every file's checksum (pipeline.runstore)
      failed.json                  only after `pipeline train` ended in an error (stages.runs.listing)

Model selection never looks at a test set: a seeded, label-stratified slice of the TRAIN split
(--val-fraction) is held out and scored after every epoch (AUC, AP, ACC@0.5, log loss). The best
epoch is the one of highest validation AUC (ties: lowest validation loss, then the latest epoch; an
epoch without an AUC is never chosen); EGRE's plateau schedule steps on that AUC; --patience epochs
without a new best end the run. No row of any cache's val split is read by training.

Selection only where it means something: a slice with fewer than --min-val-rows (50) rows of either
label judges epochs by noise (see configs.MIN_VAL_ROWS), so then the best epoch is the last one, and neither
early stopping nor the plateau schedule acts; the log and done.json ("selection") say so.

Every random number of epoch k (order, crops, flips, masks, dropout) comes from generators seeded
by (seed, k), so a run resumed after epoch k is bitwise equal to one never interrupted.
No pickle: weights and optimizer tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score
from tqdm import tqdm

from pipeline import config
from pipeline.code_versions import stage_code
from pipeline.config import loader_workers, resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from pipeline.storage import now
from stages import configs
from stages.configs import TrainConfig
from stages.detectors import backbone
from stages.detectors import method as method_registry
from stages.detectors.method import Hparams
from stages.features import sd
from stages.features.perturb_spec import requested
from stages.runs import batches, cachedata, calibrate, card, checkpoint, choice, curves, distributed, listing
from stages.runs.batches import EpochBatches, make_inputs
from stages.runs.checkpoint import (
    Run,
    atomic_json,
    build_model,
    load_epoch,
    predict,
    save_epoch,
)
from stages.runs.records import DoneRecord, MicroBatches, RunParams, Selection, ValScores

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

CODE_ID = "stages.train"  # the name its code is hashed under, wherever the file lives

VAL_BATCH = 64  # validation rows per model call (inference only; part of the code, not an option)


def hold_out(rows: cachedata.Rows, fraction: float, per_class_max: int | None, seed: int):
    """(rows left for training, validation rows): per label, round(fraction * n) rows drawn, seeded.

    n is the label's training-split rows, or --max-per-class when smaller: a LoL run of 1,600 + 1,600
    holds out 80 + 80 more rows of the train split and still trains on the paper's 1,600 + 1,600.
    At least one row of a label is held out and one left to train on; a label with fewer than two
    rows gives none (see validation_metrics).
    """
    rng = np.random.default_rng((seed, 1))  # its own stream: the training sample keeps `seed`'s
    val = []
    for label in (0, 1):
        idx = np.flatnonzero(rows.label == label)
        if len(idx) >= 2:
            k = min(len(idx) - 1, max(1, round(fraction * min(len(idx), per_class_max or len(idx)))))
            val.append(rng.choice(idx, size=k, replace=False))
    if not val:
        raise UserError(
            f"{len(rows)} training-split row(s): too few to hold out a validation slice and still train"
        )
    val_pos = np.sort(np.concatenate(val))
    keep = np.ones(len(rows), dtype=bool)
    keep[val_pos] = False
    return rows[keep], rows[val_pos]


def validation_metrics(labels: np.ndarray, scores: np.ndarray) -> ValScores:
    """What an epoch is judged by on the validation slice: AUC, AP, ACC at 0.5, log loss.

    A slice with one label only (a training set that lacks the other, e.g. the finished shards of an
    unfinished cache) has no AUC or AP (NaN): the best epoch is then the one of lowest loss."""
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        "acc": float(((scores > 0.5) == (labels == 1)).mean()),
        "loss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "n": len(labels),
    }


def best_epoch(history: Mapping[int, ValScores]) -> int | None:
    """The epoch of highest validation AUC; among equals, the lowest validation loss, then the latest
    (the most trained). An epoch without an AUC (NaN) is never chosen: None when no epoch has one."""
    scored = [e for e in history if not math.isnan(history[e]["auc"])]
    if not scored:
        return None
    return max(scored, key=lambda e: (history[e]["auc"], -history[e]["loss"], e))


def selection_rule(val_labels: np.ndarray, min_rows: int) -> str | None:
    """Why the validation slice cannot choose an epoch (None: it can).

    Too few rows of a label make the AUC noise (configs.MIN_VAL_ROWS): the run then keeps its last epoch,
    and neither --patience nor the plateau schedule acts on those scores."""
    counts = [int((val_labels == label).sum()) for label in (0, 1)]
    if min(counts) >= min_rows:
        return None
    return (
        f"validation slice of {counts[0]} real + {counts[1]} generated rows, fewer than --min-val-rows "
        f"{min_rows} per label: model selection is off (the best epoch is the last; no early stop, no "
        "plateau schedule)"
    )


def uninformative_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The shuffled-label control: within each true class, a random half is labelled 1, the rest 0.

    A plain permutation agrees with the true labels by chance more or less often (on 48 rows, 60%
    is common), which leaks some signal into the control; this assignment has none at all.
    """
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(labels)
    for c in labels.unique():
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        out[idx[: len(idx) // 2]] = 1
    return out


# ---- a run ------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & ((1 << 63) - 1)


def resolve_precision(precision: str, device: str) -> str:
    """The training precision on `device` (pipeline.config's rule: see configs.train_precision_help).
    Part of the fingerprint: a bf16 run's weights differ from an fp32 run's by more than the last bits."""
    offered, on_cuda = configs.TRAIN_PRECISIONS, configs.TRAIN_ON_CUDA
    return config.resolve_precision(precision, device, offered, on_cuda=on_cuda)


def training_code(method: str) -> str:
    """The version of the code that turns caches into a trained `method`: part of a run's key."""
    return stage_code(
        backbone,
        cachedata,  # which rows are read; which artifacts (stages.runs.choice) is in "caches"
        batches,
        *checkpoint.TRAINING,
        method_registry,
        method_registry.get(method).network_module(),
        sys.modules[__name__],
    )


def plan_run(cfg: TrainConfig, data: cachedata.CacheData) -> tuple[Path, RunParams]:
    hp = cfg.hparams({s.subset for s in data.sources})
    data.check_crop(hp["crop_size"])
    device = resolve_device(cfg.device)
    split = micro_batch_split(hp["batch_size"], cfg.micro_batches, device)
    identity = backbone.BackboneSpec(cfg.backbone, cfg.backbone_weights).identity()  # hashes a weight file
    aligned = data.aligned()
    params = {
        "stage": "train",
        "method": cfg.method,
        "hparams": hp,
        "backbone": {**identity, "arch": cfg.backbone, "spec_weights": cfg.backbone_weights},
        "caches": [s.identity() for s in data.sources],
        "lare": {"params": data.lare_params, "model": data.lare_model, "pixel_size": data.pixel_size},
        "pixels": data.pixel_params,  # how detection crops new images (window, small images)
        "lare_alignment": "aligned crop (--preprocess crop)" if aligned else "whole image (reference)",
        "seed": cfg.seed,
        "precision": resolve_precision(cfg.precision, device),
        "code": training_code(cfg.method),
    }
    if split is not None:  # one micro-batch (one process, the global batch whole): the key is absent
        params["micro_batches"] = split
    ident = {k: v for k, v in params.items() if k != "backbone"}
    ident["backbone"] = identity
    fp = fingerprint(ident)
    subsets = "+".join(sorted({s.subset for s in data.sources}))
    run = Path(cfg.out) / f"{cfg.method}-{subsets}-{fp[:12]}"
    world = distributed.world().size
    return run, cast(RunParams, {**params, "fingerprint": fp, "aligned": aligned, "world_size": world})


def micro_batch_split(batch_size: int, micro_batches: int, device: str) -> MicroBatches | None:
    """How a global batch is cut: into world size x micro_batches equal micro-batches (None: one).

    Part of the fingerprint, as it decides more than the last bits: BatchNorm normalises each
    micro-batch by its own statistics (on CUDA synchronised over the ranks) and dropout is drawn
    per micro-batch. The world size itself is not: 2 processes of 1 micro-batch are the run of one
    process accumulating 2 (the same fingerprint, resumable by either)."""
    ranks = distributed.world().size
    if micro_batches < 1:
        raise UserError(f"micro-batches must be at least 1, not {micro_batches}")
    parts = ranks * micro_batches
    if batch_size % parts:
        raise UserError(
            f"the global batch of {batch_size} rows (--batch-size) is not divisible by the {parts} "
            f"micro-batches of {ranks} process(es): each process trains on an equal slice of every batch"
        )
    if parts == 1:
        return None
    synced = ranks > 1 and device.startswith("cuda")
    return {"count": parts, "batchnorm": "synchronised over the ranks" if synced else "per micro-batch"}


def run_train(cfg: TrainConfig) -> Path:
    """`pipeline train`: returns the run directory; a finished run is not retrained.

    Reads top to bottom: the rows, the run directory, then `train_epochs` (per epoch `train_epoch`,
    `validate` and the epoch's record); `finish_run` writes done.json and the calibration."""
    device = distributed.init(resolve_device(cfg.device))  # under torchrun: this rank's
    main = distributed.world().main
    wanted = requested(cfg.perturb, cfg.perturb_only)
    picked = choice.Choice(cfg.lare, cfg.pixels, perturb=wanted)
    data = cachedata.CacheData(cfg.caches, verify=cfg.verify, split=cfg.split, choice=picked)
    run, params = distributed.agree(plan_run, cfg, data)
    method = method_registry.get(cfg.method)
    if method.reads_lare and (note := sd.random_weights_note(data.lare_model)):
        logger.info(f"note: {note}")
    if checkpoint.is_done(run):
        logger.info(f"up to date: {run}")
        return run
    hp = params["hparams"]
    if cfg.lr is None and hp["lr"] != method.defaults["lr"]:
        logger.info(
            f"lr {hp['lr']:g}: the {cfg.method} paper's rate for this training subset (--lr to override)"
        )
    rows, val_rows = training_rows(data, hp, cfg.seed)
    if no_selection := selection_rule(val_rows.label, hp["min_val_rows"]):
        logger.info(f"note: {no_selection}")
    feed = epoch_batches(cfg, data, rows, hp, device, progress=cfg.progress and main)
    params["model"] = method.model_args(hp, feed.lare_channels)  # what load_run builds from
    # Built before the run directory is written: a backbone that cannot be loaded leaves nothing behind.
    model = build_model(params).to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    sample = {
        "seed": cfg.seed, "n": len(rows), "caches": data.describe(rows),
        "val_fraction": hp["val_fraction"], "n_validation": len(val_rows),
        "validation": data.describe(val_rows),
    }  # fmt: skip
    distributed.agree(open_run_dir if main else lambda *a: None, run, params, sample)
    opt, sched = optimiser(model, hp, plateau=not no_selection)
    start, history = resume(run, model, opt, sched)  # every rank reads the run directory
    trained = Run(run, params, model, device)
    stopped = train_epochs(cfg, trained, opt, sched, feed, data, val_rows, start, history, no_selection)
    if stopped is not None:
        finish_run(trained, data, val_rows, history, stopped, no_selection)
    return run


def epoch_batches(
    cfg: TrainConfig,
    data: cachedata.CacheData,
    rows: cachedata.Rows,
    hp: Hparams,
    device: str,
    progress: bool,
) -> EpochBatches:
    """The training rows' batches, with their labels (uninformative ones for --shuffle-labels)."""
    labels = torch.from_numpy(rows.label)
    if hp["shuffle_labels"]:
        labels = uninformative_labels(labels, cfg.seed)
    workers = loader_workers(cfg.loader_workers, device, configs.READ_WORKERS)
    return EpochBatches(
        data, rows, labels, hp["batch_size"], hp["memory_rows"], progress, workers=workers, device=device
    )


def train_epochs(
    cfg: TrainConfig, trained: Run, opt, sched, feed: EpochBatches, data: cachedata.CacheData,
    val_rows: cachedata.Rows, start: int, history: dict[int, ValScores], no_selection: str | None,
) -> str | None:  # fmt: skip
    """The epochs after `start`, each trained, validated and recorded (`history` grows): why
    training stopped, or None when --stop-after stopped it as if interrupted."""
    run, model, device, hp = trained.path, trained.model, trained.device, trained.params["hparams"]
    main = distributed.world().main
    net = distributed.wrap(model, device)
    progress = cfg.progress and main
    stopped = f"--epochs {hp['epochs']} reached"
    for epoch in range(start + 1, hp["epochs"] + 1):
        best = None if no_selection else best_epoch(history)
        if hp["patience"] and best is not None and max(history) - best >= hp["patience"]:
            return f"no better validation score for {hp['patience']} epochs (--patience)"
        t0 = time.perf_counter()
        desc = f"{cfg.method} epoch {epoch}/{hp['epochs']}"
        loss, n = train_epoch(
            trained, net, opt, feed, epoch_seed(cfg.seed, epoch), desc, progress, cfg.micro_batches
        )
        history[epoch] = v = validate(trained, data, val_rows)
        if sched is not None and not math.isnan(v["auc"]):
            sched.step(v["auc"])
        info: dict[str, Any] = {"loss": loss, "seconds": round(time.perf_counter() - t0, 3), "rows": n}
        info.update(val=v, scheduler=sched.state_dict() if sched is not None else None)
        if main:
            save_epoch(run, epoch, model, opt, info)
        best = epoch if no_selection else best_epoch(history)
        logger.info(
            f"epoch {epoch}: loss {loss:.4f}, validation AUC {v['auc']:.4f} AP {v['ap']:.4f} "
            f"ACC {v['acc']:.4f} ({'last epoch kept' if no_selection else f'best epoch {best}'})"
        )
        if main:  # TensorBoard events and curves.png, from the records
            curves.update(run, best)
        if cfg.stop_after is not None and epoch >= cfg.stop_after and epoch < hp["epochs"]:
            logger.info(f"stopped after epoch {epoch} (--stop-after); rerun to resume")
            return None
    return stopped


def training_rows(data: cachedata.CacheData, hp: Hparams, seed: int) -> tuple[cachedata.Rows, cachedata.Rows]:
    """(training sample, validation slice), both from the train split (`--split`; of `--generators`
    and their reals): test splits stay unseen."""
    split = hp.get("split", "train")
    pool = data.rows(split, hp["real_jpeg_quality"], hp.get("generators"))
    if len(pool) == 0 or (hp["real_jpeg_quality"] is not None and not (pool.label == 0).any()):
        which = f"real rows of JPEG quality {hp['real_jpeg_quality']}" if len(pool) else "rows"
        raise UserError(f"no usable training {which} (split '{split}') in the given cache(s)")
    rest, val_rows = hold_out(pool, hp["val_fraction"], hp["max_per_class"], seed)
    return data.sample(rest, hp["max_per_class"], seed), val_rows


def open_run_dir(run: Path, params: RunParams, sample: dict) -> None:
    """Create the run directory, or check that the one there holds this run; params.json and
    sample.json are written once (a resumed run keeps its own)."""
    run.mkdir(parents=True, exist_ok=True)
    if checkpoint.is_run(run):
        old = checkpoint.read_params(run)
        if old["fingerprint"] != params["fingerprint"]:
            raise UserError(f"{run} holds another run (fingerprint {old['fingerprint'][:12]})")
    else:
        atomic_json(run / checkpoint.PARAMS, {**params, "created_at": now()})
    if not (run / checkpoint.SAMPLE).is_file():
        atomic_json(run / checkpoint.SAMPLE, sample)
    listing.started(run)  # `pipeline runs` tells a failed run from a stopped one


def optimiser(model: torch.nn.Module, hp: Hparams, plateau: bool):
    """(Adam, the method's plateau schedule on validation AUC or None). `plateau` False: the slice
    cannot choose epochs (selection_rule), so no schedule steps on its scores."""
    beta1, beta2 = hp["betas"]  # a JSON list
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=(beta1, beta2))
    p = hp["plateau"]
    if not (p and plateau):
        return opt, None
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=p["mode"], factor=p["factor"], patience=p["patience"], min_lr=p["min_lr"]
    )
    return opt, sched


def resume(run: Path, model: torch.nn.Module, opt, sched) -> tuple[int, dict[int, ValScores]]:
    """(last finished epoch, validation history): the model, optimizer and schedule are restored to
    the end of that epoch (0 and an empty history for a new run)."""
    records = checkpoint.epoch_records(run)
    start = max(records, default=0)
    history = {e: record["val"] for e, record in records.items()}
    if start:
        load_epoch(run, start, model, opt)
        if sched is not None:
            sched.load_state_dict(records[start]["scheduler"])
        logger.info(f"resuming {run.name} after epoch {start}")
    return start, history


def micro_seed(seed: int, step: int, k: int) -> int:
    """The seed of the dropout of micro-batch k of batch `step` of the epoch of `seed`: keyed by the
    micro-batch, so a rank draws what one process accumulating the same micro-batches draws."""
    return int(np.random.SeedSequence([seed, step, k]).generate_state(1, np.uint64)[0] >> 1)


def train_epoch(
    trained: Run, net: torch.nn.Module, opt, feed: EpochBatches, seed: int, desc: str, progress: bool,
    micro_batches: int = 1,
) -> tuple[float, int]:  # fmt: skip
    """One pass over the training rows, every random number (order, crops, flips, masks, dropout)
    drawn from generators seeded by `seed`: (mean loss, rows trained).

    Every rank draws every global batch (and its crops, flips and masks) as one process does; each
    global batch is cut into world size x `micro_batches` micro-batches, rank r trains on its
    `micro_batches` of them (gradients accumulated, then averaged over the ranks by `net`, the
    DistributedDataParallel module). So the step is that of one process accumulating all of them:
    the mean of the micro-batches' mean losses. BatchNorm normalises each micro-batch by its own
    statistics (synchronised over the ranks on CUDA); its running statistics are micro-batch 0's."""
    model, params, device = trained.model, trained.params, trained.device
    hp = params["hparams"]
    w = distributed.world()
    parts = w.size * micro_batches
    mine = range(w.rank * micro_batches, (w.rank + 1) * micro_batches)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    # Summed on the device in float64 (the same bits as Python floats): reading the loss back
    # every step would make the host wait for the GPU instead of preparing the next batch.
    total = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=len(feed.rows), desc=desc, disable=not progress)
    n = 0
    for step, (_, crops, maps, y) in enumerate(feed.epoch(gen)):  # on the device already
        if len(y) < 2 * parts:  # BatchNorm cannot train on one sample: an epoch's last rows
            continue  # too few for two per micro-batch wait for the next epoch's order
        x, m = make_inputs(trained.method, hp, crops, maps, True, gen, params["aligned"])
        if device.startswith("cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        cut = distributed.micro_slices(len(y), parts)
        for k in mine:
            torch.manual_seed(micro_seed(seed, step, k))  # dropout
            ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
            accumulate = ddp.no_sync() if ddp is not None and k != mine[-1] else contextlib.nullcontext()
            bf16 = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=params["precision"] == "bf16")
            with accumulate, distributed.keep_statistics(model, k != 0):
                with bf16:
                    loss = model.loss(net(x[cut[k]], m[cut[k]]), y[cut[k]])
                (loss / micro_batches).backward()
            total += loss.detach().double() * len(y[cut[k]])
        if hp["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        n += len(y)
        bar.update(len(y))
    bar.close()
    distributed.same_buffers(model)  # rank 0's running statistics, for validation on every rank
    return float(distributed.total(total)) / n, n


def validate(trained: Run, data: cachedata.CacheData, val_rows: cachedata.Rows) -> ValScores:
    """The validation slice scored by the model as it stands (left in eval mode): see validation_metrics."""
    trained.model.eval()
    scores = predict(trained, data, val_rows, VAL_BATCH, progress=False)
    return validation_metrics(val_rows.label, scores)


def finish_run(
    trained: Run, data: cachedata.CacheData, val_rows: cachedata.Rows, history: dict[int, ValScores],
    stopped: str, no_selection: str | None,
) -> None:  # fmt: skip
    """done.json (last and best epoch, why it stopped, how the best was chosen), then the calibration
    of the best epoch on the validation slice (derived from the weights, not part of the fingerprint)."""
    last = max(history)
    chosen = None if no_selection else best_epoch(history)
    selection: Selection
    if chosen is None:  # no selection; else both labels are in the slice: every epoch has an AUC
        best, selection = last, {"by": "last", "why": str(no_selection)}
        kept = f"best epoch = last epoch {last} (model selection off, see the note above)"  # the why: once
        logger.info(f"done after epoch {last}: {stopped}; {kept}")
    else:
        best, selection = chosen, {"by": "validation AUC"}
        auc = history[best]["auc"]
        logger.info(f"done after epoch {last}: {stopped}; best epoch {best} (validation AUC {auc:.4f})")
    done: DoneRecord = {
        "epochs": last, "best": best, "best_val": history[best], "stopped": stopped, "selection": selection,
        "final": checkpoint.weights_file(last),
    }  # fmt: skip
    # then every rank scores the best epoch, which rank 0 calibrates
    write = atomic_json if distributed.world().main else lambda *a: None
    distributed.agree(write, trained.path / checkpoint.DONE, done)
    calibrate.record(trained, data, val_rows, VAL_BATCH)
    if distributed.world().main:  # README.md, then the run manifest (written last)
        card.publish(trained.path)
