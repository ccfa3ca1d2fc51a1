"""An evaluation result: the JSON `pipeline eval` writes per (run, test cache), and report,
robustness and the model card read back.

`EvalResult` names its keys and types once. Results written by older versions lack some keys;
`from_json` gives them the values those versions meant, so no reader falls back on its own.
Over several epochs (`--epoch last5`) a result also holds `metrics_std` and `per_epoch`.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

from pipeline.fingerprint import fingerprint
from stages.runs import calibrate
from stages.runs.calibrate import ThresholdRecord

Metrics = dict[str, Any]  # evaluate.metrics: n, acc, ap, auc, ... and `undefined` (name: why)


class EpochMetrics(TypedDict):
    epoch: int
    metrics: Metrics


class _EvalResult(TypedDict):
    run: str
    run_fingerprint: str
    method: str  # the method's name, as the run records it
    train_subsets: list[str]
    train_perturb: str  # perturb.describe of the training artifacts: 'clean' or the SPEC
    test_subset: str
    test_perturb: str
    test_cache: dict[str, Any]  # the test artifacts' identity (Source.identity)
    test_url: str
    split: str
    epoch_choice: str  # what --epoch said: best, last, N, last5
    epochs: list[int]
    threshold: ThresholdRecord
    metrics: Metrics  # over several epochs: their means
    by_format: dict[str, Metrics]
    by_generator: dict[str, Metrics]


class EvalResult(_EvalResult, total=False):
    test_params: dict[
        str, Any
    ]  # the test artifacts' recipe parameters ({"lare", "pixels"}); absent in old results
    metrics_std: Metrics  # several epochs only
    per_epoch: list[EpochMetrics]  # several epochs only


def is_result(obj: Any) -> bool:
    """Whether a JSON document is an evaluation result (a results folder may hold other JSON)."""
    return isinstance(obj, dict) and "metrics" in obj and "test_subset" in obj


def from_json(obj: dict[str, Any]) -> EvalResult:
    """A result read back: the keys older versions did not write get what those versions meant
    (threshold: the metrics' own, given; the best epoch; clean artifacts; the val split; no
    generator breakdown)."""
    given = obj["metrics"].get("threshold", calibrate.DEFAULT)
    defaults = {
        "threshold": {"value": given, "choice": str(given), "origin": "given"},
        "epoch_choice": "best",
        "train_perturb": "clean",
        "test_perturb": "clean",
        "split": "val",
        "by_generator": {},
    }
    return cast(EvalResult, defaults | {k: v for k, v in obj.items() if v is not None or k not in defaults})


def to_json(result: EvalResult) -> dict[str, Any]:
    """The JSON document of a result (what `pipeline eval` writes)."""
    return dict(result)


def artifacts_name(result: EvalResult) -> str:
    """A short name of the test artifacts: by their parameters where the result records them (equal
    for the same subset extracted twice), else by their fingerprints."""
    if "test_params" in result:
        return fingerprint(result["test_params"])[:8]
    return f"{result['test_cache']['lare'][:8]}/{result['test_cache']['pixels'][:8]}"
