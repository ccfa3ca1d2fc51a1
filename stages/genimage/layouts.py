"""How a dataset names its files: three rules that cover the layouts of the field's datasets.

GenImage was the first dataset, so this package carries its name; GenImage is now one case of the
first rule. The rules, after `../shared/datasets.md` (each dataset's layout as its own repository
lays it out):

- **Labelled folders** (`--data-root DIR`): a file's label is its NEAREST ancestor folder whose whole
  name, case-insensitive, is a real name (`0_real`, `real`, `nature`) or a generated name (`1_fake`,
  `fake`, `ai`). Among the folders between the root and that label folder, one named `train`, `val`
  or `test` is the split; the first of the others is the generator, deeper ones a group (ForenSynths'
  object class, an archive folder). `--generator` names the generator instead, and then every
  non-split folder there is the group. Images under no label folder are counted and listed, never
  silently dropped. Matched on whole names, not SIDBench's substring test.
- **Paired folders** (`--pair REAL_DIR FAKE_DIR[=GENERATOR]`, repeatable): every file of a folder
  takes its folder's label; one real folder may serve several generators (UnivFD pairs LAION's reals
  with seven) and is listed once.
- **Manifest** (`--manifest FILE`, CSV, TSV or JSONL): a row per file, `path` relative to the
  manifest's folder.

Each rule gives every file a split (its folder's, the manifest's, else `--split`, else `test`), a
generator and a group. A dataset with no generator folders is one generator, named after the dataset.
The listing is plain data: the index stage (stages.genimage.index) reads the files' headers.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline.errors import UserError

SPLIT_NAMES = ("train", "val", "test")
REAL_NAMES = ("0_real", "real", "nature")
FAKE_NAMES = ("1_fake", "fake", "ai")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
DEFAULT_SPLIT = "test"  # a folder of a benchmark, or of one's own, is a test set unless it says otherwise
REAL_GENERATOR = "real"  # the generator of real rows that serve any generator (pairs, manifests)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MANIFEST_ALIASES = {
    "path": ("path", "filename", "imagepath", "image_path"),
    "label": ("label",),
    "split": ("split",),
    "generator": ("generator", "typ", "model_name", "generatorname"),
    "group": ("group",),
}
LABEL_WORDS = {"0": 0, "1": 1, "real": 0, "fake": 1, "nature": 0, "ai": 1}


def check_name(name: str, what: str = "--dataset") -> str:
    """A dataset (or generator) name: letters, digits, `-`, `_`, `.`; it names a folder of the cache."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{what} '{name}': use letters, digits, '-', '_' and '.' only")
    return name


@dataclass(frozen=True)
class FileRow:
    path: str  # relative to the listing's root, '/'-separated
    label: int  # 1 generated, 0 real
    split: str
    generator: str
    group: str = ""


@dataclass
class Listing:
    """The labelled image files of a dataset, sorted by path, and what was left out and why."""

    root: Path
    rows: list[FileRow]
    skipped: int = 0  # files without an image suffix
    unlabelled: list[str] = field(default_factory=list)  # images under no label folder (relative paths)
    pairs: dict[str, list[str]] = field(default_factory=dict)  # generator -> groups of its reals (--pair)


@dataclass(frozen=True)
class Labels:
    """The folder names that label a file (`--real-names`, `--fake-names`), compared case-insensitively."""

    real: tuple[str, ...] = REAL_NAMES
    fake: tuple[str, ...] = FAKE_NAMES

    def __post_init__(self) -> None:
        both = {n.lower() for n in self.real} & {n.lower() for n in self.fake}
        if both:
            raise UserError(f"'{sorted(both)[0]}' is both a real and a generated folder name")

    @functools.cached_property
    def _labels(self) -> dict[str, int]:  # asked once per folder of every file: built once
        return {n.lower(): 0 for n in self.real} | {n.lower(): 1 for n in self.fake}

    def of(self, folder: str) -> int | None:
        """The label a folder's name gives, or None."""
        return self._labels.get(folder.lower())

    def said(self) -> str:
        return f"real: {', '.join(self.real)}; generated: {', '.join(self.fake)}"


def _walk(top: Path) -> Iterable[tuple[Path, list[str]]]:
    """(folder, file names) under `top`, hidden entries skipped, symlinked folders followed once each."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), [f for f in filenames if not f.startswith(".")]


def _images(top: Path, root: Path) -> tuple[list[str], int]:
    """Relative paths (to `root`) of the images under `top`, and how many other files were there."""
    found, skipped = [], 0
    for folder, names in _walk(top):
        for name in names:
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
                continue
            found.append(PurePosixPath(os.path.relpath(folder / name, root)).as_posix())
    return found, skipped


def _fallback_split(splits: tuple[str, ...] | None, split: str | None) -> str:
    if split is not None:
        return _check_split(split)
    return splits[0] if splits and len(splits) == 1 else DEFAULT_SPLIT


def _check_split(split: str) -> str:
    if split.lower() not in SPLIT_NAMES:
        raise UserError(f"unknown split '{split}': expected one of {', '.join(SPLIT_NAMES)}")
    return split.lower()


def labelled_folders(
    root: str | Path,
    default_generator: str,
    labels: Labels = Labels(),  # noqa: B008 - frozen, never mutated
    splits: tuple[str, ...] | None = None,
    split: str | None = None,
    generator: str | None = None,
) -> Listing:
    """The labelled-folder rule (module docstring) over `root`. `splits`: keep only the files in split
    folders of these splits (all when None); files outside split folders take `split` (else the one
    `splits` value, else `test`)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    keep = {_check_split(s) for s in splits} if splits else None
    fallback = _fallback_split(splits, split)
    paths, skipped = _images(root, root)
    rows, unlabelled = [], []
    for rel in paths:
        folders = rel.split("/")[:-1]
        at = next((k for k in range(len(folders) - 1, -1, -1) if labels.of(folders[k]) is not None), None)
        if at is None:
            unlabelled.append(rel)
            continue
        above = folders[:at]
        named = [f.lower() for f in above if f.lower() in SPLIT_NAMES]
        others = [f for f in above if f.lower() not in SPLIT_NAMES]
        file_split = named[0] if named else fallback
        if named and keep is not None and file_split not in keep:
            continue
        if generator is not None:
            gen, group = generator, "/".join(others)
        else:
            gen, group = (others[0], "/".join(others[1:])) if others else (default_generator, "")
        rows.append(FileRow(rel, int(labels.of(folders[at]) or 0), file_split, gen, group))
    rows.sort(key=lambda r: r.path)
    return Listing(root, rows, skipped, sorted(unlabelled))


def _generator_of(fake_dir: Path, labels: Labels) -> str:
    """A fake folder's generator when `=GENERATOR` is not given: its nearest name that is neither a
    label nor a split folder (`ldm_200/1_fake` -> ldm_200)."""
    for part in reversed(fake_dir.parts):
        if labels.of(part) is None and part.lower() not in SPLIT_NAMES:
            return part
    return fake_dir.name


def paired_folders(
    pairs: Iterable[tuple[str, str]],
    labels: Labels = Labels(),  # noqa: B008 - frozen, never mutated
    split: str | None = None,
) -> Listing:
    """The paired-folder rule: `pairs` of (REAL_DIR, FAKE_DIR[=GENERATOR]). Real folders are listed
    once however many generators they serve; their rows carry the generator `real` and, as their
    group, the folder (relative to the root), which `pairs` maps each generator to."""
    parsed = []
    for real_dir, fake_arg in pairs:
        fake_dir, sep, gen = fake_arg.partition("=")
        for d in (real_dir, fake_dir):
            if not Path(d).expanduser().is_dir():
                raise UserError(f"--pair: folder not found: {d}")
        name = check_name(gen, "--pair generator") if sep else _generator_of(Path(fake_dir), labels)
        parsed.append(
            (
                Path(os.path.abspath(Path(real_dir).expanduser())),
                Path(os.path.abspath(Path(fake_dir).expanduser())),
                name,
            )
        )
    if not parsed:
        raise UserError("--pair needs REAL_DIR FAKE_DIR[=GENERATOR]")
    root = Path(os.path.commonpath([str(d) for r, f, _ in parsed for d in (r, f)]))
    the_split = _fallback_split(None, split)
    rows: dict[str, FileRow] = {}
    skipped = 0
    out_pairs: dict[str, list[str]] = {}
    fakes_of: dict[Path, str] = {}
    for real, fake, gen in parsed:
        if fakes_of.setdefault(fake, gen) != gen:
            raise UserError(f"--pair: {fake} is given as two generators, {fakes_of[fake]} and {gen}")
        group = PurePosixPath(os.path.relpath(real, root)).as_posix()
        if group not in out_pairs.setdefault(gen, []):
            out_pairs[gen].append(group)
    reals = dict.fromkeys(r for r, _, _ in parsed)
    for folder, label, gen, group in [
        *((r, 0, REAL_GENERATOR, PurePosixPath(os.path.relpath(r, root)).as_posix()) for r in reals),
        *((f, 1, g, "") for f, g in fakes_of.items()),
    ]:
        paths, n = _images(folder, root)
        skipped += n
        for rel in paths:
            if rel in rows and rows[rel].label != label:
                raise UserError(f"--pair: {rel} is in a real and in a generated folder")
            rows.setdefault(rel, FileRow(rel, label, the_split, gen, group))
    return Listing(root, sorted(rows.values(), key=lambda r: r.path), skipped, [], out_pairs)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV, TSV or JSONL file as dicts of text, keys lower-cased."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if not all(isinstance(x, dict) for x in lines):
                raise UserError(f"{path}: every line of a JSONL manifest must be an object")
            return [{str(k).lower(): "" if v is None else str(v) for k, v in x.items()} for x in lines]
        if suffix not in (".csv", ".tsv", ".txt"):
            raise UserError(f"--manifest {path}: expected a .csv, .tsv or .jsonl file")
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, ValueError, csv.Error) as e:
        raise UserError(f"--manifest {path}: cannot be read ({e})") from None


def manifest_rows(manifest: str | Path, default_generator: str, split: str | None = None) -> Listing:
    """The manifest rule: columns `path` (alias filename), `label` (0/1, real/fake, nature/ai, any
    case; absent: generator != real), optional `split`, `generator` (aliases typ, model_name) and
    `group`. Any row naming a missing file, an unknown label or split, or a path leaving the manifest's
    folder refuses the whole manifest in one line (nothing is written)."""
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise UserError(f"--manifest not found: {path}")
    root = Path(os.path.abspath(path.parent))
    records = _read_manifest(path)
    if not records:
        raise UserError(f"--manifest {path} has no rows")
    have = set(records[0])
    column = {k: next((a for a in aliases if a in have), None) for k, aliases in MANIFEST_ALIASES.items()}
    if column["path"] is None:
        raise UserError(
            f"--manifest {path}: no 'path' (or 'filename') column; it has {', '.join(sorted(have))}"
        )
    if column["label"] is None and column["generator"] is None:
        raise UserError(
            f"--manifest {path}: needs a 'label' column, or a 'generator' (typ) column with 'real'"
        )
    fallback = _fallback_split(None, split)
    bad: list[str] = []
    rows: dict[str, FileRow] = {}
    for n, rec in enumerate(records, start=2 if path.suffix.lower() != ".jsonl" else 1):
        rel = rec.get(column["path"] or "", "").replace("\\", "/")
        gen = rec.get(column["generator"] or "", "") or default_generator
        where = f"row {n} ({rel or 'no path'})"
        target = os.path.normpath(os.path.join(root, rel)) if rel else ""
        if not rel or os.path.isabs(rel) or not target.startswith(str(root) + os.sep):
            bad.append(f"{where}: the path leaves the manifest's folder")
            continue
        if column["label"] is not None:
            label = LABEL_WORDS.get(rec.get(column["label"], "").lower())
        else:
            label = 0 if gen.lower() == REAL_GENERATOR else 1
        if label is None:
            bad.append(f"{where}: unknown label '{rec.get(column['label'] or '', '')}'")
            continue
        the_split = (rec.get(column["split"] or "", "") or fallback).lower()
        if the_split not in SPLIT_NAMES:
            bad.append(f"{where}: unknown split '{the_split}'")
            continue
        if not os.path.isfile(target):
            bad.append(f"{where}: no such file")
            continue
        key = PurePosixPath(os.path.relpath(target, root)).as_posix()
        if key in rows:
            bad.append(f"{where}: listed twice")
            continue
        rows[key] = FileRow(key, label, the_split, gen, rec.get(column["group"] or "", ""))
    if bad:
        raise UserError(
            f"--manifest {path}: {len(bad)} bad row(s), nothing written: {'; '.join(bad[:3])}"
            + (" ..." if len(bad) > 3 else "")
        )
    return Listing(root, sorted(rows.values(), key=lambda r: r.path))
