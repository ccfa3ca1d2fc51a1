"""Training and test rows read from one or several caches (never from the image files).

Each cache is opened through `require_intact` (the one verification gate); its LaRE artifact, and a
pixel artifact of the same index, are chosen by `stages.runs.choice`; rows whose LaRE or pixels
failed are left out. Several caches are concatenated. Zarr is read a whole chunk at a time: row-by-row reads
cost a request per row and were 8x slower.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.integrity import require_intact
from pipeline.schema import (
    STATUS_OK,
    Manifest,
    ManifestArtifact,
    ModelIdentity,
    check_layout,
    index_path,
    index_splits,
)
from pipeline.store import CacheStore
from stages.features.params import LareParams, PixelParams
from stages.genimage import index as index_stage
from stages.runs import distributed
from stages.runs.choice import AUTO, Choice, choose
from stages.runs.records import CacheRecord

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

CODE_ID = "stages.cachedata"  # the name its code is hashed under, wherever the file lives


def default_split(manifest: Manifest) -> str:
    """What AUTO means for a cache: `test` if an index of one of its LaRE artifacts has that split."""
    arts = [a for a in manifest["artifacts"].values() if a["kind"] == "lare"]
    return "test" if any("test" in index_splits(manifest.get("indexes", {}), a) for a in arts) else "val"


@dataclass
class Source:
    """One cache and the artifacts chosen in it."""

    url: str
    subset: str
    index: str  # index group path
    lare: str  # artifact paths
    pixels: str
    lare_attrs: ManifestArtifact
    pixels_attrs: ManifestArtifact
    columns: dict[str, np.ndarray]  # id, path, label, split, generator, group, format, jpeg_quality
    usable: np.ndarray  # bool per row: both artifacts ok
    pairs: dict[str, list[str]] = field(default_factory=dict)  # generator -> groups of its reals (--pair)
    split: str | None = None  # the split it was opened for (AUTO resolved)

    def generators(self) -> list[str]:
        """The generators of the source's generated rows."""
        return index_stage.generated_by(self.columns, self.subset)

    def of_generator(self, generator: str) -> np.ndarray:
        """Its rows of `generator`: the generated ones and the reals that go with them (index.rows_of)."""
        return index_stage.rows_of(self.columns, self.subset, self.pairs, generator)

    def identity(self) -> CacheRecord:
        """What a run or an evaluation depends on: the artifacts' fingerprints, not the cache's path."""
        return {
            "subset": self.subset,
            "index": self.lare_attrs["upstream"]["index"],
            "lare": self.lare_attrs["fingerprint"],
            "pixels": self.pixels_attrs["fingerprint"],
            "perturb": self.lare_attrs["params"].get("perturb"),
        }


def _finished_rows(art: ManifestArtifact, n: int) -> np.ndarray:
    """Rows of the shards with a progress record: the only ones an unfinished artifact vouches for."""
    done = np.zeros(n, dtype=bool)
    for info in art.get("shards", {}).values():
        done[info["rows"][0] : info["rows"][1]] = True
    return done


def open_source(
    url: str, verify: bool = True, split: str | None = None, choice: Choice | None = None,
    verified: bool = False,
) -> tuple[Source, CacheStore]:  # fmt: skip
    """Open a cache and choose its LaRE and pixel artifacts for `split` (see `choose`).

    With verify=False, a cache whose first extraction is still running or was killed (no manifest
    yet) is read from the store itself: only the rows of its finished shards are used, and `log` says
    how many.
    """
    choice = choice or Choice()
    store = require_intact(url, check=verify and not verified)  # `verified`: checked already
    manifest = store.read_manifest()
    if manifest is None:
        if verify:
            store.manifest()  # the one-line "no manifest" error
        manifest = store.build_manifest()
        check_layout(manifest, store.metadata, url)
    if split == AUTO:
        split = default_split(manifest)
    lare = choose(
        manifest, url, "lare", split, choice.lare, choice.rank("lare"), allow_incomplete=not verify,
        perturb=choice.perturb,
    )  # fmt: skip
    index_fp = lare[1]["upstream"]["index"]
    pixels = choose(
        manifest,
        url,
        "pixels",
        split,
        choice.pixels,
        choice.rank("pixels"),
        index_fp,
        allow_incomplete=not verify,
        perturb=choice.perturb,
    )
    index = index_path(index_fp)
    cols, index_attrs = store.read_table(index)
    n = len(cols["path"])
    usable = np.ones(n, dtype=bool)
    for path, art in (lare, pixels):
        usable &= store.array(f"{path}/status")[:] == STATUS_OK
        if not art["complete"]:
            usable &= _finished_rows(art, n)
            logger.info(
                f"note: {url}: {path} is unfinished ({len(art.get('shards', {}))}/{art['n_shards']} shards); "
                f"reading the {int(usable.sum())} usable rows of its finished shards (--no-verify)"
            )
    columns = {k: cols[k] for k in ("id", "path", "label", "split", "format")}
    columns["jpeg_quality"] = index_stage.qualities(cols)
    subset = cast(str, manifest["subset"])  # None only in a store never given one, which holds no index
    columns["generator"], columns["group"] = index_stage.generators_of(cols, subset)
    pairs = index_attrs.get("pairs") or {}
    src = Source(url, subset, index, lare[0], pixels[0], lare[1], pixels[1], columns, usable, pairs, split)
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

    def __init__(
        self,
        urls: list[str],
        verify: bool = True,
        split: str | None = None,
        choice: Choice | None = None,
    ):
        if not urls:
            raise UserError("no cache given (--from-cache)")
        # Under torchrun each rank verifies its share of every cache's objects, and all agree that
        # they are intact before any reads one (a problem anywhere stops every rank in one line).
        w = distributed.world()
        shared = verify and w.size > 1
        if shared:
            distributed.agree(lambda: [require_intact(u, share=(w.rank, w.size)) for u in urls])
        opened = distributed.agree(
            lambda: [open_source(u, verify, split, choice, verified=shared) for u in urls]
        )
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
    def lare_params(self) -> dict[str, Any]:
        """The LaRE artifact's params as stored: what a run records, and compares, verbatim."""
        return self.sources[0].lare_attrs["params"]

    @property
    def lare_model(self) -> ModelIdentity:
        return self.sources[0].lare_attrs["model"]

    @property
    def pixel_size(self) -> int:
        return PixelParams.from_record(self.pixel_params).size

    @property
    def pixel_params(self) -> dict[str, Any]:
        """The pixel artifact's params as stored (see `lare_params`)."""
        return self.sources[0].pixels_attrs["params"]

    def check_crop(self, crop: int) -> None:
        """A run's crop must fit in the cached pixel crops (checked before anything is written)."""
        if crop > self.pixel_size:
            raise UserError(
                f"{self.sources[0].url}: pixel crops of {self.pixel_size} px are smaller than the "
                f"{crop} px crop of the run (--crop-size)"
            )

    def aligned(self) -> bool:
        """Whether LaRE cell (i, j) covers pixel-crop pixels [8i, 8i+8) x [8j, 8j+8) (`--preprocess crop`)."""
        lare, crop = LareParams.from_record(self.lare_params), PixelParams.from_record(self.pixel_params)
        return lare.preprocess == "crop" and lare.size == crop.size and lare.small_images == crop.small_images

    def rows(
        self, split: str | None, real_jpeg_quality: int | None = None, generators: list[str] | None = None
    ) -> Rows:
        """Usable rows of a split; with `real_jpeg_quality`, real rows of that JPEG quality only; with
        `generators`, the generated rows of those generators and the reals that go with them."""
        parts = []
        if generators:
            known = {g for s in self.sources for g in s.generators()}
            if missing := [g for g in generators if g not in known]:
                raise UserError(
                    f"no generator {', '.join(missing)} in {', '.join(s.url for s in self.sources)}; "
                    f"it holds {', '.join(sorted(known)) or 'no generated rows'}"
                )
        for k, s in enumerate(self.sources):
            keep = s.usable & (s.columns["split"] == split if split else True)
            if generators:  # a source without any of them gives no row (not all its reals)
                mine = [s.of_generator(g) for g in generators if g in s.generators()]
                keep &= np.logical_or.reduce(mine) if mine else False
            if real_jpeg_quality is not None:
                quality = s.columns["jpeg_quality"]
                if (quality == index_stage.QUALITY_UNKNOWN).any():
                    raise UserError(
                        f"{s.url}: its index records no JPEG quality (written before the column); "
                        "extract into a new --cache-dir to use --real-jpeg-quality"
                    )
                keep &= (s.columns["label"] == 1) | (quality == real_jpeg_quality)
            r = np.flatnonzero(keep)
            parts.append((np.full(len(r), k), r, s.columns["label"][r].astype(np.int64)))
        return Rows(*(np.concatenate([p[i] for p in parts]) for i in range(3)))

    def sample(self, rows: Rows, max_per_class: int | None, seed: int) -> Rows:
        """Up to `max_per_class` real and as many generated rows, drawn without replacement, seeded."""
        if not max_per_class:
            return rows
        rng = np.random.default_rng(seed)
        keep = []
        for label in (0, 1):
            idx = np.flatnonzero(rows.label == label)
            if len(idx) < max_per_class:
                logger.info(
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
                arr = store.array(f"{path}/{name}")
                if name not in out:
                    out[name] = np.empty((len(rows), *arr.shape[1:]), dtype=dtype)
                for start, stop in read_spans(want, arr.chunks[0], (arr.shards or arr.chunks)[0]):
                    inside = (want >= start) & (want < stop)
                    block = np.asarray(arr[start : min(stop, arr.shape[0])])
                    out[name][pos[inside]] = block[want[inside] - start]
                    if name == "maps":
                        bar.update(int(inside.sum()))
        bar.close()
        return cast(np.ndarray, out.get("crops")), cast(np.ndarray, out.get("maps"))  # None: no rows asked
