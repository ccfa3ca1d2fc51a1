"""Index stage: one row per image of a GenImage subset, with a content id that never changes.

The id is xxh3-128 of the file's bytes, so everything keyed by it (the noise drawn for an image,
a row's identity across caches) follows the content, not the file name or the scan order.

Each JPEG's quality factor is estimated from its quantization tables: GenImage's real images are
JPEGs and most generated ones PNGs, so a detector can learn the format instead of the generator
("Fake or JPEG?", Grommelt et al. 2024); the column lets training hold real images to one quality.
"""

from __future__ import annotations

import functools
import io
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
SPLITS = ("train", "val")
# label folder -> label (1 generated, 0 real); GenImage's names and the {0_real,1_fake} re-arrangement
LABEL_DIRS = {"ai": 1, "nature": 0, "1_fake": 1, "0_real": 0}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
COLUMNS = ("id", "path", "label", "split", "format", "width", "height", "jpeg_quality", "size", "mtime_ns")
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


@dataclass
class Index:
    """The rows of one subset, sorted by relative path; columns are numpy arrays of equal length."""

    subset: str
    root: str
    columns: dict[str, np.ndarray] = field(repr=False)

    def __len__(self) -> int:
        return len(self.columns["path"])

    @property
    def fingerprint(self) -> str:
        """Hash of what the rows are (content id, path, label, split), not of how they were stat-ed."""
        c = self.columns
        rows = "\n".join(
            f"{i}\t{p}\t{lab}\t{s}"
            for i, p, lab, s in zip(c["id"], c["path"], c["label"], c["split"], strict=True)
        )
        return fingerprint({"stage": "index", "subset": self.subset, "rows": rows})

    def abspath(self, row: int) -> str:
        return os.path.join(self.root, str(self.columns["path"][row]))


def _list_files(subset_root: Path, splits: Iterable[str]) -> tuple[list[tuple[str, int, str]], int]:
    """(relative path, label, split) of every image file; also how many non-image files were skipped."""
    found: list[tuple[str, int, str]] = []
    skipped = 0
    for split in splits:
        for label_dir, label in LABEL_DIRS.items():
            top = subset_root / split / label_dir
            if not top.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if name.startswith("."):
                        continue
                    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                        skipped += 1
                        continue
                    rel = Path(dirpath, name).relative_to(subset_root).as_posix()
                    found.append((rel, label, split))
    found.sort()
    return found, skipped


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


def format_mix(columns: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Rows per class (`real`, `generated`) and per source format: `png`, `jpeg q95`, `jpeg q?` (unknown)."""
    quality = qualities(columns)
    out: dict[str, dict[str, int]] = {}
    for label, fmt, q in zip(columns["label"], columns["format"], quality, strict=True):
        kind = str(fmt) if fmt != "jpeg" else f"jpeg q{q}" if q > 0 else "jpeg q?"
        mix = out.setdefault("generated" if label else "real", {})
        mix[kind] = mix.get(kind, 0) + 1
    return out


def _describe(path: Path) -> tuple[str, str, int, int, int]:
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


def scan(
    data_root: str | Path,
    subset: str,
    splits: Iterable[str] = SPLITS,
    previous: Index | None = None,
    threads: int = 16,
    progress: bool = True,
    log=print,
) -> Index:
    """Build the index of one subset; files unchanged since `previous` (size, mtime) are not re-read."""
    alias = canonical_subset(subset)
    splits = tuple(splits)
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"unknown split '{s}': expected train and/or val")
    root = resolve_subset_root(data_root, alias)
    files, skipped = _list_files(root, splits)
    if not files:
        raise UserError(f"no image files under {root} for split(s) {', '.join(splits)}")
    if skipped:
        log(f"index: skipped {skipped} file(s) without an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))})")

    stats = [os.stat(root / rel) for rel, _, _ in files]
    known: dict[str, tuple] = {}
    if previous is not None and previous.root == str(root) and "jpeg_quality" in previous.columns:
        pc = previous.columns
        for j, rel in enumerate(pc["path"]):
            known[str(rel)] = (
                int(pc["size"][j]),
                int(pc["mtime_ns"][j]),
                (
                    str(pc["id"][j]),
                    str(pc["format"][j]),
                    int(pc["width"][j]),
                    int(pc["height"][j]),
                    int(pc["jpeg_quality"][j]),
                ),  # fmt: skip
            )
    described: list[tuple[str, str, int, int, int] | None] = [None] * len(files)
    todo = []
    for k, ((rel, _, _), st) in enumerate(zip(files, stats, strict=True)):
        hit = known.get(rel)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            described[k] = hit[2]
        else:
            todo.append(k)
    if todo:
        with ThreadPoolExecutor(threads) as pool:
            results = pool.map(lambda k: _describe(root / files[k][0]), todo)
            bar = tqdm(results, total=len(todo), desc=f"index {alias}", unit="file", disable=not progress)
            for k, desc in zip(todo, bar, strict=True):
                described[k] = desc

    done = cast(list[tuple[str, str, int, int, int]], described)  # every row, known or described
    columns = {
        "id": np.array([d[0] for d in done], dtype=object),
        "path": np.array([f[0] for f in files], dtype=object),
        "label": np.array([f[1] for f in files], dtype=np.uint8),
        "split": np.array([f[2] for f in files], dtype=object),
        "format": np.array([d[1] for d in done], dtype=object),
        "width": np.array([d[2] for d in done], dtype=np.int32),
        "height": np.array([d[3] for d in done], dtype=np.int32),
        "jpeg_quality": np.array([d[4] for d in done], dtype=np.int16),
        "size": np.array([st.st_size for st in stats], dtype=np.int64),
        "mtime_ns": np.array([st.st_mtime_ns for st in stats], dtype=np.int64),
    }
    return Index(subset=alias, root=str(root), columns=columns)
