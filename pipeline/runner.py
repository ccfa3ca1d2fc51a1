"""The stage runner: which shards are left, batches that never straddle a shard, a background writer.

A stage computes rows in batches; the runner groups finished rows into whole shards and hands
each to a writer thread, so the compute device never waits on Zarr and a killed run loses at most
the shards in flight. Because batches are cut inside shards, a resumed run computes exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.schema import STATUS_FAILED, STATUS_OK, FailedRow, WriterInfo
from pipeline.store import CacheStore, ShardWrite


@dataclass
class ShardPlan:
    """The shards each artifact still needs, in one row layout."""

    n_rows: int
    rows_per_shard: int
    pending: dict[str, list[int]]  # artifact path -> shard numbers not yet done

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.rows_per_shard)

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.n_rows)

    def shards(self) -> list[int]:
        return sorted({s for shards in self.pending.values() for s in shards})

    def rows(self) -> int:
        return sum(b - a for a, b in map(self.bounds, self.shards()))

    def batches(self, batch_size: int) -> list[list[int]]:
        """Row batches of at most `batch_size`, cut at shard boundaries."""
        out = []
        for shard in self.shards():
            start, stop = self.bounds(shard)
            out += [list(range(a, min(a + batch_size, stop))) for a in range(start, stop, batch_size)]
        return out

    @classmethod
    def for_store(cls, store: CacheStore, paths: list[str], n_rows: int, rows_per_shard: int) -> ShardPlan:
        pending = {}
        for path in paths:
            done = store.done_shards(path)
            pending[path] = [s for s in range(-(-n_rows // rows_per_shard)) if s not in done]
        return cls(n_rows, rows_per_shard, pending)


class ShardWriteError(RuntimeError):
    """Storing a shard failed (a full disk, a permission, an object store refusing a write): the
    storage's fault, not the computation's. `error` is what the store raised."""

    def __init__(self, error: BaseException):
        super().__init__(f"writing a shard failed: {error}")
        self.error = error


class ShardWriter:
    """Writes shards in a background thread; errors surface in the caller at the next put or close."""

    def __init__(self, store: CacheStore, maxsize: int = 2):
        self.store = store
        self.queue: queue.Queue[ShardWrite | None] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.seconds = 0.0  # spent writing
        self.wait_seconds = 0.0  # the producer spent waiting for a free slot (the writer is the bottleneck)
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                self.store.write_shard(item)
                self.seconds += time.perf_counter() - t0
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise ShardWriteError(self.error) from self.error

    def put(self, item: ShardWrite) -> None:
        self._check()
        t0 = time.perf_counter()
        self.queue.put(item)
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Finish the shards already handed over (also when the caller is failing), then stop."""
        self.queue.put(None)
        self.thread.join()
        self._check()


@dataclass
class _Partial:
    data: dict[str, np.ndarray]
    status: np.ndarray
    failed: list[FailedRow] = field(default_factory=list)
    filled: int = 0


class ShardAssembler:
    """Collects finished rows per (artifact, shard) and hands each complete shard to the writer."""

    def __init__(
        self,
        plan: ShardPlan,
        specs: dict[str, dict[str, tuple[tuple[int, ...], str]]],
        writer: ShardWriter,
        info: WriterInfo,
    ):
        self.plan = plan
        self.specs = specs  # artifact path -> array name -> (row shape, dtype)
        self.writer = writer
        self.info = info
        self.partial: dict[tuple[str, int], _Partial] = {}
        self.wanted = {(p, s) for p, shards in plan.pending.items() for s in shards}

    def add(
        self,
        artifact: str,
        rows: np.ndarray,
        data: dict[str, np.ndarray],
        ok: np.ndarray,
        failed: dict[int, str],
        paths: Sequence[str],
    ) -> None:
        """Rows of one batch (all in one shard) for one artifact; `failed` maps row -> reason."""
        shard = int(rows[0]) // self.plan.rows_per_shard
        if (artifact, shard) not in self.wanted:
            return
        start, stop = self.plan.bounds(shard)
        part = self.partial.get((artifact, shard))
        if part is None:
            part = _Partial(
                data={
                    n: np.empty((stop - start, *shape), dtype=dt)
                    for n, (shape, dt) in self.specs[artifact].items()
                },
                status=np.zeros(stop - start, dtype=np.uint8),
            )
            self.partial[(artifact, shard)] = part
        local = rows - start
        for name, values in data.items():
            part.data[name][local] = values
        part.status[local] = np.where(ok, STATUS_OK, STATUS_FAILED)
        part.failed += [
            {"row": int(r), "path": paths[int(r)], "reason": failed[int(r)]} for r in rows if int(r) in failed
        ]
        part.filled += len(rows)
        if part.filled == stop - start:
            del self.partial[(artifact, shard)]
            part.failed.sort(key=lambda f: f["row"])
            self.writer.put(
                ShardWrite(artifact, shard, start, stop, part.data, part.status, part.failed, self.info)
            )
