"""Training a detector (EGRE or LoL) from caches: a run directory named by its fingerprint.

    <out>/<method>-<subsets>-<fp12>/
      params.json                  everything that decides the weights (and the fingerprint)
      sample.json                  the training and validation rows (cache, row, content id, path, label)
      epoch-NNN.safetensors        model weights after epoch NNN (every epoch is kept)
      epoch-NNN.optim.safetensors  optimizer state (only the latest is kept: it is what resume needs)
      epoch-NNN.json               written last: the epoch is finished; loss, validation scores,
                                   param groups, the plateau schedule's state
      done.json                    the run is complete (last and best epoch); a rerun returns at once

Model selection never looks at a test set: a seeded, label-stratified slice of the TRAIN split
(--val-fraction) is held out and scored after every epoch (AUC, AP, ACC@0.5, log loss). The best
epoch is the one of highest validation AUC (ties: lowest validation loss); EGRE's plateau schedule
steps on that AUC; --patience epochs without a new best end the run. No row of any cache's val
split is read by training.

Every random number of epoch k (order, crops, flips, masks, dropout) comes from generators seeded
by (seed, k), so a run resumed after epoch k is bitwise equal to one never interrupted.
No pickle: weights and optimizer tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import code_version, fingerprint
from stages import backbone, cachedata, egre, lol

METHODS = {"egre": egre, "lol": lol}
LARE_GRID = 8  # pixels per LaRE cell (the VAE's downsampling)
VAL_BATCH = 64  # validation rows per model call (inference only; part of the code, not an option)


@dataclass
class TrainConfig:
    caches: list[str]
    method: str = "egre"
    out: str = "runs"
    max_per_class: int | str | None = None  # None: the method's default; 'all': every training row
    seed: int = 0
    epochs: int | None = None  # None: the method's default (see egre.DEFAULTS, lol.DEFAULTS)
    patience: int | None = None  # epochs without a new best before stopping; 0: never; None: default
    val_fraction: float = 0.05  # of the training rows, per label, held out from the train split
    batch_size: int | None = None
    lr: float | None = None
    crop_size: int = 224
    backbone: str = "RN50"
    backbone_weights: str = "openai"  # 'openai', 'random', or a local open_clip checkpoint file
    mask_range: tuple[float, float] = lol.MASK_RANGE
    aspect_range: tuple[float, float] = lol.ASPECT_RANGE
    shuffle_labels: bool = False  # a control: uninformative labels (see uninformative_labels)
    verify: bool = True
    progress: bool = True
    device: str = "auto"  # where the model trains; not in the fingerprint (last bits only, like batch order)
    stop_after: int | None = None  # stop after this epoch as if interrupted (tests); not in the fingerprint
    memory_rows: int = 16384  # up to this many training rows are held in memory; more are streamed

    def hparams(self, subsets: set[str]) -> dict[str, Any]:
        """The hyper-parameters of a run on caches of `subsets`: the options, else the method's defaults."""
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{self.method}'")
        for name in ("epochs", "batch_size", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, not {value}")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"--patience must be 0 (never stop early) or more, not {self.patience}")
        if not 0 < self.val_fraction < 1:
            raise UserError(
                f"--val-fraction must lie strictly between 0 and 1 (a validation slice and training rows "
                f"are both needed), not {self.val_fraction}"
            )
        d = METHODS[self.method].DEFAULTS
        (only,) = subsets if len(subsets) == 1 else (None,)
        hp = {
            "epochs": self.epochs or d["epochs"],
            "patience": d["patience"] if self.patience is None else self.patience,
            "batch_size": self.batch_size or d["batch_size"],
            "lr": self.lr or d.get("lr_by_subset", {}).get(only, d["lr"]),
            "betas": list(d["betas"]),
            "grad_clip": d["grad_clip"],
            "plateau": d["plateau"],
            "val_fraction": self.val_fraction,
            "crop_size": self.crop_size,
            "max_per_class": per_class(self.max_per_class, d["max_per_class"]),
            "shuffle_labels": self.shuffle_labels,
            "memory_rows": self.memory_rows,
        }
        if self.method == "lol":
            hp.update(mask_range=list(self.mask_range), aspect_range=list(self.aspect_range))
        if self.crop_size % 32:
            raise UserError(
                f"--crop-size must be a multiple of 32 (the ResNet's stride), not {self.crop_size}"
            )
        return hp


def per_class(value: int | str | None, default: int | None) -> int | None:
    """--max-per-class: a positive number, 'all' (None: every row), or None for the method's default."""
    if value is None:
        return default
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--max-per-class takes a positive number or 'all', not '{value}'") from None
    if n <= 0:
        raise UserError(f"--max-per-class must be positive (or 'all'), not {value}")
    return n


# ---- the batch each method sees --------------------------------------------------------------
def crop_offsets(
    n: int, size: int, crop: int, train: bool, gen: torch.Generator | None, grid: int
) -> torch.Tensor:
    """(n, 2) top-left corners of `crop` windows in `size` images: random on the grid, or centred."""
    if not train:
        return torch.full((n, 2), (size - crop) // 2 // grid * grid)
    steps = (size - crop) // grid + 1
    return torch.randint(0, steps, (n, 2), generator=gen) * grid


def make_inputs(
    method: str,
    hp: dict,
    crops: torch.Tensor,
    maps: torch.Tensor,
    train: bool,
    gen: torch.Generator | None,
    aligned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised images, LaRE maps) for one batch: crop (the map with the same window when aligned),
    and for LoL in training flip, rotation and the rectangle mask."""
    c = hp["crop_size"]
    grid = LARE_GRID if aligned else 1
    off = crop_offsets(len(crops), crops.shape[-1], c, train, gen, grid)
    images = torch.stack([x[:, t : t + c, s : s + c] for x, (t, s) in zip(crops, off.tolist(), strict=True)])
    if aligned and method == "egre":
        cc = c // LARE_GRID
        maps = torch.stack(
            [m[:, t // LARE_GRID : t // LARE_GRID + cc, s // LARE_GRID : s // LARE_GRID + cc]
             for m, (t, s) in zip(maps, off.tolist(), strict=True)]
        )  # fmt: skip
    if method == "egre":
        return egre.normalise(images), maps
    if train:
        images = lol.augment(images, gen)
    x = lol.normalise(images)
    if train:
        masks = lol.draw_masks(len(x), c, c, gen, tuple(hp["mask_range"]), tuple(hp["aspect_range"]))
        x = x.masked_fill(masks[:, None], 0.0)
    return x, maps


def build_model(method: str, params: dict, lare_channels: int, pretrained: bool = True) -> torch.nn.Module:
    """The network of a run, initialised from its seed and (pretrained) the backbone weights of its spec.

    pretrained=False builds the architecture only, for loading a checkpoint that holds every weight:
    evaluation and detection need neither the download nor the original weight file.
    """
    weights = params["backbone"]["spec_weights"] if pretrained else "random"
    spec = backbone.BackboneSpec(params["backbone"]["arch"], weights)
    c = params["hparams"]["crop_size"]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.CRITICAL)  # open_clip logs random weights, failed downloads
    try:
        visual = backbone.load_visual(spec, c, seed=params["seed"])
    finally:
        logging.getLogger().setLevel(level)
    torch.manual_seed(params["seed"])
    if method == "egre":
        return egre.EGRE(visual, lare_channels, grid=c // 16)
    return lol.LoL(visual)


# ---- checkpoints --------------------------------------------------------------------------------
def atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_epoch(run: Path, epoch: int, model, opt, info: dict) -> None:
    _atomic_safetensors(run / f"epoch-{epoch:03d}.safetensors", model.state_dict())
    state = opt.state_dict()
    tensors = {f"{pid}.{k}": v for pid, s in state["state"].items() for k, v in s.items()}
    _atomic_safetensors(run / f"epoch-{epoch:03d}.optim.safetensors", tensors)
    atomic_json(
        run / f"epoch-{epoch:03d}.json", {**info, "epoch": epoch, "param_groups": state["param_groups"]}
    )
    for old in run.glob("epoch-*.optim.safetensors"):
        if old.name != f"epoch-{epoch:03d}.optim.safetensors":
            old.unlink()


def finished_epochs(run: Path) -> list[int]:
    """Epochs whose record (written last) and weights exist."""
    out = []
    for p in run.glob("epoch-*.json"):
        m = re.fullmatch(r"epoch-(\d{3})\.json", p.name)
        if m and (run / f"epoch-{m.group(1)}.safetensors").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def load_epoch(run: Path, epoch: int, model, opt=None) -> None:
    model.load_state_dict(load_file(str(run / f"epoch-{epoch:03d}.safetensors")))
    if opt is None:
        return
    info = json.loads((run / f"epoch-{epoch:03d}.json").read_text())
    flat = load_file(str(run / f"epoch-{epoch:03d}.optim.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def hold_out(rows: cachedata.Rows, fraction: float, per_class_max: int | None, seed: int):
    """(rows left for training, validation rows): per label, round(fraction * n) rows drawn, seeded.

    n is the label's training-split rows, or --max-per-class when smaller: a LoL run of 1,600 + 1,600
    holds out 80 + 80 more rows of the train split and still trains on the paper's 1,600 + 1,600.
    """
    rng = np.random.default_rng((seed, 1))  # its own stream: the training sample keeps `seed`'s
    val = []
    for label in (0, 1):
        idx = np.flatnonzero(rows.label == label)
        k = max(1, round(fraction * min(len(idx), per_class_max or len(idx))))
        if len(idx) <= k:
            raise UserError(
                f"{len(idx)} training-split row(s) of label {label}: too few to hold out a validation slice "
                f"(--val-fraction {fraction}) and still train"
            )
        val.append(rng.choice(idx, size=k, replace=False))
    val_pos = np.sort(np.concatenate(val))
    keep = np.ones(len(rows), dtype=bool)
    keep[val_pos] = False
    return rows[keep], rows[val_pos]


def validation_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """What an epoch is judged by on the validation slice: AUC, AP, ACC at 0.5, log loss."""
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "acc": float(((scores > 0.5) == (labels == 1)).mean()),
        "loss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "n": len(labels),
    }


def best_epoch(history: dict[int, dict]) -> int:
    """The epoch of highest validation AUC; among equals, the lowest validation loss, then the earliest."""
    return max(history, key=lambda e: (history[e]["auc"], -history[e]["loss"], -e))


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


class EpochBatches:
    """The training batches of an epoch, in an order drawn from the epoch's generator.

    Up to `memory_rows` rows are read once and kept in memory (a random permutation per epoch).
    More are streamed: the rows' shards are visited in a random order, about `memory_rows` rows'
    worth at a time are read (whole chunks) and shuffled together; the remainder that does not fill
    a batch is carried into the next buffer, so every batch but the epoch's last is full.
    """

    def __init__(self, data, rows, labels: torch.Tensor, batch_size: int, memory_rows: int, progress: bool):
        self.data, self.rows, self.labels, self.bs = data, rows, labels, batch_size
        self.memory_rows = memory_rows
        self.stream = len(rows) > memory_rows
        if self.stream:
            shard_rows = np.array([int(s.pixels_attrs["rows_per_shard"]) for s in data.sources])
            key = rows.source.astype(np.int64) * (1 << 40) + rows.row // shard_rows[rows.source]
            order = np.argsort(key, kind="stable")
            starts = np.unique(key[order], return_index=True)[1]
            self.blocks = np.split(order, starts[1:])
            self.lare_channels = int(data.stores[0].group[f"{data.sources[0].lare}/maps"].shape[1])
        else:
            crops, maps = data.load(rows, progress=progress)
            self.crops, self.maps = torch.from_numpy(crops), torch.from_numpy(maps)
            self.lare_channels = self.maps.shape[1]

    def _read(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        crops, maps = self.data.load(self.rows[pos], progress=False)
        return torch.from_numpy(crops), torch.from_numpy(maps)

    def epoch(self, gen: torch.Generator):
        """Yields (row positions, crops uint8, maps, labels) per batch; every row exactly once."""
        if not self.stream:
            order = torch.randperm(len(self.rows), generator=gen)
            for b in range(0, len(order), self.bs):
                idx = order[b : b + self.bs]
                yield idx.numpy(), self.crops[idx], self.maps[idx], self.labels[idx]
            return
        carry = (np.zeros(0, dtype=np.int64), None, None)
        pending: list[np.ndarray] = []
        block_order = torch.randperm(len(self.blocks), generator=gen).tolist()
        for i, k in enumerate(block_order):
            pending.append(self.blocks[k])
            if sum(map(len, pending)) < self.memory_rows and i < len(block_order) - 1:
                continue
            pos = np.concatenate(pending)
            pending = []
            crops, maps = self._read(pos)
            if len(carry[0]):
                pos = np.concatenate([carry[0], pos])
                crops, maps = torch.cat([carry[1], crops]), torch.cat([carry[2], maps])
            perm = torch.randperm(len(pos), generator=gen)
            last = i == len(block_order) - 1
            full = len(pos) if last else len(pos) // self.bs * self.bs
            for b in range(0, full, self.bs):
                idx = perm[b : min(b + self.bs, full)]
                sel = pos[idx.numpy()]
                yield sel, crops[idx], maps[idx], self.labels[torch.from_numpy(sel)]
            rest = perm[full:]
            carry = (pos[rest.numpy()], crops[rest], maps[rest])


@torch.inference_mode()
def predict(
    run: Run, data: cachedata.CacheData, rows: cachedata.Rows, batch_size: int, progress: bool
) -> np.ndarray:
    """Scores of the rows, read from the cache a block of rows at a time (memory stays bounded)."""
    hp = run.params["hparams"]
    aligned = run.params["aligned"]
    scores = []
    block = max(batch_size, 1024)
    bar = tqdm(total=len(rows), desc=f"eval {run.name}", unit="img", disable=not progress)
    for b0 in range(0, len(rows), block):
        part = rows[b0 : b0 + block]
        crops, maps = (torch.from_numpy(a) for a in data.load(part, progress=False))
        for i in range(0, len(part), batch_size):
            x, m = make_inputs(
                run.method, hp, crops[i : i + batch_size], maps[i : i + batch_size], False, None, aligned
            )
            scores.append(run.scores(x, m).numpy())
            bar.update(len(x))
    bar.close()
    return np.concatenate(scores) if scores else np.zeros(0)


# ---- a run ------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & ((1 << 63) - 1)


def plan_run(cfg: TrainConfig, data: cachedata.CacheData) -> tuple[Path, dict]:
    hp = cfg.hparams({s.subset for s in data.sources})
    data.check_crop(hp["crop_size"])
    identity = backbone.BackboneSpec(cfg.backbone, cfg.backbone_weights).identity()  # hashes a weight file
    aligned = data.aligned()
    params = {
        "stage": "train",
        "method": cfg.method,
        "hparams": hp,
        "backbone": {**identity, "arch": cfg.backbone, "spec_weights": cfg.backbone_weights},
        "caches": [s.identity() for s in data.sources],
        "lare": {"params": data.lare_params, "model": data.lare_model, "pixel_size": data.pixel_size},
        "lare_alignment": "aligned crop (--preprocess crop)" if aligned else "whole image (reference)",
        "seed": cfg.seed,
        "code": code_version(backbone, cachedata, egre, lol, sys.modules[__name__]),
    }
    ident = {k: v for k, v in params.items() if k != "backbone"}
    ident["backbone"] = identity
    fp = fingerprint(ident)
    subsets = "+".join(sorted({s.subset for s in data.sources}))
    run = Path(cfg.out) / f"{cfg.method}-{subsets}-{fp[:12]}"
    return run, {**params, "fingerprint": fp, "aligned": aligned}


def run_train(cfg: TrainConfig, log=print) -> Path:
    """`pipeline train`: returns the run directory; a finished run is not retrained."""
    data = cachedata.CacheData(cfg.caches, verify=cfg.verify)
    run, params = plan_run(cfg, data)
    if (run / "done.json").is_file():
        log(f"up to date: {run}")
        return run
    hp = params["hparams"]
    default = METHODS[cfg.method].DEFAULTS
    if cfg.lr is None and hp["lr"] != default["lr"]:
        log(f"lr {hp['lr']:g}: the {cfg.method} paper's rate for this training subset (--lr to override)")
    pool = data.rows("train")  # the only split training reads: test (val) splits stay unseen
    if len(pool) == 0:
        raise UserError("no usable training rows (split 'train') in the given cache(s)")
    rest, val_rows = hold_out(pool, hp["val_fraction"], hp["max_per_class"], cfg.seed)
    rows = data.sample(rest, hp["max_per_class"], cfg.seed, log)
    labels = torch.from_numpy(rows.label)
    if hp["shuffle_labels"]:
        labels = uninformative_labels(labels, cfg.seed)
    batches = EpochBatches(data, rows, labels, hp["batch_size"], hp["memory_rows"], cfg.progress)
    device = resolve_device(cfg.device)
    # Built before the run directory is written: a backbone that cannot be loaded leaves nothing behind.
    model = build_model(cfg.method, params, batches.lare_channels).to(device)
    run.mkdir(parents=True, exist_ok=True)
    if (run / "params.json").is_file():
        old = json.loads((run / "params.json").read_text())
        if old["fingerprint"] != params["fingerprint"]:
            raise UserError(f"{run} holds another run (fingerprint {old['fingerprint'][:12]})")
    else:
        atomic_json(
            run / "params.json", {**params, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
    if not (run / "sample.json").is_file():
        atomic_json(
            run / "sample.json",
            {
                "seed": cfg.seed, "n": len(rows), "caches": data.describe(rows),
                "val_fraction": hp["val_fraction"], "n_validation": len(val_rows),
                "validation": data.describe(val_rows),
            },
        )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]))
    plateau = hp["plateau"]
    sched = None
    if plateau:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=plateau["mode"], factor=plateau["factor"], patience=plateau["patience"],
            min_lr=plateau["min_lr"],
        )  # fmt: skip
    done = finished_epochs(run)
    start = done[-1] if done else 0
    history = {e: json.loads((run / f"epoch-{e:03d}.json").read_text())["val"] for e in done}
    if start:
        load_epoch(run, start, model, opt)
        if sched is not None:
            sched.load_state_dict(json.loads((run / f"epoch-{start:03d}.json").read_text())["scheduler"])
        log(f"resuming {run.name} after epoch {start}")
    n = len(rows)
    stopped = f"--epochs {hp['epochs']} reached"
    for epoch in range(start + 1, hp["epochs"] + 1):
        if hp["patience"] and history and max(history) - best_epoch(history) >= hp["patience"]:
            stopped = f"no better validation score for {hp['patience']} epochs (--patience)"
            break
        seed = epoch_seed(cfg.seed, epoch)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        model.train()
        # Summed on the device in float64 (the same bits as Python floats): reading the loss back
        # every step would make the host wait for the GPU instead of preparing the next batch.
        total, t0 = torch.zeros((), dtype=torch.float64, device=device), time.perf_counter()
        bar = tqdm(total=n, desc=f"{cfg.method} epoch {epoch}/{hp['epochs']}", disable=not cfg.progress)
        for _, crops, maps, y in batches.epoch(gen):
            x, m = make_inputs(cfg.method, hp, crops, maps, True, gen, params["aligned"])
            loss = model.loss(model(x.to(device), m.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
            opt.step()
            total += loss.detach().double() * len(y)
            bar.update(len(y))
        bar.close()
        model.eval()
        scores = predict(Run(run, params, model, device), data, val_rows, VAL_BATCH, progress=False)
        history[epoch] = validation_metrics(val_rows.label, scores)
        if sched is not None:
            sched.step(history[epoch]["auc"])
        info = {"loss": float(total) / n, "seconds": round(time.perf_counter() - t0, 3), "rows": n}
        info.update(val=history[epoch], scheduler=sched.state_dict() if sched is not None else None)
        save_epoch(run, epoch, model, opt, info)
        best = best_epoch(history)
        v = history[epoch]
        log(
            f"epoch {epoch}: loss {info['loss']:.4f}, validation AUC {v['auc']:.4f} AP {v['ap']:.4f} "
            f"ACC {v['acc']:.4f} (best epoch {best})"
        )
        if cfg.stop_after is not None and epoch >= cfg.stop_after and epoch < hp["epochs"]:
            log(f"stopped after epoch {epoch} (--stop-after); rerun to resume")
            return run
    last, best = max(history), best_epoch(history)
    log(f"done after epoch {last}: {stopped}; best epoch {best} (validation AUC {history[best]['auc']:.4f})")
    atomic_json(
        run / "done.json",
        {"epochs": last, "best": best, "best_val": history[best], "stopped": stopped,
         "final": f"epoch-{last:03d}.safetensors"},
    )  # fmt: skip
    return run


@dataclass
class Run:
    """A finished run, loaded for evaluation or detection."""

    path: Path
    params: dict
    model: torch.nn.Module
    device: str = "cpu"
    epoch: int = 0  # whose weights the model holds

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

    @property
    def method(self) -> str:
        return self.params["method"]


EPOCH_CHOICES = "best, last or an epoch number"


def select_epochs(path: str | Path, choice: str | int = "best", several: bool = False) -> list[int]:
    """The epochs `--epoch` names in a finished run: best (by validation), last, N, or (`several`) last5."""
    run = Path(path)
    if not (run / "params.json").is_file():
        raise UserError(f"{run} is not a run directory (no params.json)")
    done = run / "done.json"
    if not done.is_file():
        raise UserError(
            f"{run} has not finished training (no done.json): rerun `pipeline train` to resume it"
        )
    record = json.loads(done.read_text())
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
    params = json.loads((run / "params.json").read_text())
    weights = load_file(str(run / f"epoch-{chosen:03d}.safetensors"))
    channels = weights["to_heads.weight"].shape[1] if "to_heads.weight" in weights else 0  # LoL: unused
    model = build_model(params["method"], params, channels, pretrained=False)
    model.load_state_dict(weights)
    model.to(device).eval()
    return Run(run, params, model, device, chosen)
