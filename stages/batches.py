"""The batches a method sees: crops of the cached pixels (and LaRE maps), and a training epoch's order.

Shared by training, evaluation and detection, so that a model is fed at test exactly as in training.
"""

from __future__ import annotations

import numpy as np
import torch

from stages import method as method_registry

LARE_GRID = 8  # pixels per LaRE cell (the VAE's downsampling)


def crop_offsets(
    n: int, size: int, crop: int, train: bool, gen: torch.Generator | None, grid: int
) -> torch.Tensor:
    """(n, 2) top-left corners of `crop` windows in `size` images: random on the grid, or centred."""
    if not train:
        return torch.full((n, 2), (size - crop) // 2 // grid * grid)
    steps = (size - crop) // grid + 1
    return torch.randint(0, steps, (n, 2), generator=gen) * grid


def make_inputs(
    method: str,
    hp: dict,
    crops: torch.Tensor,
    maps: torch.Tensor,
    train: bool,
    gen: torch.Generator | None,
    aligned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, LaRE maps) for one batch of the method named `method`: crop (the map with the
    same window when aligned and the method reads maps), then the method's `prepare`."""
    c = hp["crop_size"]
    grid = LARE_GRID if aligned else 1
    off = crop_offsets(len(crops), crops.shape[-1], c, train, gen, grid)
    images = torch.stack([x[:, t : t + c, s : s + c] for x, (t, s) in zip(crops, off.tolist(), strict=True)])
    m = method_registry.get(method)
    if aligned and m.reads_lare:
        cc = c // LARE_GRID
        maps = torch.stack(
            [m[:, t // LARE_GRID : t // LARE_GRID + cc, s // LARE_GRID : s // LARE_GRID + cc]
             for m, (t, s) in zip(maps, off.tolist(), strict=True)]
        )  # fmt: skip
    return m.prepare(images, hp, train, gen), maps


class EpochBatches:
    """The training batches of an epoch, in an order drawn from the epoch's generator.

    Up to `memory_rows` rows are read once and kept in memory (a random permutation per epoch).
    More are streamed: the rows' shards are visited in a random order, about `memory_rows` rows'
    worth at a time are read (whole chunks) and shuffled together; the remainder that does not fill
    a batch is carried into the next buffer, so every batch but the epoch's last is full.
    """

    def __init__(self, data, rows, labels: torch.Tensor, batch_size: int, memory_rows: int, progress: bool):
        self.data, self.rows, self.labels, self.bs = data, rows, labels, batch_size
        self.memory_rows = memory_rows
        self.stream = len(rows) > memory_rows
        if self.stream:
            shard_rows = np.array([int(s.pixels_attrs["rows_per_shard"]) for s in data.sources])
            key = rows.source.astype(np.int64) * (1 << 40) + rows.row // shard_rows[rows.source]
            order = np.argsort(key, kind="stable")
            starts = np.unique(key[order], return_index=True)[1]
            self.blocks = np.split(order, starts[1:])
            self.lare_channels = int(data.stores[0].group[f"{data.sources[0].lare}/maps"].shape[1])
        else:
            crops, maps = data.load(rows, progress=progress)
            self.crops, self.maps = torch.from_numpy(crops), torch.from_numpy(maps)
            self.lare_channels = self.maps.shape[1]

    def _read(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        crops, maps = self.data.load(self.rows[pos], progress=False)
        return torch.from_numpy(crops), torch.from_numpy(maps)

    def epoch(self, gen: torch.Generator):
        """Yields (row positions, crops uint8, maps, labels) per batch; every row exactly once."""
        if not self.stream:
            order = torch.randperm(len(self.rows), generator=gen)
            for b in range(0, len(order), self.bs):
                idx = order[b : b + self.bs]
                yield idx.numpy(), self.crops[idx], self.maps[idx], self.labels[idx]
            return
        carry = (np.zeros(0, dtype=np.int64), None, None)
        pending: list[np.ndarray] = []
        block_order = torch.randperm(len(self.blocks), generator=gen).tolist()
        for i, k in enumerate(block_order):
            pending.append(self.blocks[k])
            if sum(map(len, pending)) < self.memory_rows and i < len(block_order) - 1:
                continue
            pos = np.concatenate(pending)
            pending = []
            crops, maps = self._read(pos)
            if len(carry[0]):
                pos = np.concatenate([carry[0], pos])
                crops, maps = torch.cat([carry[1], crops]), torch.cat([carry[2], maps])
            perm = torch.randperm(len(pos), generator=gen)
            last = i == len(block_order) - 1
            full = len(pos) if last else len(pos) // self.bs * self.bs
            for b in range(0, full, self.bs):
                idx = perm[b : min(b + self.bs, full)]
                sel = pos[idx.numpy()]
                yield sel, crops[idx], maps[idx], self.labels[torch.from_numpy(sel)]
            rest = perm[full:]
            carry = (pos[rest.numpy()], crops[rest], maps[rest])
