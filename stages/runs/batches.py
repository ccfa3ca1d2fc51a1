"""The batches a detector sees: cache rows read in DataLoader workers, then cropped, flipped, rotated
and masked as whole-batch tensor ops on the device that trains or scores.

Every random number is drawn on the CPU from the epoch's generator, in an order and count that depend
only on the rows and the batch size; the tensors the draws decide are then built wherever the batch
lives. So a CPU and a GPU run draw the same numbers, and neither the loader's worker count nor where a
run was stopped and resumed changes a bit. Training, evaluation and detection share `make_inputs`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from stages.detectors.method import Hparams, Method
from stages.runs import distributed
from stages.runs.cachedata import CacheData, Rows

CODE_ID = "stages.batches"  # the name its code is hashed under, wherever the file lives

LARE_GRID = 8  # pixels per LaRE cell (the VAE's downsampling)


def crop_offsets(
    n: int, size: int, crop: int, train: bool, gen: torch.Generator | None, grid: int
) -> torch.Tensor:
    """(n, 2) top-left corners of `crop` windows in `size` images: random on the grid, or centred."""
    if not train:
        return torch.full((n, 2), (size - crop) // 2 // grid * grid)
    steps = (size - crop) // grid + 1
    return torch.randint(0, steps, (n, 2), generator=gen) * grid


def crop_windows(x: torch.Tensor, off: torch.Tensor, crop: int) -> torch.Tensor:
    """(B, C, crop, crop) windows of (B, C, H, W) at per-sample top-left corners `off` (B, 2): one gather
    on x's device instead of a Python loop over the samples."""
    b, c, _, width = x.shape
    ar = torch.arange(crop, device=x.device)
    off = off.to(x.device)
    rows, cols = off[:, :1] + ar, off[:, 1:] + ar  # (B, crop) each
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, crop * crop)
    return x.flatten(2).gather(2, index.expand(b, c, crop * crop)).view(b, c, crop, crop)


def make_inputs(
    method: Method,
    hp: Hparams,
    crops: torch.Tensor,
    maps: torch.Tensor,
    train: bool,
    gen: torch.Generator | None,
    aligned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, LaRE maps) for one batch of `method`, on the device of `crops`:
    crop (the map with the same window when aligned and the method reads maps), then the method's
    `prepare` (normalisation; for LoL in training flip, rotation and the rectangle mask).

    Offsets snap to the LaRE grid only where a map is cropped with the window (EGRE on aligned
    caches); a method that reads no map (LoL) crops at any pixel, as its paper does."""
    c = hp["crop_size"]
    cropped_map = aligned and method.reads_lare
    off = crop_offsets(len(crops), crops.shape[-1], c, train, gen, LARE_GRID if cropped_map else 1)
    images = crop_windows(crops, off, c)
    if cropped_map:
        maps = crop_windows(maps, off // LARE_GRID, c // LARE_GRID)
    return method.prepare(images, hp, train, gen), maps


class BlockReads(torch.utils.data.Dataset):
    """Item k: (positions, crops uint8, maps float32) of block k, the wanted rows of one shard of one
    cache, read whole chunks at a time. Runs in DataLoader workers (zarr resets its I/O loop on fork)."""

    def __init__(self, data: CacheData, rows: Rows, blocks: list[np.ndarray]):
        self.data, self.rows, self.blocks = data, rows, blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = self.blocks[k]
        crops, maps = self.data.load(self.rows[pos], progress=False)
        return torch.from_numpy(pos), torch.from_numpy(crops), torch.from_numpy(maps)


def shard_blocks(data: CacheData, rows: Rows) -> list[np.ndarray]:
    """Row positions grouped by (cache, shard), each group in row order: the unit of one read."""
    shard_rows = np.array([int(s.pixels_attrs["rows_per_shard"]) for s in data.sources])
    key = rows.source.astype(np.int64) * (1 << 40) + rows.row // shard_rows[rows.source]
    order = np.argsort(key, kind="stable")
    starts = np.unique(key[order], return_index=True)[1]
    return np.split(order, starts[1:])


class EpochBatches:
    """The training batches of an epoch, in an order drawn from the epoch's generator.

    Up to `memory_rows` rows are read once and kept on `device` (a random permutation per epoch).
    More are streamed: the rows' shards are visited in a random order, about `memory_rows` rows'
    worth at a time are read and shuffled together; the remainder that does not fill a batch is
    carried into the next buffer, so every batch but the epoch's last is full.

    Shards are read by `workers` DataLoader processes (0: in this process), ahead of the batches
    that need them; on CUDA through pinned memory. The reads decide no random number, so the worker
    count changes no bit.
    """

    def __init__(
        self,
        data: CacheData,
        rows: Rows,
        labels: torch.Tensor,
        batch_size: int,
        memory_rows: int,
        progress: bool,
        workers: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.data, self.rows, self.bs = data, rows, batch_size
        self.memory_rows, self.workers, self.device = memory_rows, workers, torch.device(device)
        self.labels = labels.to(self.device)
        self.blocks = shard_blocks(data, rows)
        self.stream = len(rows) > memory_rows
        store, source = data.stores[0], data.sources[0]
        self.shapes = (
            tuple(store.array(f"{source.pixels}/crops").shape[1:]),
            tuple(store.array(f"{source.lare}/maps").shape[1:]),
        )
        self.lare_channels = int(self.shapes[1][0])
        if self.stream:
            return
        mine = distributed.share(list(range(len(self.blocks))))  # each rank reads its share, once
        bar = tqdm(total=sum(len(self.blocks[b]) for b in mine), desc="read cache", unit="row",
                   disable=not progress)  # fmt: skip
        crops = torch.empty((len(rows), *self.shapes[0]), dtype=torch.uint8)
        maps = torch.empty((len(rows), *self.shapes[1]), dtype=torch.float32)
        read = []
        for pos, c, m in self._reads(mine):
            read.append((pos, c, m))
            bar.update(len(pos))
        bar.close()
        for pos, c, m in distributed.all_gather_rows(*self._joined(read)):  # the others' shares
            on = pos.cpu()
            crops[on], maps[on] = c.cpu(), m.cpu()
        self.crops, self.maps = crops.to(self.device), maps.to(self.device)

    def _joined(self, read: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, crops, maps) of the blocks read, one after the other (empty when none were)."""
        if not read:
            return (torch.zeros(0, dtype=torch.int64), torch.zeros((0, *self.shapes[0]), dtype=torch.uint8),
                    torch.zeros((0, *self.shapes[1]), dtype=torch.float32))  # fmt: skip
        return tuple(torch.cat([r[i] for r in read]) for i in range(3))  # type: ignore[return-value]

    def _reads(self, order: list[int]):
        """The blocks in `order`, read ahead by the workers: enough in flight to fill a buffer."""
        block_rows = max(1, int(np.mean([len(b) for b in self.blocks])))
        buffer = min(self.memory_rows, len(self.rows))
        ahead = max(2, math.ceil(buffer / block_rows / max(1, self.workers)) + 1)
        return torch.utils.data.DataLoader(
            BlockReads(self.data, self.rows, self.blocks), batch_size=None, sampler=order,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=ahead if self.workers else None,
            generator=torch.Generator(),  # its base seed must not come from (and move) the global one
        )  # fmt: skip

    def epoch(self, gen: torch.Generator):
        """Yields (row positions, crops uint8, maps, labels) per batch, on the device; every row once."""
        if not self.stream:
            order = torch.randperm(len(self.rows), generator=gen)
            for b in range(0, len(order), self.bs):
                idx = order[b : b + self.bs]
                on = idx.to(self.device)
                yield idx.numpy(), self.crops[on], self.maps[on], self.labels[on]
            return
        dev = self.device
        carry: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None  # rows left for the next part
        block_order = torch.randperm(len(self.blocks), generator=gen).tolist()
        buffers = self._buffers(block_order)
        mine = [distributed.share(part) for part in buffers]  # each rank reads its share of each
        reads = iter(self._reads([b for part in mine for b in part]))
        for k, part in enumerate(buffers):
            read = [next(reads) for _ in mine[k]]
            pos_t, crops, maps = (t.to(dev, non_blocking=True) for t in self._joined(read))
            pos = pos_t.cpu().numpy()
            if distributed.world().size > 1:  # every rank's share, in the part's block order
                got = distributed.all_gather_rows(pos_t, crops, maps)
                have = torch.cat([g[0] for g in got]).cpu().numpy()
                pos = np.concatenate([self.blocks[b] for b in part])
                where = np.argsort(have)[np.searchsorted(np.sort(have), pos)]
                on_dev = torch.from_numpy(where).to(dev)
                crops = torch.cat([g[1] for g in got]).to(dev)[on_dev]
                maps = torch.cat([g[2] for g in got]).to(dev)[on_dev]
            if carry is not None and len(carry[0]):
                pos = np.concatenate([carry[0], pos])
                crops, maps = torch.cat([carry[1], crops]), torch.cat([carry[2], maps])
            perm = torch.randperm(len(pos), generator=gen)
            last = k == len(buffers) - 1
            full = len(pos) if last else len(pos) // self.bs * self.bs
            for b in range(0, full, self.bs):
                idx = perm[b : min(b + self.bs, full)]
                sel, on = pos[idx.numpy()], idx.to(dev)
                yield sel, crops[on], maps[on], self.labels[torch.from_numpy(sel).to(dev)]
            rest = perm[full:]
            carry = (pos[rest.numpy()], crops[rest.to(dev)], maps[rest.to(dev)])

    def _buffers(self, block_order: list[int]) -> list[list[int]]:
        """The blocks of each shuffle buffer: in block order, until a buffer holds `memory_rows` rows."""
        out: list[list[int]] = [[]]
        rows = 0
        for i, b in enumerate(block_order):
            out[-1].append(b)
            rows += len(self.blocks[b])
            if rows >= self.memory_rows and i < len(block_order) - 1:
                out.append([])
                rows = 0
        return out
