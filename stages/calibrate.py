"""`pipeline calibrate`: a finished run's calibration recomputed from the validation rows its
sample.json records (a run trained before calibration existed; or to redo it).

The thresholds themselves (what they are, how they are fit, how `--threshold` resolves them) are
stages.runs.calibrate's, which training, evaluation and detection use too: this module is the command.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import resolve_device
from pipeline.errors import UserError
from stages.configs import CalibrateConfig
from stages.features.perturb_spec import Perturbation
from stages.runs import cachedata, calibrate, card, checkpoint, choice

RESCORE_BATCH = 64  # rows per model call (train's validation batch)


def run_calibrate(cfg: CalibrateConfig) -> dict:
    """Rescore the run's recorded validation slice with its best epoch, write calibration.json and
    show the thresholds in the model card; returns the calibration record."""
    run = checkpoint.load_run(cfg.checkpoint, resolve_device(cfg.device), "best")
    held = checkpoint.read_json(run.path / checkpoint.SAMPLE)["validation"]
    data = _training_caches(run, cfg, held)
    rows = cachedata.Rows(
        np.concatenate([np.full(len(v["rows"]), k) for k, v in enumerate(held)]),
        np.concatenate([np.array(v["rows"], dtype=int) for v in held]),
        np.concatenate([np.array(v["labels"], dtype=int) for v in held]),
    )
    scores = checkpoint.predict(run, data, rows, RESCORE_BATCH, progress=False)
    record = calibrate.write(run.path, rows.label, scores, run.epoch)
    card.write(run.path, (calibrate.FILE,))  # the model card shows the new thresholds; the manifest follows
    return record


def _training_caches(run: checkpoint.Run, cfg: CalibrateConfig, held: list[dict]) -> cachedata.CacheData:
    """The caches the run was trained on (at `--from-cache` or the URLs it recorded), checked to hold
    the very artifacts it read."""
    trained_on = Perturbation.from_record(run.params["caches"][0].get("perturb"))
    picked = choice.Choice(run=run.params, perturb=trained_on)
    urls = cfg.caches or [v["url"] for v in held]
    data = cachedata.CacheData(urls, verify=cfg.verify, split="train", choice=picked)
    if len(data.sources) != len(held):
        raise UserError(f"{run.name} was trained on {len(held)} cache(s), not {len(data.sources)}")
    for src, v in zip(data.sources, held, strict=True):
        if any(v[k] != value for k, value in src.identity().items()):
            raise UserError(f"{src.url} does not hold the artifacts {run.name} was trained on")
    return data
