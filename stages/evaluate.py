"""Evaluating a run on test caches the way GenImage users report it.

ACC is accuracy at threshold 0.5 (the papers' figure); real and generated accuracy; AP is
sklearn's average_precision_score over the WHOLE test set. Every usable row of the split is scored
once (no sampling, no dropped last batch). An oracle accuracy (threshold chosen on the test labels)
is reported under a name that says so; it is not a fair figure.

Results are named by (run fingerprint, test artifacts): an evaluation already done is not redone.
A perturbed test artifact (`--perturb SPEC`) is another test artifact, so its results are apart.
ACC and AP are also given per source format of the files (`by_format`: png, jpeg, ...): a detector
that learned the format rather than the generator shows it there.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score
from tqdm import tqdm

from pipeline.config import resolve_device
from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from stages import cachedata, sd
from stages import perturb as perturb_stage
from stages.batches import make_inputs
from stages.train import Run, atomic_json, load_run

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
        crops, maps = (torch.from_numpy(a).to(run.device) for a in data.load(part, progress=False))
        for i in range(0, len(part), batch_size):  # cropped on the model's device
            x, m = make_inputs(
                run.method, hp, crops[i : i + batch_size], maps[i : i + batch_size], False, None, aligned
            )
            scores.append(run.scores(x, m).numpy())
            bar.update(len(x))
    bar.close()
    return np.concatenate(scores) if scores else np.zeros(0)


def check_compatible(run: Run, data: cachedata.CacheData) -> None:
    want = run.params["lare"]
    if run.method == "egre" and (
        data.lare_params != want["params"] or data.lare_model.get("weights") != want["model"].get("weights")
    ):
        raise UserError(
            f"{data.sources[0].url}: its LaRE maps were made with other parameters or another model than "
            f"the maps {run.name} was trained on; extract them with the same settings"
        )
    data.check_crop(run.params["hparams"]["crop_size"])


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
    lare: str | None = None,
    pixels: str | None = None,
    perturb: str | None = None,
    perturb_only: str | None = None,
) -> list[dict]:
    """`pipeline eval`: one CSV (per-image scores) and one JSON (metrics) per test cache.

    In each cache, the artifacts the run was trained on are read by default (`lare`/`pixels`
    selectors choose others, see cachedata.Choice), from an index that covers `split`;
    `perturb`, `perturb_only`: the test artifacts extracted with that `--perturb` (None: clean).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    wanted = cachedata.wanted_perturbation(perturb, perturb_only)
    run = load_run(run_path, resolve_device(device))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    choice = cachedata.Choice(lare, pixels, run=run.params, perturb=wanted)
    for url in caches:
        data = cachedata.CacheData([url], verify=verify, split=split, choice=choice, log=log)
        src = data.sources[0]
        if run.method == "egre" and (note := sd.random_weights_note(data.lare_model)):
            log(f"note: {note}")
        key = fingerprint({"run": run.params["fingerprint"], "test": src.identity(), "split": split})
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
        scores = predict(run, data, rows, batch_size, progress)
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
            "metrics": metrics(rows.label, scores),
            "by_format": metrics_by_format(rows.label, scores, src.columns["format"][rows.row]),
        }
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "id", "label", "format", "score"])
            for r, lab, s in zip(rows.row, rows.label, scores, strict=True):
                c = src.columns
                w.writerow([c["path"][r], c["id"][r], int(lab), c["format"][r], f"{s:.6f}"])
        atomic_json(stem.with_suffix(".json"), result)  # last and whole: its presence means done
        m = result["metrics"]
        per_format = "; ".join(
            f"{f} ACC {fm['acc']:.4f} AP {fm['ap']:.4f} n={fm['n']}" for f, fm in result["by_format"].items()
        )
        log(
            f"{run.name} on {src.subset} [{result['test_perturb']}]: ACC {m['acc']:.4f} "
            f"(real {m['real_acc']:.4f}, generated {m['generated_acc']:.4f}) AP {m['ap']:.4f}, "
            f"n={m['n']} ({per_format}) -> {stem}.json"
        )
        results.append(result)
    return results
