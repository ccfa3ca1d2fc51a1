"""ImageNet classes of GenImage files and the text prompts built from them, as the LaRE reference does.

The reference (docs/REFERENCE_NOTES.md, "Class parsing") reads the class from the file name's text before
the first `_`:
  (a) at most 3 characters: a class index (generated images, `123_sdv4_00001.png`);
  (b) `ILSVRC2012`: an ImageNet validation file (`ILSVRC2012_val_00042597.JPEG`), its class from the
      validation ground truth;
  (c) `GLIDE` or `VQDM`: the class index is the 5th `_`-separated field
      (`GLIDE_1000_200_08_808_glide_00138.png` -> 808);
  (d) otherwise a synset id (`n01440764_10026.JPEG`).
The class's text is the FIRST comma-separated name of the standard 1000-class label list
("hammerhead", "cock", "robin"). Where the reference raises (no rule fits), we use the fixed prompt
and count the file.

The tables are package data derived from the reference's `anns/` files (Apache-2.0, LaRE
repository, `stages/data/LICENSE-lare-anns`):
  data/imagenet_classes.tsv        line k: `<synset>\t<first name>` of class k
  data/imagenet_val_classes.txt.gz line n: the class index of `ILSVRC2012_val_<n:08d>.JPEG`
Their bytes enter the LaRE fingerprint (`tables_hash`): a corrected table gives new artifacts.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

CODE_ID = "stages.classes"  # the name its code is hashed under, wherever the file lives

CLASS_TABLE = "data/imagenet_classes.tsv"
VAL_TABLE = "data/imagenet_val_classes.txt.gz"
N_VAL = 50_000


def _read(name: str) -> bytes:
    return resources.files("stages").joinpath(name).read_bytes()


@cache
def _tables() -> tuple[list[str], list[str], dict[str, int], list[int]]:
    """(synset of each class, first name of each class, synset -> class, class of each val file)."""
    pairs = [line.split("\t") for line in _read(CLASS_TABLE).decode().splitlines() if line]
    synsets = [w for w, _ in pairs]
    names = [n for _, n in pairs]
    val = [int(x) for x in gzip.decompress(_read(VAL_TABLE)).decode().split()]
    if len(names) != 1000 or len(val) != N_VAL:
        raise RuntimeError("the packaged ImageNet class tables are damaged; reinstall the package")
    return synsets, names, {w: k for k, w in enumerate(synsets)}, val


def synsets() -> list[str]:
    """Synset id of each of the 1000 classes, in class-index order."""
    return list(_tables()[0])


def names() -> list[str]:
    """The reference's class text of each of the 1000 classes (first name of the label list)."""
    return list(_tables()[1])


@cache
def tables_hash() -> str:
    """sha256 over the packaged tables' bytes: part of the LaRE fingerprint."""
    h = hashlib.sha256()
    for name in (CLASS_TABLE, VAL_TABLE):
        h.update(name.encode() + b"\0" + _read(name) + b"\0")
    return h.hexdigest()


def _index(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < 1000 else None


def class_index(path: str | os.PathLike) -> int | None:
    """The ImageNet class index of a GenImage file by the reference's four rules, or None."""
    name = os.path.basename(str(path))
    fields = name.split("_")
    prefix = fields[0]
    if prefix == "ILSVRC2012":
        stem = name.split(".")[0]  # ILSVRC2012_val_00042597
        if stem.startswith("ILSVRC2012_val_") and stem[15:].isdigit() and 1 <= int(stem[15:]) <= N_VAL:
            return _tables()[3][int(stem[15:]) - 1]
        return None
    if prefix in ("GLIDE", "VQDM"):
        return _index(fields[4]) if len(fields) > 4 else None
    if len(prefix) <= 3:
        return _index(prefix)
    return _tables()[2].get(prefix)


def class_name(path: str | os.PathLike) -> str | None:
    """The class text the reference puts in its prompt template, or None when no rule fits."""
    k = class_index(path)
    return None if k is None else _tables()[1][k]


def prompts_for(
    prompt: str, template: str | None, paths: Sequence[str | Path] | np.ndarray
) -> tuple[list[str], np.ndarray, list[int]]:
    """Distinct prompts, each row's prompt index, and the rows whose name holds no class.

    The one rule for extraction and detection: the template filled with the class of the file name,
    or the fixed prompt when there is no template or no class (the reference raises there).
    """
    if template is None:
        return [prompt], np.zeros(len(paths), dtype=np.int64), []
    texts, missing = [], []
    for row, p in enumerate(paths):
        cls = class_name(p)
        if cls is None:
            missing.append(row)
            texts.append(prompt)
        else:
            texts.append(template.format(cls=cls))
    prompts = sorted(set(texts))
    lookup = {t: i for i, t in enumerate(prompts)}
    return prompts, np.array([lookup[t] for t in texts], dtype=np.int64), missing
