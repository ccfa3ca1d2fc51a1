"""Evaluating a run on test caches the way GenImage users report it, and at operating points.

ACC is accuracy at threshold 0.5 (the papers' figure; `--threshold` picks another, e.g. one
calibrated on the run's validation slice, see stages.runs.calibrate); real and generated accuracy, and
the share of real images flagged (`real_fpr`); ROC AUC, TPR at FPR 1% and 5%, ECE; AP is
sklearn's average_precision_score over the WHOLE test set. Every usable row of the split is scored
once (no sampling, no dropped last batch). An oracle accuracy (threshold chosen on the test labels)
is reported under a name that says so; it is not a fair figure.

Results are named by (run fingerprint, test artifacts, split, the epochs scored, the scoring
code's version): an evaluation already done is not redone, a fix to the scoring is.
A perturbed test artifact (`--perturb SPEC`) is another test artifact, so its results are apart.
All metrics are also given per source format of the files (`by_format`: png, jpeg, ...): a detector
that learned the format rather than the generator shows it there.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from pipeline.code_versions import stage_code
from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from stages.configs import EvalConfig
from stages.features import sd
from stages.features.perturb_spec import Perturbation, describe, requested
from stages.runs import batches, cachedata, calibrate, card, checkpoint, choice, distributed
from stages.runs.checkpoint import Run, atomic_json, load_run, predict, select_epochs
from stages.runs.results import EvalResult, from_json, to_json

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

CODE_ID = "stages.evaluate"  # the name its code is hashed under, wherever the file lives


# What a metric needs that a one-class test set (a folder of generated images alone, or of reals)
# lacks: such a result holds None there, and `undefined` says why (never a bare NaN in a table).
NEEDS_BOTH = "needs real and generated rows"
NEEDS_REAL = "needs real rows"
NEEDS_GENERATED = "needs generated rows"


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = calibrate.DEFAULT) -> dict:
    """Decisions at `threshold` (score > threshold: generated): ACC, real and generated ACC, and
    `real_fpr`, the share of real images flagged; threshold-free: AP, ROC AUC, the TPR at each
    target FPR (the best TPR of the full ROC curve with FPR at most 1% / 5%), and the expected
    calibration error. A metric the rows cannot define (one class) is None, with its reason in
    `undefined`."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = (scores > threshold).astype(int)
    real, fake = labels == 0, labels == 1
    both = bool(real.any() and fake.any())
    undefined: dict[str, str] = {}

    def given(ok: bool, name: str, value, why: str):
        if ok:
            return float(value())
        undefined[name] = why
        return None

    out = {
        "n": int(len(labels)),
        "n_real": int(real.sum()),
        "n_generated": int(fake.sum()),
        "threshold": threshold,
        "acc": float(accuracy_score(labels, pred)),
        "real_acc": given(real.any(), "real_acc", lambda: (pred[real] == 0).mean(), NEEDS_REAL),
        "generated_acc": given(
            fake.any(), "generated_acc", lambda: (pred[fake] == 1).mean(), NEEDS_GENERATED
        ),
        "real_fpr": given(real.any(), "real_fpr", lambda: pred[real].mean(), NEEDS_REAL),
        "ap": given(both, "ap", lambda: average_precision_score(labels, scores), NEEDS_BOTH),
        "auc": given(both, "auc", lambda: roc_auc_score(labels, scores), NEEDS_BOTH),
        "ece": calibrate.reliability(labels, scores)["ece"],
    }
    if both:  # every threshold: the default drops collinear points, whose TPR may be the best at an FPR
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for name, alpha in calibrate.TARGET_FPRS.items():
        out[f"tpr_at_{name}"] = given(both, f"tpr_at_{name}", lambda a=alpha: tpr[fpr <= a].max(), NEEDS_BOTH)
    out["oracle_acc_threshold_fit_on_test"] = oracle_acc(labels, scores)
    out["undefined"] = undefined
    return out


def by_generator(src: cachedata.Source, rows: cachedata.Rows, scores: np.ndarray, threshold: float) -> dict:
    """`metrics` of each generator: its generated rows against the reals that go with it (the same
    generator folder, its paired real folder, else every real row: stages.genimage.index.reals_of)."""
    out = {}
    for g in src.generators():
        mine = src.of_generator(g)[rows.row]
        out[g] = metrics(rows.label[mine], scores[mine], threshold)
    return out


def metrics_by_format(
    labels: np.ndarray, scores: np.ndarray, formats: np.ndarray, threshold: float = calibrate.DEFAULT
) -> dict[str, dict]:
    """`metrics` of the rows of each source format (the file's, whatever perturbation was applied)."""
    formats = np.array([str(f) for f in formats], dtype=object)
    return {f: metrics(labels[formats == f], scores[formats == f], threshold) for f in sorted(set(formats))}


def oracle_acc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best accuracy over all thresholds, chosen with the test labels (the reference's 'best ACC')."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # predicting 'generated' for the first k rows: correct = generated among them + real after them
    tp = np.concatenate([[0], np.cumsum(y)])
    tn = (y == 0).sum() - np.concatenate([[0], np.cumsum(y == 0)])
    valid = np.concatenate([[True], s[1:] != s[:-1], [True]])  # split only between distinct scores
    return float(((tp + tn)[valid]).max() / len(y))


def check_compatible(run: Run, data: cachedata.CacheData) -> None:
    want = run.params["lare"]
    if run.method.reads_lare and (
        data.lare_params != want["params"] or data.lare_model.get("weights") != want["model"].get("weights")
    ):
        raise UserError(
            f"{data.sources[0].url}: its LaRE maps were made with other parameters or another model than "
            f"the maps {run.name} was trained on; extract them with the same settings"
        )
    data.check_crop(run.params["hparams"]["crop_size"])


def scoring_code() -> str:
    """The version of the code that turns a run and a cache into these results: part of their key."""
    return stage_code(batches, checkpoint, calibrate, sys.modules[__name__])


def run_eval(cfg: EvalConfig) -> list[EvalResult]:
    """`pipeline eval`: one CSV (per-image scores) and one JSON (metrics) per test cache, and a
    reliability diagram `<stem>.reliability.png` beside each result."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    wanted = requested(cfg.perturb, cfg.perturb_only)
    epochs = select_epochs(cfg.checkpoint, cfg.epoch, several=True)
    thr = calibrate.resolve(cfg.checkpoint, cfg.threshold, epochs)
    run = load_run(cfg.checkpoint, distributed.init(resolve_device(cfg.device)), epochs[0])
    main = distributed.world().main  # under torchrun the ranks score their shares, rank 0 writes
    if note := sd.random_weights_note(run.params["backbone"]):
        logger.info(f"note: {note}")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    picked = choice.Choice(cfg.lare, cfg.pixels, run=run.params, perturb=wanted)
    job = _Evaluation(cfg, run, epochs, thr, main)
    results = []
    for url in cfg.caches:
        data = cachedata.CacheData([url], verify=cfg.verify, split=cfg.split, choice=picked)
        if (result := job.evaluate(url, data)) is not None:
            results.append(result)
    if main:  # a section per test set in the run's model card
        card.add_results(run.path, [to_json(r) for r in results])
    return results


@dataclass
class _Evaluation:
    """One `pipeline eval`: the run at its epochs and threshold, evaluated on one test cache at a time."""

    cfg: EvalConfig
    run: Run
    epochs: list[int]
    thr: calibrate.Threshold
    main: bool  # this process writes (rank 0)

    def evaluate(self, url: str, data: cachedata.CacheData) -> EvalResult | None:
        """The result on one test cache: read back when done before, else scored and written
        (None on the ranks that do not write)."""
        src = data.sources[0]
        split = src.split or self.cfg.split
        if self.run.method.reads_lare and (note := sd.random_weights_note(data.lare_model)):
            logger.info(f"note: {note}")
        stem = self.stem(src, split)
        done = stem.with_suffix(".json")
        if distributed.from_main(self.main and done.is_file()):
            logger.info(f"up to date: {stem}.json")
            return from_json(json.loads(done.read_text())) if self.main else cast(EvalResult, {})
        check_compatible(self.run, data)
        rows = data.rows(split)
        if len(rows) == 0:
            raise UserError(f"{url} has no usable rows in split '{split}'")
        scores = self.score(data, rows)
        result = self.result(url, data, split, rows, scores)
        if not self.main:
            return None
        self.write(stem, src, split, rows, scores, result)
        return result

    def stem(self, src: cachedata.Source, split: str) -> Path:
        """Where the result goes, named by what decides it (see the module docstring)."""
        key = fingerprint(
            {
                "run": self.run.params["fingerprint"],
                "test": src.identity(),
                "split": split,
                "epochs": self.epochs,
                "threshold": self.thr.value,
                "code": scoring_code(),
            }
        )
        return Path(self.cfg.out) / f"{self.run.name}__{src.subset}-{key[:8]}"

    def score(self, data: cachedata.CacheData, rows: cachedata.Rows) -> dict[int, np.ndarray]:
        """The rows' scores with the weights of each epoch."""
        scores = {}
        for e in self.epochs:
            if self.run.epoch != e:
                self.run.use_epoch(e)
            scores[e] = predict(self.run, data, rows, self.cfg.batch_size, self.cfg.progress)
        return scores

    def result(
        self,
        url: str,
        data: cachedata.CacheData,
        split: str,
        rows: cachedata.Rows,
        scores: dict[int, np.ndarray],
    ) -> EvalResult:
        """The record of the scores: the metrics (over several epochs their means and stds), by format
        and by generator, and what they were computed on."""
        run, src, epochs, thr = self.run, data.sources[0], self.epochs, self.thr.value
        each = [metrics(rows.label, scores[e], thr) for e in epochs]
        formats = src.columns["format"][rows.row]
        by_format = [metrics_by_format(rows.label, scores[e], formats, thr) for e in epochs]
        per_gen = [by_generator(src, rows, scores[e], thr) for e in epochs]
        result: EvalResult = {
            "run": run.name,
            "run_fingerprint": run.params["fingerprint"],
            "method": run.method.name,
            "train_subsets": sorted({c["subset"] for c in run.params["caches"]}),
            "train_perturb": describe(Perturbation.from_record(run.params["caches"][0].get("perturb"))),
            "test_subset": src.subset,
            "test_perturb": describe(Perturbation.from_record(src.identity()["perturb"])),
            "test_cache": src.identity(),
            "test_url": url,
            "split": split,
            "epoch_choice": str(self.cfg.epoch),
            "epochs": epochs,
            "threshold": self.thr.record(),
            "test_params": {"lare": data.lare_params, "pixels": data.pixel_params},
            "metrics": each[0],
            "by_format": by_format[0],
            "by_generator": per_gen[0],
        }
        if len(epochs) > 1:  # means over the epochs (metrics, by_*) and the std of the metrics
            result["metrics"], result["metrics_std"] = mean_std(each)
            result["by_format"] = {f: mean_std([b[f] for b in by_format])[0] for f in by_format[0]}
            result["by_generator"] = {g: mean_std([b[g] for b in per_gen])[0] for g in per_gen[0]}
            result["per_epoch"] = [{"epoch": e, "metrics": m} for e, m in zip(epochs, each, strict=True)]
        return result

    def write(
        self, stem: Path, src: cachedata.Source, split: str, rows: cachedata.Rows,
        scores: dict[int, np.ndarray], result: EvalResult,
    ) -> None:  # fmt: skip
        """The per-image CSV, the reliability diagram, then the result JSON (last: its presence: done)."""
        epochs, name = self.epochs, self.run.name
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "id", "label", "format", "epoch", "score"])
            c = src.columns
            for e in epochs:
                for r, lab, s in zip(rows.row, rows.label, scores[e], strict=True):
                    w.writerow([c["path"][r], c["id"][r], int(lab), c["format"][r], e, f"{s:.6f}"])
        calibrate.reliability_diagram(
            rows.label, scores[epochs[-1]], f"{name} on {src.subset} ({split}), epoch {epochs[-1]}",
            f"{stem}.reliability.png",
        )  # fmt: skip
        atomic_json(stem.with_suffix(".json"), to_json(result))  # last and whole: its presence means done
        logger.info(f"{name} on {src.subset} [{result['test_perturb']}]: {summary(result)} -> {stem}.json")


def mean_std(each: list[dict]) -> tuple[dict, dict]:
    """Per key, the mean and the std (numpy's, ddof 0) of several epochs' metrics; None where a metric
    is undefined (the same rows every epoch: undefined in all), and the first epoch's `undefined`."""
    numbers = [k for k, v in each[0].items() if isinstance(v, (int, float))]
    undefined = [k for k, v in each[0].items() if v is None]
    mean = {k: float(np.mean([m[k] for m in each])) for k in numbers} | dict.fromkeys(undefined)
    std = {k: float(np.std([m[k] for m in each])) for k in numbers} | dict.fromkeys(undefined)
    if "undefined" in each[0]:
        mean["undefined"] = each[0]["undefined"]
    return mean, std


def summary(result: EvalResult) -> str:
    """One line of a result: ACC (real, generated), AP, n, and the epochs; mean +- std over several."""
    m, sd = result["metrics"], result.get("metrics_std")

    def v(k: str) -> str:
        if m.get(k) is None:
            return f"undefined ({m.get('undefined', {}).get(k, 'one class')})"
        return f"{m[k]:.4f}" + (f" +- {sd[k]:.4f}" if sd else "")

    epochs = result["epochs"]
    which = f"epoch {epochs[0]}" if len(epochs) == 1 else f"mean +- std over epochs {epochs[0]}..{epochs[-1]}"

    def part(name: str, fm: dict) -> str:
        ap = "undefined" if fm.get("ap") is None else f"{fm['ap']:.4f}"
        return f"{name} ACC {fm['acc']:.4f} AP {ap} n={int(fm['n'])}"

    per_format = "; ".join(part(f, fm) for f, fm in result["by_format"].items())
    generators = result.get("by_generator", {})
    per_generator = (
        " by generator: " + "; ".join(part(g, gm) for g, gm in generators.items()) + "."
        if len(generators) > 1
        else ""
    )
    thr = result["threshold"]
    origin = thr["choice"] if thr["choice"] in calibrate.CHOICES else thr["origin"]
    return (
        f"ACC {v('acc')} (real {v('real_acc')}, generated {v('generated_acc')}) AP {v('ap')} "
        f"AUC {v('auc')} TPR@FPR1% {v('tpr_at_fpr1')} TPR@FPR5% {v('tpr_at_fpr5')} "
        f"real FPR {v('real_fpr')} ECE {v('ece')}, threshold {thr['value']:.4g} ({origin}), "
        f"n={int(m['n'])} ({per_format}), {which} ({result['epoch_choice']}).{per_generator}"
    )
