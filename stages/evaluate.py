"""Evaluating a run on test caches the way GenImage users report it.

ACC is accuracy at threshold 0.5 (the papers' figure); real and generated accuracy; AP is
sklearn's average_precision_score over the WHOLE test set. Every usable row of the split is scored
once (no sampling, no dropped last batch). An oracle accuracy (threshold chosen on the test labels)
is reported under a name that says so; it is not a fair figure.

Results are named by (run fingerprint, test artifacts, split, the epochs scored, the scoring
code's version): an evaluation already done is not redone, a fix to the scoring is.
A perturbed test artifact (`--perturb SPEC`) is another test artifact, so its results are apart.
ACC and AP are also given per source format of the files (`by_format`: png, jpeg, ...): a detector
that learned the format rather than the generator shows it there.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import code_version, fingerprint
from stages import batches, cachedata, checkpoint, sd
from stages import method as method_registry
from stages import perturb as perturb_stage
from stages.checkpoint import Run, atomic_json, load_run, predict, select_epochs

CODE_ID = "stages.evaluate"  # the name its code is hashed under, wherever the file lives

THRESHOLD = 0.5


def metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = THRESHOLD) -> dict:
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    pred = (scores > threshold).astype(int)
    out = {
        "n": int(len(labels)),
        "n_real": int((labels == 0).sum()),
        "n_generated": int((labels == 1).sum()),
        "threshold": threshold,
        "acc": float(accuracy_score(labels, pred)),
        "real_acc": float((pred[labels == 0] == 0).mean()) if (labels == 0).any() else float("nan"),
        "generated_acc": float((pred[labels == 1] == 1).mean()) if (labels == 1).any() else float("nan"),
        "ap": float(average_precision_score(labels, scores))
        if 0 < labels.sum() < len(labels)
        else float("nan"),
    }
    out["oracle_acc_threshold_fit_on_test"] = oracle_acc(labels, scores)
    return out


def metrics_by_format(labels: np.ndarray, scores: np.ndarray, formats: np.ndarray) -> dict[str, dict]:
    """`metrics` of the rows of each source format (the file's, whatever perturbation was applied)."""
    formats = np.array([str(f) for f in formats], dtype=object)
    return {f: metrics(labels[formats == f], scores[formats == f]) for f in sorted(set(formats))}


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
    if method_registry.get(run.method).reads_lare and (
        data.lare_params != want["params"] or data.lare_model.get("weights") != want["model"].get("weights")
    ):
        raise UserError(
            f"{data.sources[0].url}: its LaRE maps were made with other parameters or another model than "
            f"the maps {run.name} was trained on; extract them with the same settings"
        )
    data.check_crop(run.params["hparams"]["crop_size"])


def scoring_code() -> str:
    """The version of the code that turns a run and a cache into these results: part of their key."""
    return code_version(batches, checkpoint, sys.modules[__name__])


def evaluate(
    run_path: str | Path,
    caches: list[str],
    out: str | Path,
    split: str = "val",
    batch_size: int = 64,
    verify: bool = True,
    progress: bool = True,
    log=print,
    device: str = "cpu",
    epoch: str | int = "best",
    lare: str | None = None,
    pixels: str | None = None,
    perturb: str | None = None,
    perturb_only: str | None = None,
) -> list[dict]:
    """`pipeline eval`: one CSV (per-image scores) and one JSON (metrics) per test cache.

    `epoch` picks the weights: best (by the run's validation slice), last, a number, or last5: each
    of the final five epochs scored apart, the metrics reported as mean and std over them (LoL's
    protocol; std is numpy's, ddof 0). In each cache, the artifacts the run was trained on are read
    by default (`lare`/`pixels` selectors choose others, see cachedata.Choice), from an index that
    covers `split`; `perturb`, `perturb_only`: the test artifacts extracted with that `--perturb`
    (None: clean).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    wanted = cachedata.wanted_perturbation(perturb, perturb_only)
    epochs = select_epochs(run_path, epoch, several=True)
    run = load_run(run_path, resolve_device(device), epochs[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    choice = cachedata.Choice(lare, pixels, run=run.params, perturb=wanted)
    for url in caches:
        data = cachedata.CacheData([url], verify=verify, split=split, choice=choice, log=log)
        src = data.sources[0]
        if method_registry.get(run.method).reads_lare and (note := sd.random_weights_note(data.lare_model)):
            log(f"note: {note}")
        key = fingerprint(
            {
                "run": run.params["fingerprint"],
                "test": src.identity(),
                "split": split,
                "epochs": epochs,
                "code": scoring_code(),
            }
        )
        stem = out / f"{run.name}__{src.subset}-{key[:8]}"
        if stem.with_suffix(".json").is_file():
            result = json.loads(stem.with_suffix(".json").read_text())
            log(f"up to date: {stem}.json")
            results.append(result)
            continue
        check_compatible(run, data)
        rows = data.rows(split)
        if len(rows) == 0:
            raise UserError(f"{url} has no usable rows in split '{split}'")
        scores = {}
        for e in epochs:
            if run.epoch != e:
                run.use_epoch(e)
            scores[e] = predict(run, data, rows, batch_size, progress)
        each = [metrics(rows.label, scores[e]) for e in epochs]
        formats = src.columns["format"][rows.row]
        by_format = [metrics_by_format(rows.label, scores[e], formats) for e in epochs]
        result = {
            "run": run.name,
            "run_fingerprint": run.params["fingerprint"],
            "method": run.method,
            "train_subsets": sorted({c["subset"] for c in run.params["caches"]}),
            "train_perturb": perturb_stage.describe(run.params["caches"][0].get("perturb")),
            "test_subset": src.subset,
            "test_perturb": perturb_stage.describe(src.identity()["perturb"]),
            "test_cache": src.identity(),
            "test_url": url,
            "split": split,
            "epoch_choice": str(epoch),
            "epochs": epochs,
            "metrics": each[0],
            "by_format": by_format[0],
        }
        if len(epochs) > 1:  # means over the epochs (metrics, by_format) and the std of the metrics
            result["metrics"], result["metrics_std"] = mean_std(each)
            result["by_format"] = {f: mean_std([b[f] for b in by_format])[0] for f in by_format[0]}
            result["per_epoch"] = [{"epoch": e, "metrics": m} for e, m in zip(epochs, each, strict=True)]
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "id", "label", "format", "epoch", "score"])
            c = src.columns
            for e in epochs:
                for r, lab, s in zip(rows.row, rows.label, scores[e], strict=True):
                    w.writerow([c["path"][r], c["id"][r], int(lab), c["format"][r], e, f"{s:.6f}"])
        atomic_json(stem.with_suffix(".json"), result)  # last and whole: its presence means done
        log(f"{run.name} on {src.subset} [{result['test_perturb']}]: {summary(result)} -> {stem}.json")
        results.append(result)
    return results


def mean_std(each: list[dict]) -> tuple[dict, dict]:
    """Per key, the mean and the std (numpy's, ddof 0) of several epochs' metrics."""
    return (
        {k: float(np.mean([m[k] for m in each])) for k in each[0]},
        {k: float(np.std([m[k] for m in each])) for k in each[0]},
    )


def summary(result: dict) -> str:
    """One line of a result: ACC (real, generated), AP, n, and the epochs; mean +- std over several."""
    m, sd = result["metrics"], result.get("metrics_std")

    def v(k: str) -> str:
        return f"{m[k]:.4f}" + (f" +- {sd[k]:.4f}" if sd else "")

    epochs = result["epochs"]
    which = f"epoch {epochs[0]}" if len(epochs) == 1 else f"mean +- std over epochs {epochs[0]}..{epochs[-1]}"
    per_format = "; ".join(
        f"{f} ACC {fm['acc']:.4f} AP {fm['ap']:.4f} n={int(fm['n'])}" for f, fm in result["by_format"].items()
    )
    return (
        f"ACC {v('acc')} (real {v('real_acc')}, generated {v('generated_acc')}) AP {v('ap')}, "
        f"n={int(m['n'])} ({per_format}), {which} ({result['epoch_choice']})"
    )
