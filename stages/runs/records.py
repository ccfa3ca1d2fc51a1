"""The JSON records of a run directory (stages.runs.checkpoint lists the layout), as Python types.

Types only: training writes plain dicts of these shapes with `atomic_json` and evaluation and
detection read them back with `json.loads`; nothing here changes a byte on disk. A field added to a
record goes here first, so a reader finds what a record holds in one place; the hyper-parameters
("hparams": Hparams) are beside the methods that read them, in stages.detectors.method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.schema import ModelIdentity

if TYPE_CHECKING:  # types only: importing the detectors would import torch
    from stages.detectors.method import Hparams  # with the methods that read it (detectors import no runs)


class BackboneRecord(TypedDict, total=False):
    """The CLIP tower: its identity (BackboneSpec.identity) and the spec as given."""

    arch: str
    weights: str  # 'openai', 'random' or 'file'
    xxh3: str  # 'file': the weight file's checksum
    spec_weights: str  # 'openai', 'random' or the local file's path


class _CacheRecord(TypedDict):
    subset: str
    index: str  # the fingerprints of the index and of the artifacts read
    lare: str
    pixels: str


class CacheRecord(_CacheRecord, total=False):
    """A cache a run was trained on, by what its values depend on (cachedata.Source.identity)."""

    perturb: dict[str, Any] | None  # the artifacts' `perturb` param (None: clean)


class LareRecord(TypedDict):
    """The LaRE maps the run trained on: how detection computes them for new images."""

    params: dict[str, Any]  # the LaRE artifact's params (cache_schema.md)
    model: ModelIdentity  # the diffusion model's
    pixel_size: int


class _RunParams(TypedDict):
    stage: str  # "train"
    method: str
    hparams: Hparams
    backbone: BackboneRecord
    caches: list[CacheRecord]  # each training cache's identity
    lare: LareRecord
    pixels: dict[str, Any]  # the pixel artifact's params: how detection crops new images
    lare_alignment: str
    seed: int
    precision: str
    code: str  # the trainer's code version
    fingerprint: str
    aligned: bool


class RunParams(_RunParams, total=False):
    """`params.json`: everything that decides the weights, and the model's constructor arguments."""

    model: dict[str, Any]  # the method's constructor arguments besides the tower (Method.model_args)
    created_at: str
    micro_batches: MicroBatches  # how a global batch is cut (absent: whole, one process)
    world_size: int  # the processes (torchrun) the run was begun with; not in the fingerprint


class MicroBatches(TypedDict):
    """How each global batch is cut (stages.train.micro_batch_split): in the fingerprint."""

    count: int  # world size x micro-batches per process
    batchnorm: str  # "per micro-batch", or "synchronised over the ranks" (SyncBatchNorm, CUDA)


class ValScores(TypedDict):
    """An epoch's validation scores (stages.train.validation_metrics); NaN where undefined."""

    auc: float
    ap: float
    acc: float
    loss: float
    n: int  # validation rows


class EpochRecord(TypedDict):
    """`epoch-NNN.json`, written last: the epoch is finished."""

    epoch: int
    loss: float  # mean training loss
    seconds: float
    rows: int
    val: ValScores
    scheduler: dict[str, Any] | None  # the plateau schedule's state
    param_groups: list[dict[str, Any]]  # the optimizer's


class _Selection(TypedDict):
    by: str  # "validation AUC" or "last"


class Selection(_Selection, total=False):
    why: str  # why the validation slice could not choose an epoch


class _DoneRecord(TypedDict):
    epochs: int  # the last epoch
    stopped: str  # why training stopped
    final: str  # the last epoch's weights file


class DoneRecord(_DoneRecord, total=False):
    """`done.json`: the run is complete. Runs trained before --val-fraction have no best epoch."""

    best: int
    best_val: ValScores
    selection: Selection
