"""The three rules that name a dataset's files (stages/genimage/layouts.py), on trees of each shape."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.errors import UserError
from pipeline.fingerprint import fingerprint
from stages.genimage import index, layouts
from stages.genimage.synthetic import make_genimage
from tests.helpers import make_folder


def _rows(listing: layouts.Listing) -> dict[str, tuple]:
    return {r.path: (r.label, r.split, r.generator, r.group) for r in listing.rows}


def test_labelled_folders_nearest_label_wins_any_case_split_generator_and_group(tmp_path):
    make_folder(tmp_path / "train" / "genA" / "REAL", 1, False, 1)
    make_folder(tmp_path / "train" / "genA" / "Fake", 1, True, 2)
    make_folder(tmp_path / "genB" / "cat" / "fake" / "x" / "0_Real", 1, False, 3)  # nearest: 0_Real
    make_folder(tmp_path / "Test" / "genB" / "cat" / "1_FAKE", 1, True, 4)
    make_folder(tmp_path / "loose", 2, False, 5)  # under no label folder: listed, not indexed
    (tmp_path / "notes.txt").write_text("not an image")
    got = layouts.labelled_folders(tmp_path, "mine")
    rows = sorted(_rows(got).values(), key=str)
    assert rows == sorted(
        [
            (0, "train", "genA", ""),
            (1, "train", "genA", ""),
            (0, "test", "genB", "cat/fake/x"),  # no split folder: test; deeper folders are the group
            (1, "test", "genB", "cat"),  # `Test` is the split whatever its case
        ],
        key=str,
    )
    assert len(got.unlabelled) == 2 and all(p.startswith("loose/") for p in got.unlabelled)
    assert got.skipped == 1
    # --split keeps those split folders, and is the split of files in none
    kept = layouts.labelled_folders(tmp_path, "mine", splits=("val",))
    assert {r[1] for r in _rows(kept).values()} == {"val"} and len(kept.rows) == 1
    # --generator names every file's generator; the other folders become the group
    forced = layouts.labelled_folders(tmp_path, "mine", generator="progan")
    assert {r.generator for r in forced.rows} == {"progan"}
    assert {r.group for r in forced.rows} == {"genA", "genB/cat/fake/x", "genB/cat"}


def test_no_generator_folder_means_the_dataset_and_other_label_names(tmp_path):
    make_folder(tmp_path / "real", 1, False, 1)
    make_folder(tmp_path / "synthetic", 1, True, 2)
    default = layouts.labelled_folders(tmp_path, "flux")
    assert [(r.label, r.generator) for r in default.rows] == [(0, "flux")] and len(default.unlabelled) == 1
    named = layouts.labelled_folders(tmp_path, "flux", layouts.Labels(("real",), ("synthetic",)))
    assert sorted((r.label, r.generator) for r in named.rows) == [(0, "flux"), (1, "flux")]
    with pytest.raises(UserError, match="both a real and a generated folder name"):
        layouts.Labels(("real", "x"), ("X",))


def test_a_symlinked_folder_is_followed_once(tmp_path):
    make_folder(tmp_path / "elsewhere" / "1_fake", 2, True, 1)
    make_folder(tmp_path / "data" / "gen" / "0_real", 2, False, 2)
    os.symlink(tmp_path / "elsewhere" / "1_fake", tmp_path / "data" / "gen" / "1_fake")
    os.symlink(tmp_path / "data", tmp_path / "data" / "gen" / "loop")  # a cycle: not walked again
    got = layouts.labelled_folders(tmp_path / "data", "d")
    assert sorted((r.label, r.generator) for r in got.rows) == [(0, "gen")] * 2 + [(1, "gen")] * 2
    assert all(r.path.startswith("gen/") for r in got.rows)


def test_one_real_folder_paired_with_three_generators_is_listed_once(tmp_path):
    make_folder(tmp_path / "laion" / "0_real", 3, False, 1)
    for k, gen in enumerate(("ldm_200", "glide_100_27", "dalle")):
        make_folder(tmp_path / gen / "1_fake", 2, True, 10 + k)
    pairs = [(str(tmp_path / "laion" / "0_real"), str(tmp_path / g / "1_fake")) for g in ("ldm_200", "dalle")]
    pairs.append((str(tmp_path / "laion" / "0_real"), f"{tmp_path / 'glide_100_27' / '1_fake'}=glide"))
    got = layouts.paired_folders(pairs)
    assert got.root == tmp_path
    reals = [r for r in got.rows if r.label == 0]
    assert len(reals) == 3 and {(r.generator, r.group) for r in reals} == {("real", "laion/0_real")}
    assert sorted({r.generator for r in got.rows if r.label}) == ["dalle", "glide", "ldm_200"]
    assert got.pairs == {g: ["laion/0_real"] for g in ("ldm_200", "dalle", "glide")}
    assert {r.split for r in got.rows} == {"test"}
    with pytest.raises(UserError, match="folder not found"):
        layouts.paired_folders([(str(tmp_path / "nope"), str(tmp_path / "dalle" / "1_fake"))])


def test_a_manifest_csv_or_jsonl_with_aliases(tmp_path):
    files = make_folder(tmp_path / "imgs", 4, False, 1)
    (tmp_path / "list.csv").write_text(
        "filename,typ,split\n"
        + "".join(f"imgs/{p.name},{t},{s}\n" for p, t, s in zip(files, ["real", "dalle3", "real", "firefly"],
                                                              ["train", "train", "", "TEST"], strict=True))
    )  # fmt: skip
    got = layouts.manifest_rows(tmp_path / "list.csv", "wild")
    assert [(r.label, r.split, r.generator) for r in got.rows] == [
        (0, "train", "real"), (1, "train", "dalle3"), (0, "test", "real"), (1, "test", "firefly"),
    ]  # fmt: skip
    labels = ["REAL", "1", "nature", "AI"]
    lines = [
        json.dumps({"path": f"imgs/{p.name}", "label": lab}) for p, lab in zip(files, labels, strict=True)
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    got = layouts.manifest_rows(tmp_path / "m.jsonl", "wild", split="val")
    assert [(r.label, r.split, r.generator) for r in got.rows] == [(0, "val", "wild"), (1, "val", "wild")] * 2


def test_a_manifest_with_bad_rows_is_refused_in_one_line_naming_them(tmp_path):
    (good,) = make_folder(tmp_path / "in", 1, False, 1)
    (tmp_path / "outside.png").write_bytes(good.read_bytes())
    (tmp_path / "in" / "m.csv").write_text(
        f"path,label\n{good.name},0\nmissing.png,1\n{good.name},maybe\n../outside.png,0\n/etc/passwd,0\n"
    )
    with pytest.raises(UserError) as e:
        layouts.manifest_rows(tmp_path / "in" / "m.csv", "d")
    line = str(e.value)
    assert "\n" not in line and "4 bad row(s), nothing written" in line
    assert "row 3 (missing.png): no such file" in line and "unknown label 'maybe'" in line
    assert "leaves the manifest's folder" in line


def test_genimage_index_fingerprints_are_those_of_schema_2(tmp_path):
    """A GenImage subset (one generator, its alias; no group) hashes id/path/label/split as before the
    generator column existed, so every GenImage cache keeps its artifacts' fingerprints."""
    make_genimage(tmp_path, "adm", {"train": 2, "val": 1}, seed=1)
    idx = index.scan(index.DataSource.genimage(tmp_path, "adm"), progress=False)
    c = idx.columns
    lines = "\n".join(
        f"{i}\t{p}\t{lab}\t{s}"
        for i, p, lab, s in zip(c["id"], c["path"], c["label"], c["split"], strict=True)
    )
    assert idx.fingerprint == fingerprint({"stage": "index", "subset": "adm", "rows": lines})
    assert set(c["generator"]) == {"adm"} and set(c["group"]) == {""}
    # any other generator or group is hashed: a different naming of the same files is another index
    c["generator"] = c["generator"].copy()
    c["generator"][0] = "other"
    assert idx.fingerprint != fingerprint({"stage": "index", "subset": "adm", "rows": lines})
