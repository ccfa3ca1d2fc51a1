from pathlib import Path

import pytest
import xxhash

from pipeline.errors import UserError
from stages.genimage import index
from stages.genimage.synthetic import make_genimage
from tests.helpers import lines_said, run_cli


def test_every_alias_maps_to_its_genimage_folder(tmp_path):
    expected = {
        "adm": "imagenet_ai_0508_adm",
        "biggan": "imagenet_ai_0419_biggan",
        "glide": "imagenet_glide",
        "midjourney": "imagenet_midjourney",
        "sdv14": "imagenet_ai_0419_sdv4",
        "sdv15": "imagenet_ai_0424_sdv5",
        "vqdm": "imagenet_ai_0419_vqdm",
        "wukong": "imagenet_ai_0424_wukong",
    }
    for alias, archive in expected.items():
        # GenImage's own nesting: <top>/<archive>/{train,val}/{ai,nature}
        (tmp_path / index.SUBSETS[alias][1] / archive / "train" / "ai").mkdir(parents=True)
    for alias, archive in expected.items():
        assert index.resolve_subset_root(tmp_path, alias).name == archive
        assert index.canonical_subset(archive) == alias
        assert index.canonical_subset(alias.upper()) == alias


def test_binary_layout_and_subset_folder_as_root(tmp_path):
    base = make_genimage(tmp_path, "adm", {"train": 2, "val": 1}, layout="binary")
    assert index.resolve_subset_root(tmp_path, "adm") == base
    assert index.resolve_subset_root(base, "adm") == base  # the subset folder itself
    idx = index.scan(index.DataSource.genimage(tmp_path, "adm"), progress=False)
    assert len(idx) == 6
    labels = {p.split("/")[1]: lab for p, lab in zip(idx.columns["path"], idx.columns["label"], strict=True)}
    assert labels == {"1_fake": 1, "0_real": 0}


def test_rows_sorted_with_content_ids(genimage):
    idx = index.scan(index.DataSource.genimage(genimage, "sdv14"), progress=False)
    paths = list(idx.columns["path"])
    assert paths == sorted(paths) and len(paths) == 20
    assert set(idx.columns["split"]) == {"train", "val"}
    assert sorted(set(idx.columns["label"])) == [0, 1]
    for row in (0, 7, 19):
        data = Path(idx.abspath(row)).read_bytes()
        assert idx.columns["id"][row] == xxhash.xxh3_128_hexdigest(data)
        assert idx.columns["width"][row] > 0 and idx.columns["format"][row] in ("png", "jpeg")
        label_dir = paths[row].split("/")[1]
        assert idx.columns["label"][row] == {"ai": 1, "nature": 0}[label_dir]
    again = index.scan(index.DataSource.genimage(genimage, "sdv14"), progress=False)
    assert again.fingerprint == idx.fingerprint


def test_split_filter_changes_fingerprint(genimage):
    both = index.scan(index.DataSource.genimage(genimage, "sdv14"), progress=False)
    val = index.scan(index.DataSource.genimage(genimage, "sdv14", ("val",)), progress=False)
    assert len(val) == 8 and set(val.columns["split"]) == {"val"}
    assert val.fingerprint != both.fingerprint


def test_unchanged_files_are_not_reread(genimage, monkeypatch):
    first = index.scan(index.DataSource.genimage(genimage, "sdv14"), progress=False)
    calls = []
    real = index._describe
    monkeypatch.setattr(index, "_describe", lambda p: calls.append(p) or real(p))
    second = index.scan(index.DataSource.genimage(genimage, "sdv14"), previous=first, progress=False)
    assert calls == [] and second.fingerprint == first.fingerprint


def test_changed_content_changes_id(tmp_path):
    make_genimage(tmp_path, "sdv14", {"train": 2, "val": 1})
    first = index.scan(index.DataSource.genimage(tmp_path, "sdv14"), progress=False)
    target = Path(first.abspath(0))
    target.write_bytes(target.read_bytes() + b"\0")
    second = index.scan(index.DataSource.genimage(tmp_path, "sdv14"), previous=first, progress=False)
    assert second.columns["id"][0] != first.columns["id"][0]
    assert list(second.columns["id"][1:]) == list(first.columns["id"][1:])
    assert second.fingerprint != first.fingerprint


def test_bad_root_and_subset_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data root not found"):
        index.resolve_subset_root(tmp_path / "nope", "sdv14")
    with pytest.raises(UserError, match="unknown subset 'sdv3'.*adm, biggan"):
        index.resolve_subset_root(tmp_path, "sdv3")
    with pytest.raises(UserError, match="imagenet_ai_0419_sdv4"):
        index.resolve_subset_root(tmp_path, "sdv14")


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    for args, needle in [
        (["--data-root", str(tmp_path / "missing"), "--subset", "sdv14"], "data root not found"),
        (["--data-root", str(tmp_path), "--subset", "dalle"], "unknown subset 'dalle'"),
    ]:
        proc = run_cli("extract", *args, "--cache-dir", str(tmp_path / "c"), "--model", "tiny", check=False)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_files_without_an_image_suffix_are_skipped_and_said_through_the_log(tmp_path):
    base = make_genimage(tmp_path, "adm", {"train": 2, "val": 1})
    (base / "train" / "ai" / "notes.txt").write_text("not an image")
    with lines_said() as said:
        assert len(index.scan(index.DataSource.genimage(tmp_path, "adm"), progress=False)) == 6
    (line,) = said
    assert line.startswith("index: skipped 1 file(s) without an image suffix (.bmp, ")
