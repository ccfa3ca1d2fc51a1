"""Training a detector (EGRE or LoL) from caches: a run directory named by its fingerprint.

    <out>/<method>-<subsets>-<fp12>/
      params.json                  everything that decides the weights (and the fingerprint)
      sample.json                  the training rows chosen (cache, row, content id, path, label)
      epoch-NNN.safetensors        model weights after epoch NNN (every epoch is kept)
      epoch-NNN.optim.safetensors  optimizer state (only the latest is kept: it is what resume needs)
      epoch-NNN.json               written last: the epoch is finished; loss, param groups
      done.json                    the run is complete; a rerun returns at once

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
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import code_version, fingerprint
from stages import backbone, cachedata, egre, lol

METHODS = {"egre": egre, "lol": lol}
LARE_GRID = 8  # pixels per LaRE cell (the VAE's downsampling)


@dataclass
class TrainConfig:
    caches: list[str]
    method: str = "egre"
    out: str = "runs"
    max_per_class: int | None = None
    seed: int = 0
    epochs: int | None = None  # None: the method's default (see egre.DEFAULTS, lol.DEFAULTS)
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
    perturb: str | None = None  # train on the artifacts extracted with this --perturb SPEC (None: clean)
    perturb_only: str | None = None  # ... and this --perturb-only class
    real_jpeg_quality: int | None = None  # real rows of this JPEG quality only (the JPEG-96 control)

    def hparams(self) -> dict[str, Any]:
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, not '{self.method}'")
        for name in ("epochs", "batch_size", "lr", "max_per_class"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, not {value}")
        d = METHODS[self.method].DEFAULTS
        hp = {
            "epochs": self.epochs or d["epochs"],
            "batch_size": self.batch_size or d["batch_size"],
            "lr": self.lr or d["lr"],
            "betas": list(d["betas"]),
            "grad_clip": d["grad_clip"],
            "crop_size": self.crop_size,
            "max_per_class": self.max_per_class,
            "shuffle_labels": self.shuffle_labels,
            "memory_rows": self.memory_rows,
            "real_jpeg_quality": self.real_jpeg_quality,
        }
        if self.real_jpeg_quality is not None and not 1 <= self.real_jpeg_quality <= 100:
            raise UserError(f"--real-jpeg-quality must be in 1..100, not {self.real_jpeg_quality}")
        if self.method == "lol":
            hp.update(mask_range=list(self.mask_range), aspect_range=list(self.aspect_range))
        if self.crop_size % 32:
            raise UserError(
                f"--crop-size must be a multiple of 32 (the ResNet's stride), not {self.crop_size}"
            )
        return hp


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


# ---- a run ------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & ((1 << 63) - 1)


def plan_run(cfg: TrainConfig, data: cachedata.CacheData) -> tuple[Path, dict]:
    hp = cfg.hparams()
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
    wanted = cachedata.wanted_perturbation(cfg.perturb, cfg.perturb_only)
    data = cachedata.CacheData(cfg.caches, verify=cfg.verify, perturb=wanted)
    run, params = plan_run(cfg, data)
    if (run / "done.json").is_file():
        log(f"up to date: {run}")
        return run
    hp = params["hparams"]
    rows = data.sample(data.rows("train", hp["real_jpeg_quality"]), hp["max_per_class"], cfg.seed, log)
    if len(rows) == 0 or (hp["real_jpeg_quality"] is not None and not (rows.label == 0).any()):
        which = f"real rows of JPEG quality {hp['real_jpeg_quality']}" if len(rows) else "rows"
        raise UserError(f"no usable training {which} (split 'train') in the given cache(s)")
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
        atomic_json(run / "sample.json", {"seed": cfg.seed, "n": len(rows), "caches": data.describe(rows)})
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], betas=tuple(hp["betas"]))
    done = finished_epochs(run)
    start = done[-1] if done else 0
    if start:
        load_epoch(run, start, model, opt)
        log(f"resuming {run.name} after epoch {start}")
    n = len(rows)
    for epoch in range(start + 1, hp["epochs"] + 1):
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
        info = {"loss": float(total) / n, "seconds": round(time.perf_counter() - t0, 3), "rows": n}
        save_epoch(run, epoch, model, opt, info)
        log(f"epoch {epoch}: loss {info['loss']:.4f}")
        if cfg.stop_after is not None and epoch >= cfg.stop_after and epoch < hp["epochs"]:
            log(f"stopped after epoch {epoch} (--stop-after); rerun to resume")
            return run
    atomic_json(run / "done.json", {"epochs": hp["epochs"], "final": f"epoch-{hp['epochs']:03d}.safetensors"})
    return run


@dataclass
class Run:
    """A finished run, loaded for evaluation or detection."""

    path: Path
    params: dict
    model: torch.nn.Module
    device: str = "cpu"

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


def load_run(path: str | Path, device: str = "cpu") -> Run:
    run = Path(path)
    if not (run / "params.json").is_file():
        raise UserError(f"{run} is not a run directory (no params.json)")
    done = run / "done.json"
    if not done.is_file():
        raise UserError(
            f"{run} has not finished training (no done.json): rerun `pipeline train` to resume it"
        )
    params = json.loads((run / "params.json").read_text())
    epochs = json.loads(done.read_text())["epochs"]
    first = load_file(str(run / f"epoch-{epochs:03d}.safetensors"))
    channels = first["to_heads.weight"].shape[1] if "to_heads.weight" in first else 0  # LoL: unused
    model = build_model(params["method"], params, channels, pretrained=False)
    model.load_state_dict(first)
    model.to(device).eval()
    return Run(run, params, model, device)
