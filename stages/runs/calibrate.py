"""Operating points a user can trust: thresholds calibrated on the run's validation slice, and how
well the scores read as probabilities (expected calibration error, reliability diagram).

The validation slice is part of the TRAIN split (stages.train.hold_out), so a threshold fit on it
never saw a test file. At the end of a run `record` scores the slice with the weights `--epoch best`
chooses and writes `<run>/calibration.json` (atomically): the threshold of each target false-positive
rate (`fpr1`, `fpr5`) and the one maximising balanced accuracy (`balanced`). It is derived from the
run, not part of it: the run's fingerprint does not depend on it.

A threshold t calls an image generated when its score > t (as evaluation and detection do).
A threshold for FPR alpha needs at least 1/alpha real validation rows (100 for 1%, 20 for 5%):
with fewer, no real row may be flagged at all and the threshold is merely "above every real score",
which says nothing about a rate of alpha. `balanced` needs BALANCED_MIN rows of each label. A name
the slice is too small for is recorded with its reason; asking for it is one line and exit 2
(a silent fallback to 0.5 would label a result with an operating point it does not have).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from pipeline.errors import UserError

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

CODE_ID = "stages.calibrate"  # the name its code is hashed under, wherever the file lives

DEFAULT = 0.5  # the papers' threshold, and the default of `eval` and `detect`
TARGET_FPRS = {"fpr1": 0.01, "fpr5": 0.05}
MIN_REAL = {name: math.ceil(1 / alpha) for name, alpha in TARGET_FPRS.items()}  # 100, 20
BALANCED_MIN = 10  # rows of each label: below this one row moves balanced accuracy by 5 points or more
CHOICES = (*TARGET_FPRS, "balanced")
FILE = "calibration.json"
ECE_BINS = 15  # equal-width bins of the score over [0, 1]


def threshold_at_fpr(real_scores: np.ndarray, alpha: float) -> float:
    """The lowest threshold whose false-positive rate on these real scores is at most alpha.

    With `score > t`, t = the (floor(alpha n) + 1)-th highest real score flags at most floor(alpha n)
    of the n reals (fewer where scores tie)."""
    s = np.sort(np.asarray(real_scores, dtype=np.float64))[::-1]
    return float(s[int(math.floor(alpha * len(s) + 1e-9))])


def balanced_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold of highest balanced accuracy (TPR + TNR) / 2; among equals, the lowest.

    Candidates are the midpoints between consecutive distinct scores (and below the lowest), so the
    threshold does not sit on a validation score."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    u = np.unique(scores)
    cand = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2]) if len(u) > 1 else u - 1e-6
    real, gen = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    tnr = np.searchsorted(real, cand, side="right") / len(real)  # reals at or below t: called real
    tpr = 1 - np.searchsorted(gen, cand, side="right") / len(gen)
    return float(cand[int(np.argmax(tpr + tnr))])


def calibrate(labels: np.ndarray, scores: np.ndarray) -> dict:
    """{"n_real", "n_generated", "thresholds": {name: t}, "not_calibrated": {name: why}}."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    real = scores[labels == 0]
    n_real, n_gen = int(len(real)), int((labels == 1).sum())
    thresholds: dict[str, float] = {}
    missing: dict[str, str] = {}
    for name, alpha in TARGET_FPRS.items():
        if n_real >= MIN_REAL[name]:
            thresholds[name] = threshold_at_fpr(real, alpha)
        else:
            missing[name] = f"{n_real} real validation row(s); FPR {alpha:.0%} needs {MIN_REAL[name]}"
    if min(n_real, n_gen) >= BALANCED_MIN:
        thresholds["balanced"] = balanced_threshold(labels, scores)
    else:
        missing["balanced"] = f"{n_real} real + {n_gen} generated rows; needs {BALANCED_MIN} of each"
    return {"n_real": n_real, "n_generated": n_gen, "thresholds": thresholds, "not_calibrated": missing}


def write(run: Path, labels: np.ndarray, scores: np.ndarray, epoch: int) -> dict:
    """Calibrate on the validation scores of `epoch` and write <run>/calibration.json; one log line
    when the slice is too small for some threshold."""
    from stages.runs.checkpoint import atomic_json

    record = {**calibrate(labels, scores), "epoch": int(epoch), "source": "validation slice (train split)",
              "validation_ece": reliability(labels, scores)["ece"]}  # fmt: skip
    if record["not_calibrated"]:
        names = ", ".join(record["not_calibrated"])
        logger.info(
            f"note: validation slice too small to calibrate {names} ({record['n_real']} real, "
            f"{record['n_generated']} generated rows; fpr1 needs {MIN_REAL['fpr1']} real, fpr5 "
            f"{MIN_REAL['fpr5']}, balanced {BALANCED_MIN} of each): the run has no {names} threshold, so "
            f"`--threshold {next(iter(record['not_calibrated']))}` stops eval and detect with an error; "
            f"the default {DEFAULT} and a number you give still work"
        )
    atomic_json(run / FILE, record)
    return record


def record(run, data, val_rows, batch_size: int) -> dict:
    """At the end of training: score the validation slice with the weights `--epoch best` serves and
    write the run's calibration (`run`: a checkpoint.Run whose model may be changed)."""
    from stages.runs import distributed
    from stages.runs.checkpoint import predict, select_epochs

    (epoch,) = select_epochs(run.path, "best")
    run.use_epoch(epoch)
    run.model.eval()
    scores = predict(run, data, val_rows, batch_size, progress=False)  # every rank scores its share
    if not distributed.world().main:
        return {}  # rank 0 writes
    return write(run.path, val_rows.label, scores, epoch)


class ThresholdRecord(TypedDict):
    """A Threshold as an evaluation result records it."""

    value: float
    choice: str
    origin: str


@dataclass(frozen=True)
class Threshold:
    """The threshold a result was computed with, and where it came from (written beside the result)."""

    value: float
    choice: str  # what the user asked for: 0.5, a number, fpr1, fpr5 or balanced
    origin: str  # 'default', 'given', or 'calibrated on <run>'s validation slice (epoch N, n real)'

    def record(self) -> ThresholdRecord:
        return {"value": self.value, "choice": self.choice, "origin": self.origin}


def resolve(run: str | Path, choice: str | float | None, epochs: list[int]) -> Threshold:
    """`--threshold 0.5|fpr1|fpr5|balanced|<number>` for a run scored with the weights of `epochs`."""
    choice = str(DEFAULT if choice is None else choice)
    if choice not in CHOICES:
        try:
            value = float(choice)
        except ValueError:
            raise UserError(f"--threshold takes {', '.join(CHOICES)} or a number, not '{choice}'") from None
        if not 0 <= value <= 1:
            raise UserError(f"--threshold must lie in [0, 1] (scores are probabilities), not {value}")
        return Threshold(value, choice, "default" if value == DEFAULT else "given")
    path = Path(run) / FILE
    if not path.is_file():
        raise UserError(
            f"{Path(run).name} has no calibrated thresholds (trained before calibration existed): "
            f"use --threshold {DEFAULT} or a number"
        )
    record = json.loads(path.read_text())
    if choice not in record["thresholds"]:
        raise UserError(
            f"{Path(run).name} has no '{choice}' threshold: {record['not_calibrated'][choice]} "
            f"(a larger --val-fraction or more training rows); use --threshold {DEFAULT} or a number"
        )
    if epochs != [record["epoch"]]:
        raise UserError(
            f"--threshold {choice} was calibrated on the scores of epoch {record['epoch']}, not of "
            f"epoch(s) {', '.join(map(str, epochs))}: use --epoch best, or a number as threshold"
        )
    origin = (
        f"calibrated on {Path(run).name}'s validation slice (epoch {record['epoch']}, "
        f"{record['n_real']} real + {record['n_generated']} generated rows)"
    )
    return Threshold(float(record["thresholds"][choice]), choice, origin)


# ---- scores as probabilities ------------------------------------------------------------------
def reliability(labels: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width score bin: rows, mean score, fraction generated; and the expected calibration
    error, sum over bins of (rows / n) * |fraction generated - mean score| (empty bins count 0)."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    which = np.clip((scores * bins).astype(int), 0, bins - 1)  # a score of 1.0 falls in the last bin
    count = np.bincount(which, minlength=bins)
    safe = np.maximum(count, 1)
    mean_score = np.bincount(which, weights=scores, minlength=bins) / safe
    frac = np.bincount(which, weights=labels, minlength=bins) / safe
    ece = float((count / max(len(labels), 1) * np.abs(frac - mean_score)).sum())
    return {"bins": bins, "count": count.tolist(), "mean_score": mean_score.tolist(),
            "fraction_generated": frac.tolist(), "ece": ece}  # fmt: skip


def reliability_diagram(labels: np.ndarray, scores: np.ndarray, title: str, out: str | Path) -> Path:
    """A reliability diagram PNG: fraction generated against mean score per bin, the diagonal, the ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = reliability(labels, scores)
    filled = np.array(r["count"]) > 0
    edges = np.linspace(0, 1, r["bins"] + 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.bar(edges[:-1][filled], np.array(r["fraction_generated"])[filled], width=1 / r["bins"], align="edge",
           edgecolor="black", alpha=0.7, label="fraction generated")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"score (P generated), {r['bins']} equal-width bins")
    ax.set_ylabel("fraction generated")
    ax.set_title(f"{title}\nECE {r['ece']:.4f}, n={len(labels)}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
