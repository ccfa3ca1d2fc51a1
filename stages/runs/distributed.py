"""Several processes on one run (torchrun): who this process is, its share of the work, and the
collectives that put the shares back together. Without torchrun every function here is the identity
of one process, so nothing changes for a plain `pipeline` command.

Training: every rank draws the very batches one process draws (same order, same crops and masks);
rank r trains on its micro-batch of each global batch (`micro_slices`), DistributedDataParallel
averages the gradients. Reading: each rank reads its share of the shard blocks (`share`) and the
rows are exchanged (`all_gather_rows`): no rank reads the whole epoch from storage. Scoring
(validation, eval, detect): the batches one process would score are dealt to the ranks in turn
(`batch_share`) and gathered back in order (`gather_batches`), so the scores are bitwise those of
one process at the same batch size. Rank 0 alone writes (`World.main`); an error on any rank
before the work starts is agreed on (`agree`) and stops every rank with one line.

Backends: NCCL on CUDA (one GPU per rank, `cuda:LOCAL_RANK`), gloo on the CPU. The collectives carry
tensors and JSON only (no pickle). On CUDA BatchNorm becomes SyncBatchNorm (`wrap`); torch refuses
SyncBatchNorm on CPU modules, so there BatchNorm normalises each micro-batch by its own statistics.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError

CODE_ID = "stages.distributed"  # the name its code is hashed under, wherever the file lives

# How long a rank waits for the others in one collective: rank 0 may verify a large cache share or
# write an epoch while they wait (torch's default is 10-30 minutes).
TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes files and logs."""
        return self.rank == 0


def world() -> World:
    """This process's place among torchrun's processes (World() when there is one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """Started by torchrun with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join torchrun's process group (once; NCCL on CUDA, gloo on the CPU); the device of this rank
    (`cuda:LOCAL_RANK` when `device` is a GPU). Without torchrun: `device` unchanged."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return device


def _device() -> torch.device:
    """Where the collectives' tensors live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- shares of the work ------------------------------------------------------------------------
def share(items: list[T]) -> list[T]:
    """This rank's items of a list every rank holds alike: every size-th, from its rank."""
    w = world()
    return items[w.rank :: w.size]


def micro_slices(n: int, parts: int) -> list[slice]:
    """`parts` consecutive slices of n rows, sizes differing by one at most (numpy's array_split)."""
    bounds = np.cumsum([0] + [n // parts + (k < n % parts) for k in range(parts)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def batch_share(n: int, batch_size: int, rank: int | None = None) -> np.ndarray:
    """Positions of the rows of batches rank, rank + size, ... of the batches one process scores
    (0..n in batch_size steps), in order; every position for one process."""
    w = world()
    rank = w.rank if rank is None else rank
    starts = range(rank * batch_size, n, w.size * batch_size)
    return np.concatenate([np.arange(s, min(s + batch_size, n)) for s in starts] or [np.zeros(0, int)])


def gather_batches(local: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """The n scores of every rank's `batch_share`, back in one process's order (float32, as scored)."""
    w = world()
    if w.size == 1:
        return local
    parts = all_gather_rows(torch.from_numpy(np.asarray(local, dtype=np.float64)))
    out = np.empty(n, dtype=np.float32)
    for r, (got,) in enumerate(parts):
        out[batch_share(n, batch_size, r)] = got.cpu().numpy()
    return out


# ---- collectives -------------------------------------------------------------------------------
def all_gather_rows(*tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Every rank's `tensors` (the same trailing shapes and dtypes; the first dimension may differ by
    rank), in rank order, on the collectives' device. all_gather needs equal shapes: padded, then cut."""
    w = world()
    if w.size == 1:
        return [tensors]
    dev = _device()
    n = torch.tensor([len(tensors[0])], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(w.size)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    out: list[list[torch.Tensor]] = [[] for _ in range(w.size)]
    for t in tensors:
        padded = t.new_zeros((max(counts), *t.shape[1:]), device=dev)
        padded[: len(t)] = t
        got = [torch.empty_like(padded) for _ in range(w.size)]
        dist.all_gather(got, padded)
        for r in range(w.size):
            out[r].append(got[r][: counts[r]])
    return [tuple(o) for o in out]


def gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-able `obj`, in rank order (encoded as JSON bytes: no pickle)."""
    if world().size == 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(bytes(t.cpu().numpy()).decode()) for (t,) in all_gather_rows(data)]


def from_main(obj: Any) -> Any:
    """Rank 0's JSON-able `obj` on every rank (what rank 0 alone can tell: a file it wrote)."""
    return gather_json(obj)[0]


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks (on its own device; every rank gets it)."""
    if world().size == 1:
        return value
    out = value.to(_device())
    dist.all_reduce(out)
    return out.to(value.device)


def agree(fn, *args, **kw):
    """fn(*args, **kw) on every rank; a UserError on any rank stops every rank: rank 0 says it in one
    line (the pipeline's exit code 2), the others leave quietly with code 2. Also a barrier."""
    try:
        value, error = fn(*args, **kw), ""
    except UserError as e:
        if world().size == 1:
            raise
        value, error = None, str(e)
    errors = [e for e in gather_json(error) if e]
    if errors:
        if world().main:
            raise UserError(errors[0])
        raise SystemExit(2)
    return value


# ---- the model ---------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The module the ranks train together: DistributedDataParallel (gradients averaged over the ranks
    at each step), BatchNorm synchronised over the global batch on CUDA. The model itself for one
    process. Buffers are not broadcast at each forward: BatchNorm's running statistics are those of
    micro-batch 0 (rank 0's, see keep_statistics), sent to every rank by `same_buffers`."""
    if world().size == 1:
        return model
    if device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def same_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, before a validation."""
    if world().size == 1:
        return
    for b in model.buffers():
        moved = b.data.to(_device())
        dist.broadcast(moved, 0)
        b.data.copy_(moved)


@contextlib.contextmanager
def keep_statistics(model: torch.nn.Module, keep: bool):
    """With `keep`, the model's buffers (BatchNorm's running statistics and batch count) are the same
    after the block as before it. Around every micro-batch but the first of a global batch: the
    running statistics follow micro-batch 0 alone, in one process accumulating micro-batches as on
    rank 0 of several (which saves them), so the two agree."""
    if not keep:
        yield
        return
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved, strict=True):
                b.copy_(s)
