"""Index stage: one row per image of a dataset (a GenImage subset, labelled or paired folders, a
manifest: stages.genimage.layouts), with a content id that never changes, the split, the generator
and the group of every row.

The id is xxh3-128 of the file's bytes, so everything keyed by it (the noise drawn for an image,
a row's identity across caches) follows the content, not the file name or the scan order.

Each JPEG's quality factor is estimated from its quantization tables: GenImage's real images are
JPEGs and most generated ones PNGs, so a detector can learn the format instead of the generator
("Fake or JPEG?", Grommelt et al. 2024); the column lets training hold real images to one quality.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import xxhash
from PIL import Image
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from stages.genimage import layouts

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

# alias -> (GenImage archive folder, the top-level folder GenImage ships it in)
SUBSETS: dict[str, tuple[str, str]] = {
    "adm": ("imagenet_ai_0508_adm", "ADM"),
    "biggan": ("imagenet_ai_0419_biggan", "BigGAN"),
    "glide": ("imagenet_glide", "glide"),
    "midjourney": ("imagenet_midjourney", "Midjourney"),
    "sdv14": ("imagenet_ai_0419_sdv4", "stable_diffusion_v_1_4"),
    "sdv15": ("imagenet_ai_0424_sdv5", "stable_diffusion_v_1_5"),
    "vqdm": ("imagenet_ai_0419_vqdm", "VQDM"),
    "wukong": ("imagenet_ai_0424_wukong", "wukong"),
}
SPLITS = ("train", "val")  # GenImage's; other datasets may also have `test` (layouts.SPLIT_NAMES)
# label folder -> label (1 generated, 0 real); GenImage's names and the {0_real,1_fake} re-arrangement
LABEL_DIRS = {"ai": 1, "nature": 0, "1_fake": 1, "0_real": 0}
IMAGE_SUFFIXES = layouts.IMAGE_SUFFIXES
COLUMNS = (
    "id", "path", "label", "split", "generator", "group", "format", "width", "height", "jpeg_quality",
    "size", "mtime_ns",
)  # fmt: skip
NOT_JPEG, QUALITY_UNKNOWN = -1, -2  # jpeg_quality of other formats; of an index written without the column


def canonical_subset(name: str) -> str:
    """Map an alias or a GenImage archive folder name to the alias; unknown names are a user error."""
    key = name.strip().lower()
    if key in SUBSETS:
        return key
    for alias, names in SUBSETS.items():
        if key in (n.lower() for n in names):
            return alias
    raise UserError(f"unknown subset '{name}': expected one of {', '.join(SUBSETS)}")


def _is_subset_folder(path: Path) -> bool:
    return any((path / s / d).is_dir() for s in SPLITS for d in LABEL_DIRS)


def resolve_subset_root(data_root: str | Path, subset: str) -> Path:
    """Find the folder holding `{train,val}/{ai,nature}` for a subset, nested archives included.

    GenImage unpacks as `<root>/stable_diffusion_v_1_4/imagenet_ai_0419_sdv4/train/ai/...`, other
    toolkits as `<root>/sdv14/train/1_fake/...`; `data_root` may also be the subset folder itself.
    """
    alias = canonical_subset(subset)
    root = Path(data_root).expanduser()
    layout = "{train,val}/{ai,nature} or {train,val}/{0_real,1_fake}"
    if not root.is_dir():
        raise UserError(f"data root not found: {root} (expected a folder holding GenImage subsets)")
    names = {alias, *(n.lower() for n in SUBSETS[alias])}
    if root.name.lower() in names and _is_subset_folder(root):
        return root
    frontier = [root]
    for _depth in range(3):
        nxt = []
        for folder in frontier:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if child.name.lower() in names and _is_subset_folder(child):
                    return child
                if child.name not in SPLITS and child.name not in LABEL_DIRS:
                    nxt.append(child)
        frontier = nxt
    archive, top = SUBSETS[alias]
    raise UserError(
        f"no folder for subset '{alias}' under {root}: expected one named {archive}, {top} or {alias} "
        f"(nested up to 3 levels) holding {layout}"
    )


@dataclass(frozen=True)
class DataSource:
    """Which files make a dataset and how they are named (stages.genimage.layouts): plain data, so
    that the plan of an extraction can travel to other processes.

    `kind`: `genimage` (a GenImage subset: `name` is its alias, found under `root`), `folders`
    (labelled folders under `root`), `pairs` (`--pair REAL_DIR FAKE_DIR[=GENERATOR]`) or `manifest`.
    `splits` keeps the files of those split folders (all when None; GenImage: train and val);
    `split` is the split of files that name none.
    """

    name: str
    kind: str = "folders"
    root: str | None = None
    pairs: tuple[tuple[str, str], ...] = ()
    manifest: str | None = None
    splits: tuple[str, ...] | None = None
    split: str | None = None
    generator: str | None = None
    real_names: tuple[str, ...] = layouts.REAL_NAMES
    fake_names: tuple[str, ...] = layouts.FAKE_NAMES

    @classmethod
    def genimage(cls, data_root: str | Path, subset: str, splits: Iterable[str] = SPLITS) -> DataSource:
        return cls(canonical_subset(subset), "genimage", str(data_root), splits=tuple(splits))

    def check(self) -> None:
        """The names and folders, checked before anything is created (a bad one is one line)."""
        layouts.check_name(self.name)
        for s in (*(self.splits or ()), *([self.split] if self.split else [])):
            if s.lower() not in layouts.SPLIT_NAMES:
                raise UserError(f"unknown split '{s}': expected one of {', '.join(layouts.SPLIT_NAMES)}")
        if self.generator is not None:
            layouts.check_name(self.generator, "--generator")
        layouts.Labels(self.real_names, self.fake_names)
        if self.kind == "genimage":
            resolve_subset_root(self.root or ".", self.name)
        elif self.kind == "folders" and not Path(self.root or "").expanduser().is_dir():
            raise UserError(f"data root not found: {self.root}")

    def listing(self) -> layouts.Listing:
        labels = layouts.Labels(self.real_names, self.fake_names)
        if self.kind == "genimage":
            root = resolve_subset_root(self.root or ".", self.name)
            found = layouts.labelled_folders(root, self.name, labels, self.splits, generator=self.name)
            # GenImage's files live in its split folders: an image elsewhere is listed, not indexed
            outside = [r.path for r in found.rows if r.path.split("/")[0].lower() not in layouts.SPLIT_NAMES]
            leave = set(outside)  # built once: a row's membership is asked for every row
            found.rows = [r for r in found.rows if r.path not in leave]
            found.unlabelled = sorted([*found.unlabelled, *outside])
            return found
        if self.kind == "pairs":
            return layouts.paired_folders(self.pairs, labels, self.split)
        if self.kind == "manifest":
            return layouts.manifest_rows(self.manifest or "", self.name, self.split)
        return layouts.labelled_folders(
            self.root or ".", self.name, labels, self.splits, self.split, self.generator
        )

    def describe(self) -> str:
        """How the files were named, in the words of the options (index attrs `layout`)."""
        if self.kind == "genimage":
            return f"GenImage subset {self.name} under {self.root}"
        if self.kind == "pairs":
            return "paired folders: " + "; ".join(f"{r} + {f}" for r, f in self.pairs)
        if self.kind == "manifest":
            return f"manifest {self.manifest}"
        return (
            f"labelled folders under {self.root} ({layouts.Labels(self.real_names, self.fake_names).said()})"
        )


@dataclass
class Index:
    """The rows of one dataset, sorted by relative path; columns are numpy arrays of equal length.

    `pairs`: generator -> the groups of the real rows that go with it (paired folders only).
    """

    subset: str  # the dataset's name (a GenImage subset's alias)
    root: str
    columns: dict[str, np.ndarray] = field(repr=False)
    pairs: dict[str, list[str]] = field(default_factory=dict)
    unlabelled: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.columns["path"])

    @property
    def fingerprint(self) -> str:
        """Hash of what the rows are (content id, path, label, split, generator, group, the pairing),
        not of how they were stat-ed. A dataset of one generator named after it and no groups (every
        GenImage subset) hashes as before those columns existed, so its caches keep their names."""
        c = self.columns
        generators, groups = generators_of(c, self.subset)
        plain = bool((generators == self.subset).all() and (groups == "").all()) and not self.pairs
        cols = [c["id"], c["path"], c["label"], c["split"]] + ([] if plain else [generators, groups])
        rows = "\n".join("\t".join(map(str, fields)) for fields in zip(*cols, strict=True))
        payload = {"stage": "index", "subset": self.subset, "rows": rows}
        return fingerprint({**payload, "pairs": self.pairs} if self.pairs else payload)

    def abspath(self, row: int) -> str:
        return os.path.join(self.root, str(self.columns["path"][row]))


def generators_of(columns: dict[str, np.ndarray], subset: str) -> tuple[np.ndarray, np.ndarray]:
    """The generator and group columns; an index written before them (schema 2) is one generator,
    its subset, with no groups."""
    n = len(columns["label"])
    gen = columns.get("generator")
    group = columns.get("group")
    return (
        np.asarray(gen, dtype=object) if gen is not None else np.full(n, subset, dtype=object),
        np.asarray(group, dtype=object) if group is not None else np.full(n, "", dtype=object),
    )


def generated_by(columns: dict[str, np.ndarray], subset: str) -> list[str]:
    """The generators of a dataset's generated rows, sorted."""
    gen, _ = generators_of(columns, subset)
    return sorted({str(g) for g in gen[np.asarray(columns["label"]) == 1]})


def reals_of(
    columns: dict[str, np.ndarray], subset: str, pairs: dict[str, list[str]], generator: str
) -> np.ndarray:
    """The real rows that go with a generator: those of its paired real folders (`--pair`), else those
    under the same generator folder, else every real row of the dataset (a manifest's `real` rows)."""
    gen, group = generators_of(columns, subset)
    real = np.asarray(columns["label"]) == 0
    if generator in pairs:
        return real & np.isin(group, pairs[generator])
    own = real & (gen == generator)
    return own if own.any() else real


def rows_of(
    columns: dict[str, np.ndarray], subset: str, pairs: dict[str, list[str]], generator: str
) -> np.ndarray:
    """A generator's generated rows and the real rows that go with it (reals_of)."""
    gen, _ = generators_of(columns, subset)
    return ((np.asarray(columns["label"]) == 1) & (gen == generator)) | reals_of(
        columns, subset, pairs, generator
    )


@functools.cache
def _standard_tables() -> np.ndarray:
    """(100, 2, 64) luminance and chrominance tables of Pillow's encoder at qualities 1..100.

    Taken from the encoder itself (an 8x8 image saved at each quality), so they are libjpeg's
    standard tables scaled exactly as the files Pillow, libjpeg and most tools write.
    """
    tables = []
    for q in range(1, 101):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="JPEG", quality=q)
        with Image.open(buf) as img:
            tables.append([list(img.quantization[k]) for k in (0, 1)])
    return np.array(tables, dtype=np.int64)


def jpeg_quality(quantization: dict[int, list[int]]) -> int:
    """The quality factor whose standard tables are nearest (sum of absolute differences) to a JPEG's.

    Exact for files written with libjpeg's standard tables (Pillow, libjpeg, ImageMagick, PIL-based
    pipelines such as ImageNet's); for other encoders (cameras with their own tables) the nearest one.
    """
    have = [np.asarray(quantization[k], dtype=np.int64) for k in sorted(quantization)[:2]]
    ref = _standard_tables()
    dist = sum(np.abs(ref[:, k] - t).sum(axis=1) for k, t in enumerate(have) if t.shape == (64,))
    return int(np.argmin(dist)) + 1


def qualities(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The jpeg_quality column; QUALITY_UNKNOWN for every row of an index written without it (schema 1)."""
    if "jpeg_quality" in columns:
        return np.asarray(columns["jpeg_quality"]).astype(np.int64)
    return np.full(len(columns["label"]), QUALITY_UNKNOWN, dtype=np.int64)


def _kind(fmt: object, quality: int) -> str:
    return str(fmt) if fmt != "jpeg" else f"jpeg q{quality}" if quality > 0 else "jpeg q?"


def format_mix(columns: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Rows per class (`real`, `generated`) and per source format: `png`, `jpeg q95`, `jpeg q?` (unknown)."""
    quality = qualities(columns)
    out: dict[str, dict[str, int]] = {}
    for label, fmt, q in zip(columns["label"], columns["format"], quality, strict=True):
        kind = _kind(fmt, q)
        mix = out.setdefault("generated" if label else "real", {})
        mix[kind] = mix.get(kind, 0) + 1
    return out


def format_table(columns: dict[str, np.ndarray], subset: str) -> dict[str, dict[str, dict[str, int]]]:
    """Rows per generator x class x source format (`cache info`): a generator's row count by class and
    format, the real rows under the generator they are filed under (`real` for shared reals)."""
    gen, _ = generators_of(columns, subset)
    out: dict[str, dict[str, dict[str, int]]] = {}
    for g in sorted({str(x) for x in gen}):
        mine = gen == g
        out[g] = format_mix(
            {k: np.asarray(v)[mine] for k, v in columns.items() if k in ("label", "format", "jpeg_quality")}
        )
    return out


def _dominant(formats: np.ndarray) -> tuple[str, float]:
    kinds, counts = np.unique(formats.astype(str), return_counts=True)
    k = int(np.argmax(counts))
    return str(kinds[k]), float(counts[k] / counts.sum())


def format_shortcut(columns: dict[str, np.ndarray]) -> str | None:
    """One line when a dataset's real and generated files are mostly of different formats: a detector
    can then learn the format, not the generator ("Fake or JPEG?", Grommelt et al. 2024); None when
    their most common formats agree, or one class is absent."""
    labels = np.asarray(columns["label"])
    formats = np.asarray(columns["format"], dtype=object)
    if not ((labels == 0).any() and (labels == 1).any()):
        return None
    (real, r), (fake, f) = _dominant(formats[labels == 0]), _dominant(formats[labels == 1])
    if real == fake:
        return None
    return (
        f"warning: the real files are {100 * r:.0f}% {real}, the generated {100 * f:.0f}% {fake}: a detector "
        "can learn the file format instead of the generator (Fake or JPEG?); `cache info` shows the mix, "
        "`--perturb jpeg:96 --perturb-only generated` and `train --real-jpeg-quality` control it"
    )


Described = tuple[str, str, int, int, int]  # (id, format, width, height, JPEG quality) of one file


def _describe(path: Path) -> Described:
    """(id, format, width, height, JPEG quality) of one file; the header only, pixels are decoded later."""
    data = path.read_bytes()
    image_id = xxhash.xxh3_128_hexdigest(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "unknown").lower()
            quality = jpeg_quality(img.quantization) if fmt == "jpeg" and img.quantization else NOT_JPEG
            return image_id, fmt, img.width, img.height, quality
    except Exception:  # noqa: BLE001 - any unreadable header is recorded, extraction gives the reason
        return image_id, "unknown", -1, -1, NOT_JPEG


def list_files(source: DataSource) -> layouts.Listing:
    """The dataset's labelled files (no file is opened but a manifest), checked: none at all is one
    line naming the folder names looked for; images under no label folder are said, and listed by
    `cache info`. Extraction calls it before creating anything."""
    source.check()
    listing = source.listing()
    if not listing.rows:
        where = f"under {source.root}" if source.kind != "manifest" else f"in {source.manifest}"
        kept = f" in split(s) {', '.join(source.splits)}" if source.splits else ""
        raise UserError(
            f"no labelled image files {where}{kept}: a file's label is its nearest folder named "
            f"{layouts.Labels(source.real_names, source.fake_names).said()} (case-insensitive; "
            "--real-names/--fake-names change them)"
        )
    if listing.unlabelled:
        shown = ", ".join(listing.unlabelled[:3])
        logger.info(
            f"index: {len(listing.unlabelled)} image(s) under no label folder ({shown}"
            f"{', ...' if len(listing.unlabelled) > 3 else ''}) are not indexed; `cache info` lists them"
        )
    if listing.skipped:
        logger.info(
            f"index: skipped {listing.skipped} file(s) without an image suffix "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return listing


def _known(previous: Index | None, root: Path) -> dict[str, tuple[int, int, Described]]:
    """path -> (size, mtime_ns, description) of each file `previous` indexed under the same root; none
    from an index older than the JPEG quality column (its rows are described again)."""
    if previous is None or previous.root != str(root) or "jpeg_quality" not in previous.columns:
        return {}
    pc = previous.columns
    return {
        str(rel): (
            int(pc["size"][j]),
            int(pc["mtime_ns"][j]),
            (
                str(pc["id"][j]),
                str(pc["format"][j]),
                int(pc["width"][j]),
                int(pc["height"][j]),
                int(pc["jpeg_quality"][j]),
            ),
        )
        for j, rel in enumerate(pc["path"])
    }


def _describe_all(
    root: Path,
    files: list[layouts.FileRow],
    stats: list[os.stat_result],
    known: dict[str, tuple[int, int, Described]],
    threads: int,
    progress: str | None,
) -> list[Described]:
    """Each file's description: a known one where its size and mtime are unchanged, else read on
    `threads` threads (`progress`: the bar's title, None for no bar)."""
    described: list[Described | None] = [None] * len(files)
    todo = []
    for k, (f, st) in enumerate(zip(files, stats, strict=True)):
        hit = known.get(f.path)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            described[k] = hit[2]
        else:
            todo.append(k)
    if todo:
        with ThreadPoolExecutor(threads) as pool:
            results = pool.map(lambda k: _describe(root / files[k].path), todo)
            bar = tqdm(results, total=len(todo), desc=progress, unit="file", disable=progress is None)
            for k, desc in zip(todo, bar, strict=True):
                described[k] = desc
    return cast(list[Described], described)  # every row, known or described


def _columns(
    files: list[layouts.FileRow], stats: list[os.stat_result], described: list[Described]
) -> dict[str, np.ndarray]:
    """The index's columns (cache_schema.md), one row per file."""
    return {
        "id": np.array([d[0] for d in described], dtype=object),
        "path": np.array([f.path for f in files], dtype=object),
        "label": np.array([f.label for f in files], dtype=np.uint8),
        "split": np.array([f.split for f in files], dtype=object),
        "generator": np.array([f.generator for f in files], dtype=object),
        "group": np.array([f.group for f in files], dtype=object),
        "format": np.array([d[1] for d in described], dtype=object),
        "width": np.array([d[2] for d in described], dtype=np.int32),
        "height": np.array([d[3] for d in described], dtype=np.int32),
        "jpeg_quality": np.array([d[4] for d in described], dtype=np.int16),
        "size": np.array([st.st_size for st in stats], dtype=np.int64),
        "mtime_ns": np.array([st.st_mtime_ns for st in stats], dtype=np.int64),
    }


def scan(
    source: DataSource,
    previous: Index | None = None,
    threads: int = 16,
    progress: bool = True,
    listing: layouts.Listing | None = None,
) -> Index:
    """Build the index of a dataset; files unchanged since `previous` (size, mtime) are not re-read.
    `listing`: its files, when list_files already listed them."""
    listing = listing or list_files(source)
    root, files = listing.root, listing.rows
    stats = [os.stat(root / f.path) for f in files]
    bar = f"index {source.name}" if progress else None
    described = _describe_all(root, files, stats, _known(previous, root), threads, bar)
    return Index(source.name, str(root), _columns(files, stats, described), listing.pairs, listing.unlabelled)
