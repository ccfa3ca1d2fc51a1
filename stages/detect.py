"""Scoring any folder of images with a trained run: the pixels and (for EGRE) the LaRE map are
computed on the fly exactly as the extraction computed them for training, with the model the run
recorded. Files that cannot be read are listed with their reason; the run goes on."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from pipeline.errors import UserError
from stages import index as index_stage
from stages import lare as lare_math
from stages import pixels as pixels_stage
from stages import sd
from stages.train import Run, load_run, make_inputs


def list_images(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise UserError(f"no such folder: {folder}")
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in index_stage.IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip


class LaREOnTheFly:
    """The LaRE maps of new images with the model and parameters the run's training maps had."""

    def __init__(self, run: Run, device: str):
        rec = run.params["lare"]
        self.params, model_id = rec["params"], rec["model"]
        ref = sd.resolve_model(model_id["spec"])
        if ref.weights != model_id["weights"]:
            raise UserError(
                f"the LaRE model '{model_id['spec']}' here has other weights than the one {run.name} "
                "was trained with; detection would compute different maps"
            )
        dtype = lare_math.PRECISIONS[self.params["precision"]]
        model = sd.load_model(ref, device, dtype)
        p = self.params
        self.model, self.dtype, self.device = model, dtype, device
        self.latent = sd.latent_geometry(ref, int(p["size"]))

    def prompt(self, path: Path) -> str:
        p = self.params
        cls = index_stage.imagenet_class(path.name) if p["prompt_template"] else None
        return p["prompt_template"].format(cls=cls) if cls else (p["prompt"] or "a photo")

    def __call__(self, rgb: np.ndarray, image_id: str, path: Path) -> torch.Tensor:
        p = self.params
        geom = pixels_stage.resize_square if p["preprocess"] == "resize" else pixels_stage.crop_tiled
        image = torch.from_numpy(geom(rgb, int(p["size"])).copy()).permute(2, 0, 1)[None]
        c, side = self.latent
        noise = lare_math.draw_noise(int(p["seed"]), image_id, int(p["ensemble"]), (c, side, side))[None]
        lare = lare_math.LaRE(
            self.model, self.model.encode_prompts([self.prompt(path)]), int(p["timestep"]), self.dtype
        )
        maps = lare(image, noise, torch.zeros(1, dtype=torch.long)).cpu()
        return maps.to(getattr(torch, p["dtype"])).float()  # rounded as the cache stored them


def detect(
    folder: str | Path,
    run_path: str | Path,
    out: str | Path,
    threshold: float = 0.5,
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> tuple[int, int]:
    """Writes `path,score,decision,error` per file; returns (scored, failed)."""
    run = load_run(run_path, device)
    files = list_images(Path(folder))
    if not files:
        raise UserError(f"no image files under {folder}")
    size = int(run.params["lare"]["pixel_size"])
    max_pixels = int(run.params["lare"]["params"].get("max_pixels", pixels_stage.DEFAULT_MAX_PIXELS))
    lare = LaREOnTheFly(run, device) if run.method == "egre" else None
    scored = failed = 0
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "decision", "error"])
        for path in tqdm(files, desc=f"detect ({run.name})", unit="img", disable=not progress):
            try:
                data = path.read_bytes()
                rgb = pixels_stage.decode_rgb(data, max_pixels)
            except (pixels_stage.BadImage, OSError) as e:
                failed += 1
                w.writerow([str(path), "", "error", str(e)])
                log(f"skipped {path}: {e}")
                continue
            crop = torch.from_numpy(pixels_stage.crop_tiled(rgb, size)).permute(2, 0, 1)[None]
            maps = lare(rgb, xxhash.xxh3_128_hexdigest(data), path) if lare else torch.zeros(1, 1, 1, 1)
            with torch.inference_mode():
                x, m = make_inputs(
                    run.method, run.params["hparams"], crop, maps, False, None, run.params["aligned"]
                )
                score = float(run.scores(x, m)[0])
            w.writerow([str(path), f"{score:.6f}", "generated" if score > threshold else "real", ""])
            scored += 1
    return scored, failed
