"""The model card of a run: `<run>/README.md`, a YAML header and a page a person reads (the Hugging
Face model-card convention), drawn from the run's records alone.

    <run>/README.md          the card: rendered again whenever a record it shows changes
    <run>/evals/<key>.json   a copy of each `pipeline eval` result of this run (the card's sections)

What it shows: what the detector is, its training caches (subsets, artifact fingerprints, the LaRE
model, perturbation), the hyper-parameters, the selection rule and best epoch, the validation
scores, the calibrated thresholds, how to run `detect` with it, the random-weights warning where the
backbone or the SD model had random weights, and one section per evaluated test set. The header's
`lare_pipeline` block carries the figures exactly as the records hold them (`validation` is
done.json's `best_val`, `thresholds` calibration.json's), so a script reads them back with any YAML
parser; every eval result's keys are shown, whatever they are (a new metric or grouping appears).

`train` writes the card when the run finishes and seals the run (pipeline.runstore: the manifest
written last); `eval` adds its results and `calibrate` its thresholds, each updating the manifest
entries of the files it wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline import runstore
from pipeline.fingerprint import checksum_bytes
from pipeline.storage import atomic_write
from stages.detectors import method as method_registry
from stages.features import sd
from stages.runs import calibrate, checkpoint

CODE_ID = "stages.runs.card"
FILE = "README.md"
EVALS = "evals"
CALIBRATION = calibrate.FILE


def warnings(params: Mapping[str, Any]) -> list[str]:
    """The random-weights notes that apply to a run: its backbone's, and (a method reading LaRE maps)
    the SD model's its maps were made with."""
    models = [params["backbone"]]
    if _reads_lare(params["method"]):
        models.append(params["lare"]["model"])
    return [note for m in models if (note := sd.random_weights_note(m))]


def _reads_lare(method: str) -> bool:
    try:
        return method_registry.get(method).reads_lare
    except Exception:  # a method registered elsewhere, not importable here: say nothing false
        return False


def _about(method: str) -> str:
    """The first line of the method module's docstring (each method module says what it is)."""
    try:
        doc = method_registry.get(method).network_module().__doc__ or ""
    except Exception:
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else f"the '{method}' detector"


def evaluations(run: Path) -> list[dict[str, Any]]:
    """The eval results kept in the run, ordered by test set, split and epochs."""
    results = [json.loads(p.read_text()) for p in sorted((run / EVALS).glob("*.json"))]
    return sorted(results, key=lambda r: (_test_name(r), str(r.get("split")), str(r.get("epochs"))))


def _test_name(result: Mapping[str, Any]) -> str:
    return str(result.get("test_dataset") or result.get("test_subset") or "?")


def header(run: Path) -> dict[str, Any]:
    """The YAML header: the Hub's keys, and `lare_pipeline` with the records' figures as they are."""
    params = checkpoint.read_params(run)
    done = checkpoint.read_json(run / checkpoint.DONE) or {}
    cal = checkpoint.read_json(run / CALIBRATION) or {}
    subsets = sorted({c["subset"] for c in params["caches"]})
    evals = evaluations(run)
    block: dict[str, Any] = {
        "run": run.name,
        "fingerprint": params["fingerprint"],
        "method": params["method"],
        "backbone": {k: params["backbone"].get(k) for k in ("arch", "weights")},
        "training_caches": params["caches"],
        "lare_model": params["lare"]["model"] if _reads_lare(params["method"]) else None,
        "epochs": done.get("epochs"),
        "epochs_planned": params["hparams"]["epochs"],
        "best_epoch": done.get("best"),
        "selection": done.get("selection"),
        "stopped": done.get("stopped"),
        "validation": done.get("best_val"),
        "thresholds": cal.get("thresholds", {}),
        "calibration_epoch": cal.get("epoch"),
        "random_weights": warnings(params),
        "evaluations": [
            {
                "test": _test_name(r),
                "split": r.get("split"),
                "epochs": r.get("epochs"),
                "threshold": (r.get("threshold") or {}).get("value"),
                "metrics": r.get("metrics"),
            }
            for r in evals
        ],
    }
    results = []
    if done.get("best_val"):
        results.append(_index_entry("validation slice (train split)", subsets, done["best_val"]))
    results += [
        _index_entry(f"{_test_name(r)} ({r.get('split')})", [_test_name(r)], r["metrics"]) for r in evals
    ]
    return {
        "library_name": "lare-pipeline",
        "pipeline_tag": "image-classification",
        "tags": ["ai-generated-image-detection", "image-forensics", params["method"], "genimage"],
        "datasets": [f"genimage/{s}" for s in subsets],
        "metrics": ["roc_auc", "average_precision", "accuracy"],
        "model-index": [{"name": run.name, "results": results}],
        "lare_pipeline": block,
    }


def _index_entry(name: str, datasets: list[str], metrics: Mapping[str, Any]) -> dict[str, Any]:
    names = {"auc": "roc_auc", "ap": "average_precision", "acc": "accuracy"}
    return {
        "task": {"type": "image-classification", "name": "real vs generated"},
        "dataset": {"name": name, "type": "+".join(datasets), "config": "+".join(datasets)},
        # a metric a one-class test set cannot define (None) is left out, not written as null
        "metrics": [{"type": t, "value": metrics[k]} for k, t in names.items() if metrics.get(k) is not None],
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return str(value)


def _metric(value: Any) -> str:
    """A metric's cell: None is a metric the test set cannot define (one class), said so."""
    return "undefined" if value is None else _fmt(value)


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", ""), fmt=_fmt) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in rows)]


def _grouped(name: str, groups: Mapping[str, Any]) -> list[str]:
    """A `by_*` grouping of an eval result (by_format, by_generator...): a row per group."""
    cols = [c for c in ("n", "acc", "ap", "auc", "real_fpr") if any(c in g for g in groups.values())]
    label = name.removeprefix("by_").replace("_", " ")
    out = [f"| {label} | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1)]
    for group, m in groups.items():
        out.append(f"| {group} | " + " | ".join(_metric(m[c]) if c in m else "" for c in cols) + " |")
    return out


def render(run: Path) -> str:
    """The whole card: the YAML header, then the page."""
    params = checkpoint.read_params(run)
    done = checkpoint.read_json(run / checkpoint.DONE) or {}
    cal = checkpoint.read_json(run / CALIBRATION) or {}
    sample = checkpoint.read_json(run / checkpoint.SAMPLE) or {}
    hp = params["hparams"]
    lines = ["---", yaml.safe_dump(header(run), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {run.name}", ""]
    for note in warnings(params):
        lines += [f"> **Warning: random weights.** {note}. Nothing this run scores measures detection.", ""]
    lines += ["## What it is", "", f"{_about(params['method'])}", ""]
    bb = params["backbone"]
    lines += [
        f"Method `{params['method']}`, backbone `{bb.get('arch')}` ({bb.get('weights')} weights), "
        f"LaRE map: {params.get('lare_alignment')}; trained by lare-pipeline (code `{params['code']}`), "
        f"run fingerprint `{params['fingerprint']}`.",
        "",
        "## Training data",
        "",
        "| subset | index | LaRE maps | pixels | perturbation |",
        "|---|---|---|---|---|",
    ]
    for c in params["caches"]:
        lines.append(
            f"| {c['subset']} | `{c['index'][:12]}` | `{c['lare'][:12]}` | `{c['pixels'][:12]}` | "
            f"{_fmt(c.get('perturb')) if c.get('perturb') else 'clean'} |"
        )
    lines += [""]
    if sample:
        lines += [
            f"{sample.get('n')} training rows, {sample.get('n_validation')} validation rows held out "
            f"of the train split (--val-fraction {sample.get('val_fraction')}, seed {sample.get('seed')}).",
            "",
        ]
    if _reads_lare(params["method"]):
        model = params["lare"]["model"]
        lines += [
            f"LaRE model: `{model.get('spec')}` (weights `{str(model.get('weights'))[:16]}`, "
            f"{model.get('source')}); LaRE parameters: "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(params["lare"]["params"].items())),
            "",
        ]
    lines += ["## Hyper-parameters", ""]
    lines += _table(
        sorted(hp.items()) + [("seed", params["seed"]), ("precision", params["precision"])],
        ("parameter", "value"),
    )
    lines += ["", "## Model selection", ""]
    if done:
        sel = done.get("selection", {})
        rule = (
            "highest validation AUC"
            if sel.get("by") == "validation AUC"
            else f"the last epoch ({sel.get('why', '')})"
        )
        lines += [
            f"Best epoch **{done.get('best')}** of {done['epochs']} trained ({hp['epochs']} planned), "
            f"chosen by {rule}. Training stopped: {done['stopped']}.",
            "",
        ]
        if done.get("best_val"):
            lines += ["Validation slice (train split), best epoch:", ""]
            lines += _table([(k.upper(), v) for k, v in done["best_val"].items()], ("metric", "value"))
            lines += ["", "Curves: `curves.png`; `tensorboard --logdir` on the run's folder.", ""]
    else:
        lines += ["Not finished (no done.json).", ""]
    lines += ["## Calibrated thresholds", ""]
    if cal.get("thresholds"):
        lines += [
            f"Fit on the validation slice with epoch {cal.get('epoch')} ({cal.get('n_real')} real + "
            f"{cal.get('n_generated')} generated rows); score > threshold is called generated.",
            "",
        ]
        lines += _table(sorted(cal["thresholds"].items()), ("threshold", "value"))
        lines += [""]
    for name, why in sorted((cal.get("not_calibrated") or {}).items()):
        lines.append(f"- `{name}` not calibrated: {why}")
    if not cal:
        lines.append("None (no calibration.json): `pipeline calibrate --checkpoint <run>` writes them.")
    choice = next((t for t in ("fpr5", "balanced", "fpr1") if t in cal.get("thresholds", {})), "0.5")
    lines += [
        "",
        "## Use it",
        "",
        "```bash",
        f"pipeline detect path/to/images/ --checkpoint runs/{run.name} --threshold {choice} --out scores.csv",
        f"pipeline eval --checkpoint runs/{run.name} --from-cache cache/<subset>.zarr --out results/",
        "```",
        "",
        "`--checkpoint` also takes the run's URL (a folder, `file://`, `s3://`, `https://`, a `.zip`), "
        "checked against its `run-manifest.json`.",
        "",
    ]
    evals = evaluations(run)
    if evals:
        lines += ["## Evaluations", ""]
    for r in evals:
        thr = r.get("threshold") or {}
        lines += [
            f"### {_test_name(r)} ({r.get('split')})",
            "",
            f"Epoch(s) {r.get('epochs')} ({r.get('epoch_choice')}), threshold {_fmt(thr.get('value'))} "
            f"({thr.get('choice')}: {thr.get('origin')}).",
            "",
        ]
        metrics = sorted((k, v) for k, v in (r.get("metrics") or {}).items())
        lines += _table(metrics, ("metric", "value"), _metric)
        for key in sorted(k for k, v in r.items() if k.startswith("by_") and isinstance(v, dict) and v):
            lines += ["", *_grouped(key, r[key])]
        lines += [""]
    return "\n".join(lines)


def write(run: Path, written: tuple[str, ...] = ()) -> Path:
    """Render the card into the run, and update the run manifest's entries of it and of `written`."""
    atomic_write(str(run / FILE), render(run).encode())
    runstore.reseal(run, [FILE, *written])
    return run / FILE


def publish(run: Path) -> Path:
    """At the end of training: the card, then the run manifest of every file (written last)."""
    path = write(run)
    runstore.seal(run)
    return path


def add_results(run: Path, results: list[dict[str, Any]]) -> None:
    """`pipeline eval`'s results kept in the run, one file per (test artifacts, split, epochs,
    threshold): evaluating the same again replaces its file, and the card is rendered again."""
    written = []
    for result in results:
        data = json.dumps(json.loads(json.dumps(result)), indent=1, sort_keys=True).encode()
        what = [result.get(k) for k in ("test_cache", "split", "epochs", "epoch_choice")]
        what.append((result.get("threshold") or {}).get("value"))
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", _test_name(result))
        key = f"{EVALS}/{safe}-{checksum_bytes(json.dumps(what, sort_keys=True).encode())[:12]}.json"
        atomic_write(str(run / key), data)
        written.append(key)
    write(run, tuple(written))
