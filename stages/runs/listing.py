"""A table of runs (`pipeline runs [DIR ...]`), how two runs differ (`pipeline runs diff A B`), and the
record that says a run failed.

A run's status is read from its directory: `finished` (done.json), `failed` (failed.json: `pipeline
train` ended in an error after the run directory existed; resuming the run removes it), else
`stopped at epoch N` (killed, interrupted or --stop-after; N the last finished epoch, 0 for none).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypedDict

from pipeline.errors import UserError, first_line
from pipeline.storage import atomic_write, now
from stages.runs import calibrate, checkpoint

CODE_ID = "stages.runs.listing"
FAILED = "failed.json"

_current: Path | None = None  # the run `pipeline train` is working on, for failed()


def started(run: Path) -> None:
    """A run's directory is open for training: an earlier failure record goes (it is being resumed)."""
    global _current
    _current = run
    (run / FAILED).unlink(missing_ok=True)


def failed(error: BaseException) -> Path | None:
    """Record that the run being trained failed with `error` (its first line); None if none was open."""
    if _current is None or not checkpoint.is_run(_current):
        return None
    epochs = checkpoint.finished_epochs(_current)
    record = {
        "error": f"{type(error).__name__}: {first_line(error)}",
        "at": now(),
        "after_epoch": epochs[-1] if epochs else 0,
    }
    atomic_write(str(_current / FAILED), json.dumps(record, indent=1, sort_keys=True).encode())
    return _current / FAILED


class RunRow(TypedDict):
    """One line of `pipeline runs` (and one object of `--json`)."""

    run: str
    path: str
    method: str
    train: list[str]  # training subsets (with their perturbation, if any)
    epochs_done: int
    epochs_planned: int
    best_epoch: int | None
    val_auc: float | None
    thresholds: dict[str, float]
    fingerprint: str
    status: str
    error: str | None


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """Run directories (those holding params.json) among `dirs` and their children, sorted by name."""
    found: dict[str, Path] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"no such folder: {d}")
        for p in [d, *sorted(d.iterdir())]:
            if checkpoint.is_run(p):
                found[str(p.resolve())] = p
    return sorted(found.values(), key=lambda p: (p.name, str(p)))


def row(run: Path) -> RunRow:
    params = checkpoint.read_params(run)
    done, fail = checkpoint.read_json(run / checkpoint.DONE), checkpoint.read_json(run / FAILED)
    cal = checkpoint.read_json(run / calibrate.FILE) or {}
    epochs = checkpoint.finished_epochs(run)
    if done is not None:
        status = "finished"
    elif fail is not None:
        status = f"failed after epoch {fail.get('after_epoch', epochs[-1] if epochs else 0)}"
    else:
        status = f"stopped at epoch {epochs[-1] if epochs else 0}"
    train = []
    for c in params["caches"]:
        perturb = c.get("perturb")
        train.append(c["subset"] + (f"[{perturb.get('spec')}]" if isinstance(perturb, dict) else ""))
    best = (done or {}).get("best")
    auc = ((done or {}).get("best_val") or {}).get("auc")
    return RunRow(
        run=run.name,
        path=str(run),
        method=params["method"],
        train=train,
        epochs_done=len(epochs),
        epochs_planned=int(params["hparams"]["epochs"]),
        best_epoch=best,
        val_auc=auc,
        thresholds=dict(cal.get("thresholds", {})),
        fingerprint=params["fingerprint"][:12],
        status=status,
        error=(fail or {}).get("error"),
    )


def table(rows: list[RunRow]) -> str:
    """The rows as a plain text table, one line per run."""
    head = ("run", "method", "train", "epochs", "best", "val AUC", "thresholds", "fingerprint", "status")
    lines = [head]
    for r in rows:
        thr = " ".join(f"{k}={v:.3g}" for k, v in sorted(r["thresholds"].items())) or "-"
        auc = "-" if r["val_auc"] is None else f"{r['val_auc']:.4f}"
        lines.append(
            (
                r["run"],
                r["method"],
                "+".join(r["train"]),
                f"{r['epochs_done']}/{r['epochs_planned']}",
                "-" if r["best_epoch"] is None else str(r["best_epoch"]),
                auc,
                thr,
                r["fingerprint"],
                r["status"] + (f" ({r['error']})" if r["error"] else ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


# ---- two runs side by side --------------------------------------------------------------------
ABSENT = "(absent)"  # a key one run's records lack
NOT_COMPARED = ("created_at", "fingerprint")  # differ between any two runs; the fingerprint is shown apart


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(obj, list) and obj and all(isinstance(v, Mapping) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def diff(a: Path, b: Path) -> dict[str, tuple[Any, Any]]:
    """What differs between two runs' parameters and inputs (params.json, flattened to dotted keys:
    hparams.lr, caches[0].lare...), and their outcome (done.json); ABSENT where one lacks the key."""
    for run in (a, b):
        if not checkpoint.is_run(run):
            raise UserError(f"{run} is not a run directory (no {checkpoint.PARAMS})")
    sides = []
    for run in (a, b):
        params = {k: v for k, v in checkpoint.read_params(run).items() if k not in NOT_COMPARED}
        done = checkpoint.read_json(run / checkpoint.DONE) or {}
        sides.append(
            {**_flat(params), **_flat({"done": {k: done.get(k) for k in ("epochs", "best", "stopped")}})}
        )
    keys = sorted(set(sides[0]) | set(sides[1]))
    return {
        k: (sides[0].get(k, ABSENT), sides[1].get(k, ABSENT))
        for k in keys
        if sides[0].get(k, ABSENT) != sides[1].get(k, ABSENT)
    }


def diff_text(a: Path, b: Path, differences: Mapping[str, tuple[Any, Any]]) -> str:
    if not differences:
        return f"{a.name} and {b.name}: same parameters and inputs"
    width = max(len(k) for k in differences)
    lines = [f"{'':{width}}  A: {a.name}", f"{'':{width}}  B: {b.name}"]

    def shown(v: Any) -> str:
        return v if v == ABSENT else json.dumps(v)

    for k, (va, vb) in differences.items():
        lines.append(f"{k:{width}}  A: {shown(va)}")
        lines.append(f"{'':{width}}  B: {shown(vb)}")
    return "\n".join(lines)
