"""Training and test rows read from one or several caches (never from the image files).

Each cache is opened through `require_intact` (the one verification gate), its latest complete
LaRE and pixel artifacts that share an index are paired, and rows whose LaRE or pixels failed are
left out. Several caches are concatenated. Zarr is read a whole chunk at a time: row-by-row reads
cost a request per row and were 8x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.store import STATUS_OK, CacheStore, index_path, latest, require_intact


@dataclass
class Source:
    """One cache and the artifacts chosen in it."""

    url: str
    subset: str
    index: str  # index group path
    lare: str  # artifact paths
    pixels: str
    lare_attrs: dict
    pixels_attrs: dict
    columns: dict[str, np.ndarray]  # id, path, label, split of every index row
    usable: np.ndarray  # bool per row: both artifacts ok

    def identity(self) -> dict:
        """What a run or an evaluation depends on: the artifacts' fingerprints, not the cache's path."""
        return {
            "subset": self.subset,
            "index": self.lare_attrs["upstream"]["index"],
            "lare": self.lare_attrs["fingerprint"],
            "pixels": self.pixels_attrs["fingerprint"],
        }


def _pick(manifest: dict, kind: str, index_fp: str | None = None) -> tuple[str, dict] | None:
    found = {
        path: art
        for path, art in manifest["artifacts"].items()
        if art["kind"] == kind
        and art["complete"]
        and (index_fp is None or art["upstream"]["index"] == index_fp)
    }
    path = latest(found)
    return None if path is None else (path, found[path])


def open_source(url: str, verify: bool = True) -> tuple[Source, CacheStore]:
    store = require_intact(url, check=verify)
    manifest = store.manifest()
    lare = _pick(manifest, "lare")
    if lare is None:
        raise UserError(f"{url} holds no complete LaRE artifact: finish `pipeline extract` first")
    index_fp = lare[1]["upstream"]["index"]
    pixels = _pick(manifest, "pixels", index_fp)
    if pixels is None:
        raise UserError(
            f"{url} holds no complete pixel artifact for the index of {lare[0]} (extract with --pixels)"
        )
    index = index_path(index_fp)
    cols, _ = store.read_table(index)
    usable = np.ones(len(cols["path"]), dtype=bool)
    for path in (lare[0], pixels[0]):
        usable &= store.group[f"{path}/status"][:] == STATUS_OK
    columns = {k: cols[k] for k in ("id", "path", "label", "split")}
    src = Source(url, manifest["subset"], index, lare[0], pixels[0], lare[1], pixels[1], columns, usable)
    return src, store


def read_spans(wanted: np.ndarray, chunk: int, shard: int) -> list[tuple[int, int]]:
    """Row ranges to read so that each wanted row is covered, in whole inner chunks.

    Within a shard, the chunks from the first to the last wanted one are read in one call (zarr
    fetches and decodes them concurrently) when at least half of them are wanted; otherwise each
    wanted chunk alone.
    """
    spans = []
    chunks = np.unique(wanted // chunk)
    for s in np.unique(chunks * chunk // shard):
        mine = chunks[(chunks * chunk // shard) == s]
        lo, hi = int(mine[0]), int(mine[-1])
        if 2 * len(mine) >= hi - lo + 1:
            spans.append((lo * chunk, (hi + 1) * chunk))
        else:
            spans += [(int(c) * chunk, (int(c) + 1) * chunk) for c in mine]
    return spans


@dataclass
class Rows:
    """Selected rows across sources: (source number, row) pairs and their labels."""

    source: np.ndarray
    row: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, idx) -> Rows:
        """The rows at `idx` (a slice, positions or a mask), in that order."""
        return Rows(self.source[idx], self.row[idx], self.label[idx])


class CacheData:
    """Several caches read as one table of usable rows."""

    def __init__(self, urls: list[str], verify: bool = True):
        if not urls:
            raise UserError("no cache given (--from-cache)")
        opened = [open_source(u, verify) for u in urls]
        self.sources = [s for s, _ in opened]
        self.stores = [st for _, st in opened]
        first = self.sources[0]
        for s in self.sources[1:]:
            for what, a, b in (
                ("LaRE parameters", s.lare_attrs["params"], first.lare_attrs["params"]),
                ("LaRE model", s.lare_attrs["model"]["weights"], first.lare_attrs["model"]["weights"]),
                ("pixel crop size", s.pixels_attrs["params"]["size"], first.pixels_attrs["params"]["size"]),
            ):
                if a != b:
                    raise UserError(f"{s.url} and {first.url} differ in {what}: they cannot be concatenated")

    @property
    def lare_params(self) -> dict:
        return self.sources[0].lare_attrs["params"]

    @property
    def lare_model(self) -> dict:
        return self.sources[0].lare_attrs["model"]

    @property
    def pixel_size(self) -> int:
        return int(self.sources[0].pixels_attrs["params"]["size"])

    def check_crop(self, crop: int) -> None:
        """A run's crop must fit in the cached pixel crops (checked before anything is written)."""
        if crop > self.pixel_size:
            raise UserError(
                f"{self.sources[0].url}: pixel crops of {self.pixel_size} px are smaller than the "
                f"{crop} px crop of the run (--crop-size)"
            )

    def aligned(self) -> bool:
        """Whether LaRE cell (i, j) covers pixel-crop pixels [8i, 8i+8) x [8j, 8j+8) (`--preprocess crop`)."""
        p = self.lare_params
        return p["preprocess"] == "crop" and int(p["size"]) == self.pixel_size

    def rows(self, split: str | None) -> Rows:
        parts = []
        for k, s in enumerate(self.sources):
            keep = s.usable & (s.columns["split"] == split if split else True)
            r = np.flatnonzero(keep)
            parts.append((np.full(len(r), k), r, s.columns["label"][r].astype(np.int64)))
        return Rows(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def sample(self, rows: Rows, max_per_class: int | None, seed: int, log=print) -> Rows:
        """Up to `max_per_class` real and as many generated rows, drawn without replacement, seeded."""
        if not max_per_class:
            return rows
        rng = np.random.default_rng(seed)
        keep = []
        for label in (0, 1):
            idx = np.flatnonzero(rows.label == label)
            if len(idx) < max_per_class:
                log(
                    f"note: only {len(idx)} rows of label {label}, fewer than --max-per-class {max_per_class}"
                )
            keep.append(np.sort(rng.choice(idx, size=min(max_per_class, len(idx)), replace=False)))
        return rows[np.sort(np.concatenate(keep))]

    def describe(self, rows: Rows) -> list[dict]:
        """JSON record of the rows (sample.json): which cache, row, content id, path, label."""
        out = []
        for k, s in enumerate(self.sources):
            r = rows.row[rows.source == k]
            out.append(
                {
                    **s.identity(),
                    "url": s.url,
                    "rows": r.tolist(),
                    "ids": [str(i) for i in s.columns["id"][r]],
                    "paths": [str(p) for p in s.columns["path"][r]],
                    "labels": s.columns["label"][r].astype(int).tolist(),
                }
            )
        return out

    def load(self, rows: Rows, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(crops uint8 (N, 3, S, S), maps float32 (N, C, h, w)) of the rows, in their order.

        Reads each inner chunk that holds a wanted row once, whole.
        """
        out: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(rows), desc="read cache", unit="row", disable=not progress)
        for k, (s, store) in enumerate(zip(self.sources, self.stores, strict=True)):
            pos = np.flatnonzero(rows.source == k)
            if not len(pos):
                continue
            want = rows.row[pos]
            for name, path, dtype in (("crops", s.pixels, np.uint8), ("maps", s.lare, np.float32)):
                arr = store.group[f"{path}/{name}"]
                if name not in out:
                    out[name] = np.empty((len(rows), *arr.shape[1:]), dtype=dtype)
                for start, stop in read_spans(want, arr.chunks[0], (arr.shards or arr.chunks)[0]):
                    inside = (want >= start) & (want < stop)
                    out[name][pos[inside]] = arr[start : min(stop, arr.shape[0])][want[inside] - start]
                    if name == "maps":
                        bar.update(int(inside.sum()))
        bar.close()
        return out.get("crops"), out.get("maps")
