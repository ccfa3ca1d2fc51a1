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

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import code_version, fingerprint
from stages import backbone, batches, cachedata, egre, lol, sd
from stages.batches import EpochBatches, default_loader_workers, make_inputs

METHODS = {"egre": egre, "lol": lol}


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
    loader_workers: int = -1  # cache-reading processes; -1: none on CPU, some on GPU. Changes no bit.
    precision: str = "auto"  # fp32, or bf16 autocast (CUDA); auto: bf16 on CUDA, fp32 elsewhere
    lare: str | None = None  # --lare / --pixels: which artifact of each cache (see cachedata.Choice)
    pixels: str | None = None
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
        if self.loader_workers < -1:
            raise UserError(
                f"--loader-workers must be -1 (automatic) or at least 0, not {self.loader_workers}"
            )
        if self.crop_size % 32:
            raise UserError(
                f"--crop-size must be a multiple of 32 (the ResNet's stride), not {self.crop_size}"
            )
        return hp


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


# ---- a run ------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & ((1 << 63) - 1)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str) -> str:
    """bf16 autocast on CUDA by default (tensor cores; the fp32 master weights stay fp32), fp32 elsewhere.
    Part of the fingerprint: a bf16 run's weights differ from an fp32 run's by more than the last bits."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


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
        "pixels": data.pixel_params,  # how detection crops new images (window, small images)
        "lare_alignment": "aligned crop (--preprocess crop)" if aligned else "whole image (reference)",
        "seed": cfg.seed,
        "precision": resolve_precision(cfg.precision, resolve_device(cfg.device)),
        "code": code_version(backbone, batches, cachedata, egre, lol, sys.modules[__name__]),
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
    choice = cachedata.Choice(cfg.lare, cfg.pixels, perturb=wanted)
    data = cachedata.CacheData(cfg.caches, verify=cfg.verify, split="train", choice=choice, log=log)
    run, params = plan_run(cfg, data)
    if cfg.method == "egre" and (note := sd.random_weights_note(data.lare_model)):
        log(f"note: {note}")
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
    device = resolve_device(cfg.device)
    cuda = device.startswith("cuda")
    workers = default_loader_workers(device) if cfg.loader_workers < 0 else cfg.loader_workers
    batches = EpochBatches(
        data, rows, labels, hp["batch_size"], hp["memory_rows"], cfg.progress, workers=workers, device=device
    )
    # Built before the run directory is written: a backbone that cannot be loaded leaves nothing behind.
    model = build_model(cfg.method, params, batches.lare_channels).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
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
        for _, crops, maps, y in batches.epoch(gen):  # on the device already
            x, m = make_inputs(cfg.method, hp, crops, maps, True, gen, params["aligned"])
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=params["precision"] == "bf16"):
                loss = model.loss(model(x, m), y)
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
