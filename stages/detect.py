"""Scoring any folder of images with a trained run: the pixels and (for EGRE) the LaRE map are
computed on the fly exactly as the extraction computed them for training, with the model the run
recorded. Files that cannot be read are listed with their reason; the run goes on."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from pathlib import Path

import torch
import xxhash
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from stages.configs import DetectConfig
from stages.features import lare as lare_math
from stages.features import pixels as pixels_stage
from stages.features import sd
from stages.features.params import LareParams, PixelParams
from stages.features.recipe import RowRecipe
from stages.genimage import index as index_stage
from stages.runs import calibrate, distributed
from stages.runs.batches import make_inputs
from stages.runs.checkpoint import Run, load_run

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr


def _broken_link(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, and broken symbolic links named like images: the CSV lists those
    with their reason instead of leaving them out."""
    if folder.is_file() or _broken_link(folder):
        return [folder]
    if not folder.is_dir():
        raise UserError(f"no such folder: {folder}")
    return sorted(
        p for p in folder.rglob("*")
        if (p.is_file() or _broken_link(p))
        and p.suffix.lower() in index_stage.IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip


class LaREOnTheFly:
    """LaRE maps of new images: the model, parameters and per-row recipe of the run's training maps.

    `recipe` prepares each file (the pixel crop as `crop` says, the LaRE input and noises)."""

    def __init__(self, run: Run, device: str, paths: list[Path], crop: PixelParams):
        rec = run.params["lare"]
        self.params, model_id = LareParams.from_record(rec["params"]), rec["model"]
        if self.params.schema1:
            raise UserError(
                f"{run.name} was trained on LaRE maps of cache schema 1 (bilinear resize, older class "
                "names), which this version no longer computes: retrain it on a re-extracted cache"
            )
        ref = sd.resolve_model(model_id["spec"])
        if note := sd.random_weights_note(ref.identity()):
            logger.info(note)
        if ref.weights != model_id["weights"]:
            raise UserError(
                f"the LaRE model '{model_id['spec']}' here has other weights than the one {run.name} "
                "was trained with; detection would compute different maps"
            )
        p = self.params
        dtype = lare_math.PRECISIONS[p.precision]
        model = sd.load_model(ref, device, dtype)
        self.latent = sd.latent_geometry(ref, p.size)
        self.recipe = RowRecipe.from_params(p, self.latent, crop)
        assert self.recipe.lare is not None  # LaRE params given
        distinct, idx, _ = self.recipe.lare.prompts(paths)  # each distinct prompt encoded once
        self.prompt_of = dict(zip(paths, idx.tolist(), strict=True))
        self.lare = lare_math.LaRE(model, model.encode_prompts(distinct), p.timestep, dtype)

    def __call__(self, rows: list[dict[str, torch.Tensor]], paths: list[Path]) -> torch.Tensor:
        """Maps (B, C, h, w) of a batch of prepared rows, rounded as the cache stored them."""
        images = torch.stack([r["image"] for r in rows])
        noise = torch.stack([r["noise"] for r in rows])
        maps = self.lare(images, noise, torch.tensor([self.prompt_of[path] for path in paths])).cpu()
        return maps.to(getattr(torch, self.params.dtype)).float()


# Every row says what produced it, so a CSV (or rows pasted from several) can be traced to its run.
PROVENANCE = ("run", "run_fingerprint", "epoch", "threshold", "threshold_choice", "threshold_origin",
              "lare_model", "lare_weights")  # fmt: skip


def provenance(run: Run, threshold: calibrate.Threshold) -> list[str]:
    """The PROVENANCE columns: the run, the epoch of its weights, the threshold and where it came from,
    and (EGRE) the LaRE model's spec and weights hash the maps are computed with."""
    model = run.params["lare"]["model"] if run.method.reads_lare else None
    spec, weights = (model.get("spec", ""), model.get("weights", "")) if model else ("", "")
    return [run.name, run.params["fingerprint"], str(run.epoch), f"{threshold.value:.6g}", threshold.choice,
            threshold.origin, spec, weights]  # fmt: skip


def run_detect(cfg: DetectConfig) -> tuple[int, int]:
    """Writes `path,score,decision,error` and the PROVENANCE columns per file to `cfg.out`, in file
    order; returns (scored, failed)."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    device = distributed.init(resolve_device(cfg.device))
    run = load_run(cfg.checkpoint, device, cfg.epoch)
    thr = calibrate.resolve(cfg.checkpoint, cfg.threshold, [run.epoch])
    stamp = provenance(run, thr)
    files = list_images(Path(cfg.folder))
    if not files:
        raise UserError(f"no image files under {cfg.folder}")
    if recorded := run.params.get("pixels"):
        crop = PixelParams.from_record(recorded)
    else:  # a run recorded before the pixel params: its pixel size, the LaRE artifact's max_pixels
        max_pixels = LareParams.from_record(run.params["lare"]["params"]).max_pixels
        crop = PixelParams(run.params["lare"]["pixel_size"], max_pixels=max_pixels)
    if run.method.reads_lare:
        lare = LaREOnTheFly(run, device, files, crop)
        recipe = lare.recipe
    else:
        lare, recipe = None, RowRecipe.from_params(None, None, crop)
    logger.info(f"threshold {thr.value:.6g} ({thr.choice}: {thr.origin})")
    if note := sd.random_weights_note(run.params["backbone"]):  # once the run is known to be usable
        logger.info(f"note: {note}")
    scored = failed = 0
    w = distributed.world()  # under torchrun each rank scores every size-th batch; rank 0 writes
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(files), desc=f"detect ({run.name})", unit="img", disable=not cfg.progress or not w.main
    )
    with open(cfg.out, "w", newline="") if w.main else contextlib.nullcontext() as f:
        out = csv.writer(f) if f is not None else None
        if out is not None:
            out.writerow(["path", "score", "decision", "error", *PROVENANCE])
        for first in range(0, len(files), cfg.batch_size * w.size):  # one batch per rank at a time
            start = first + w.rank * cfg.batch_size
            batch = files[start : start + cfg.batch_size]
            mine = score_batch(batch, run, recipe, lare, thr, stamp, device) if batch else []
            for rows in distributed.gather_json(mine):  # in rank order: file order
                for row in rows:
                    failed += row[3] != ""
                    scored += row[3] == ""
                    if out is not None:
                        out.writerow(row)
                bar.update(len(rows))
    bar.close()
    return scored, failed


def score_batch(
    batch: list[Path], run: Run, recipe: RowRecipe, lare: LaREOnTheFly | None, thr: calibrate.Threshold,
    stamp: list[str], device: str,
) -> list[list[str]]:  # fmt: skip
    """The CSV rows of a batch of files, in their order: scored, or unreadable with the reason."""
    rows: dict[Path, list[str]] = {}
    ok: list[tuple[Path, dict[str, torch.Tensor]]] = []
    for path in batch:
        try:
            data = path.read_bytes()
            ok.append((path, recipe.prepare(recipe.decode(data), xxhash.xxh3_128_hexdigest(data))))
        except (pixels_stage.BadImage, OSError) as e:
            why = f"broken symbolic link to {os.readlink(path)}" if _broken_link(path) else str(e)
            rows[path] = [str(path), "", "error", why, *stamp]
            logger.warning(f"skipped {path}: {why}")  # every rank says its own
    if ok:
        paths, prepared = (list(col) for col in zip(*ok, strict=True))
        crops = torch.stack([r["crops"] for r in prepared])
        maps = lare(prepared, paths) if lare else torch.zeros(len(ok), 1, 1, 1)
        with torch.inference_mode():
            hp, aligned = run.params["hparams"], run.params["aligned"]
            x, m = make_inputs(run.method, hp, crops.to(device), maps.to(device), False, None, aligned)
            scores = run.scores(x, m)
        for path, score in zip(paths, scores.tolist(), strict=True):
            decision = "generated" if score > thr.value else "real"
            rows[path] = [str(path), f"{score:.6f}", decision, "", *stamp]
    return [rows[path] for path in batch]  # file order, failures in place
