import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.integrity import verify
from pipeline.schema import STATUS_FAILED, STATUS_OK
from pipeline.store import CacheStore
from stages.configs import ExtractConfig
from stages.extract import RowDataset, run_extract
from stages.features import pixels, sd
from stages.features.params import LareParams, PixelParams
from stages.features.recipe import RowRecipe
from tests.helpers import add_bad_files, artifact_arrays, extract_args, run_cli, tiny_extract

FP16_ULP = 2.0**-10  # relative spacing of float16 numbers


def _extract(genimage, cache_dir, **overrides):
    cfg = tiny_extract(genimage, cache_dir, **{"rows_per_shard": 8, "batch_size": 4, **overrides})
    return run_extract(cfg)


@pytest.fixture(scope="module")
def base(genimage, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("base-cache")
    result = _extract(genimage, cache_dir)
    return result, cache_dir / "sdv14.zarr"


def _maps(cache: Path, art_path: str) -> np.ndarray:
    return zarr.open_group(str(cache), mode="r")[art_path]["maps"][:]


def test_maps_pixels_manifest(base, genimage):
    result, cache = base
    assert not result.up_to_date and result.rows_done == 20 and result.failed == 0
    group = zarr.open_group(str(cache), mode="r")
    maps = group[result.artifacts["lare"]]["maps"]
    crops = group[result.artifacts["pixels"]]["crops"]
    assert maps.shape == (20, 4, 32, 32) and maps.dtype == np.float16
    assert crops.shape == (20, 3, 256, 256) and crops.dtype == np.uint8
    assert np.isfinite(maps[:]).all() and (maps[:] > 0).any()
    assert (group[result.artifacts["lare"]]["status"][:] == STATUS_OK).all()
    store = CacheStore(str(cache))
    index_cols, _ = store.read_table(result.index)
    for row in (0, 11):
        path = Path(store.read_table(result.index)[1]["root"]) / index_cols["path"][row]
        expected = pixels.crop_tiled(pixels.decode_rgb(path.read_bytes()), 256).transpose(2, 0, 1)
        np.testing.assert_array_equal(crops[row], expected)
    manifest = store.manifest()
    assert all(a["complete"] for a in manifest["artifacts"].values())
    assert manifest["artifacts"][result.artifacts["lare"]]["model"]["source"] == "random"
    assert verify(store) == []


def test_rerun_is_up_to_date_and_loads_no_model(base, genimage, monkeypatch):
    result, cache = base

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded for an up-to-date cache")

    monkeypatch.setattr(sd, "load_model", forbidden)
    again = _extract(genimage, cache.parent)
    assert again.up_to_date and again.artifacts == result.artifacts and again.rows_done == 0


@pytest.mark.parametrize(
    "change",
    [
        {"timestep": 300},
        {"ensemble": 2},
        {"prompt": "a painting"},
        {"size": 128},
        {"preprocess": "crop"},
        {"dtype": "float32"},
        {"seed": 1},
        {"prompt_template": "a photo of a {cls}"},
        {"max_pixels": 10**6},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_value_parameter_makes_a_new_artifact_beside_the_old(base, genimage, tmp_path, change):
    result, cache = base
    work = tmp_path / "c"
    shutil.copytree(cache.parent, work)
    before = artifact_arrays(work / "sdv14.zarr", result.artifacts["lare"])
    new = _extract(genimage, work, pixels=False, **change)
    assert new.artifacts["lare"] != result.artifacts["lare"]
    assert artifact_arrays(work / "sdv14.zarr", result.artifacts["lare"]) == before  # never overwritten
    manifest = CacheStore(str(work / "sdv14.zarr")).manifest()
    assert {result.artifacts["lare"], new.artifacts["lare"]} <= set(manifest["artifacts"])
    maps = _maps(work / "sdv14.zarr", new.artifacts["lare"])
    assert np.isfinite(maps).all()


def test_another_model_is_another_artifact(base, genimage, tmp_path):
    result, cache = base
    other = tmp_path / "other-sd"
    shutil.copytree(sd.resolve_model("tiny").folder, other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 1
    weights.write_bytes(bytes(data))
    work = tmp_path / "c"
    shutil.copytree(cache.parent, work)
    new = _extract(genimage, work, model=str(other))
    assert new.artifacts["lare"] != result.artifacts["lare"]
    assert new.artifacts["pixels"] == result.artifacts["pixels"] and new.rows_done == 20


def test_pixels_are_reused_when_only_lare_changes(base, genimage, tmp_path):
    result, cache = base
    work = tmp_path / "c"
    shutil.copytree(cache.parent, work)
    store = CacheStore(str(work / "sdv14.zarr"))
    records = store.done_shards(result.artifacts["pixels"])
    new = _extract(genimage, work, timestep=100)
    assert new.artifacts["pixels"] == result.artifacts["pixels"]
    assert CacheStore(str(work / "sdv14.zarr")).done_shards(result.artifacts["pixels"]) == records


def test_rows_per_shard_is_layout_not_value(base, genimage, tmp_path):
    result, cache = base
    new = _extract(genimage, tmp_path, rows_per_shard=4)
    assert new.artifacts == result.artifacts
    # batch size 4 divides both layouts, so the batches and hence the bits are the same
    assert (
        artifact_arrays(tmp_path / "sdv14.zarr", new.artifacts["lare"])["maps"]
        == artifact_arrays(cache, result.artifacts["lare"])["maps"]
    )
    assert CacheStore(str(tmp_path / "sdv14.zarr")).group[new.artifacts["lare"]]["maps"].shards[0] == 4


def test_decode_workers_do_not_change_a_bit(base, genimage, tmp_path):
    result, cache = base
    new = _extract(genimage, tmp_path, loader_workers=2)
    for kind in ("lare", "pixels"):
        assert artifact_arrays(tmp_path / "sdv14.zarr", new.artifacts[kind]) == artifact_arrays(
            cache, result.artifacts[kind]
        )


def test_batch_size_moves_only_the_last_bits(genimage, tmp_path):
    """Stated tolerance: fp32 maps within 1e-5 of the map's scale; fp16 storage within one fp16 ulp."""
    a = _extract(genimage, tmp_path / "a", batch_size=4, dtype="float32", pixels=False)
    b = _extract(genimage, tmp_path / "b", batch_size=3, dtype="float32", pixels=False)
    assert a.artifacts == b.artifacts  # batch size is not part of the fingerprint
    ma, mb = (
        _maps(tmp_path / "a" / "sdv14.zarr", a.artifacts["lare"]),
        _maps(tmp_path / "b" / "sdv14.zarr", b.artifacts["lare"]),
    )
    scale = np.abs(ma).max(axis=(1, 2, 3), keepdims=True)
    assert (np.abs(ma - mb) <= 1e-5 * scale).all()
    h16 = _extract(genimage, tmp_path / "a", batch_size=3, pixels=False)
    h16_ref = _extract(genimage, tmp_path / "b", batch_size=4, pixels=False)
    m16, r16 = (
        _maps(tmp_path / d / "sdv14.zarr", r.artifacts["lare"]) for d, r in (("a", h16), ("b", h16_ref))
    )
    diff = np.abs(m16.astype(np.float32) - r16.astype(np.float32))
    assert (diff <= FP16_ULP * np.abs(r16.astype(np.float32)) + 1e-7).all()


def test_bad_files_are_recorded_not_zeroed(genimage, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(genimage, data)
    reasons = add_bad_files(next(data.glob("*/*/train/ai")))
    result = _extract(data, tmp_path / "c")
    assert result.failed == 4 and result.rows_done == 24
    store = CacheStore(str(tmp_path / "c" / "sdv14.zarr"))
    manifest = store.manifest()
    for kind in ("lare", "pixels"):
        failed = {
            Path(f["path"]).name: f["reason"] for f in manifest["artifacts"][result.artifacts[kind]]["failed"]
        }
        assert set(failed) == set(reasons)
        for name, prefix in reasons.items():
            assert failed[name].startswith(prefix), failed[name]
    cols, _ = store.read_table(result.index)
    bad_rows = [i for i, p in enumerate(cols["path"]) if Path(p).name in reasons]
    status = store.group[result.artifacts["lare"]]["status"][:]
    maps = store.group[result.artifacts["lare"]]["maps"][:]
    assert (status[bad_rows] == STATUS_FAILED).all() and np.isnan(maps[bad_rows]).all()
    good = np.setdiff1d(np.arange(len(status)), bad_rows)
    assert (status[good] == STATUS_OK).all() and np.isfinite(maps[good]).all()
    info = run_cli("cache", "info", str(tmp_path / "c" / "sdv14.zarr")).stdout
    assert "failed rows (4):" in info
    for name, prefix in reasons.items():
        assert any(name in line and prefix in line for line in info.splitlines())


def test_prompt_template_encodes_each_class_once(genimage, tmp_path, monkeypatch):
    seen = []
    real = sd.SDModel.encode_prompts

    def spy(self, prompts):
        seen.append(list(prompts))
        return real(self, prompts)

    monkeypatch.setattr(sd.SDModel, "encode_prompts", spy)
    _extract(genimage, tmp_path, prompt_template="a photo of a {cls}", pixels=False)
    (prompts,) = seen
    assert len(prompts) == len(set(prompts)) and all(p.startswith("a photo of a ") for p in prompts)
    assert 1 < len(prompts) <= 20


def test_crop_preprocess_feeds_the_pixel_crop_to_the_vae(genimage):
    from stages.genimage.index import DataSource, scan

    idx = scan(DataSource.genimage(genimage, "sdv14"), progress=False)
    params = {"timestep": 200, "ensemble": 4, "size": 256, "preprocess": "crop", "resample": None,
              "small_images": "tile", "prompt": "a photo", "prompt_template": None, "dtype": "float16",
              "precision": "fp32", "seed": 0, "max_pixels": pixels.DEFAULT_MAX_PIXELS,
              "perturb": None}  # fmt: skip
    crop = PixelParams.from_record({"size": 256})
    recipe = RowRecipe.from_params(LareParams.from_record(params), (4, 32), crop)
    files = [idx.abspath(r) for r in range(len(idx))]
    ds = RowDataset(files, idx.columns["id"], np.zeros(len(idx), int), recipe)
    for row in (0, 5):
        item = ds[row]
        assert torch.equal(item["image"], item["crops"])  # map cell (i, j) covers crop pixels 8i..8i+7


def test_template_fallback_prompt_is_part_of_the_values():
    """With a template, files without a class in their name get --prompt: it is recorded and fingerprinted."""
    from types import SimpleNamespace

    from stages.extract import lare_artifact
    from stages.genimage.classes import prompts_for

    names = ["n01440764_1.JPEG", "116_sdv4_00047.png", "no_class_here.png"]
    prompts, idx, missing = prompts_for("a painting", "a photo of a {cls}", names)
    assert missing == [2] and prompts[idx[2]] == "a painting"
    assert prompts[idx[0]].startswith("a photo of a ") and prompts[idx[1]].startswith("a photo of a ")
    model = SimpleNamespace(weights="w" * 64, identity=lambda: {"spec": "tiny"})
    arts = [
        lare_artifact(
            ExtractConfig(data_root=".", subset="sdv14", prompt=p, prompt_template="a photo of a {cls}"),
            "i" * 64,
            model,
            "fp32",
            (4, 32),
        )  # fmt: skip
        for p in ("a photo", "a painting")
    ]
    assert [a.attrs["params"]["prompt"] for a in arts] == ["a photo", "a painting"]
    assert arts[0].fingerprint != arts[1].fingerprint


def test_a_schema_1_cache_is_read_labelled_and_never_extended(genimage, tmp_path):
    """Schema 2 changed what `resize` maps hold: a version-1 cache is read as it is, labelled, and
    extending it is refused in one line that names the fix."""
    import json

    from pipeline.fingerprint import checksum_bytes

    _extract(genimage, tmp_path, pixels=False, splits=("val",))
    cache = tmp_path / "sdv14.zarr"
    root = json.loads((cache / "zarr.json").read_text())
    root["attributes"]["schema_version"] = 1
    (cache / "zarr.json").write_text(json.dumps(root))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest["metadata_files"]["zarr.json"] = checksum_bytes((cache / "zarr.json").read_bytes())
    for art in manifest["artifacts"].values():
        art["params"].pop("resample")
    (cache / "manifest.json").write_text(json.dumps(manifest))

    info = run_cli("cache", "info", str(cache)).stdout
    assert "schema 1: its `resize` LaRE maps were resized bilinearly" in info and "read-only" in info
    assert "resize (bilinear, schema 1)" in info
    assert run_cli("cache", "verify", str(cache)).returncode == 0
    proc = run_cli(*extract_args(genimage, tmp_path, "--split", "val", "--no-pixels"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "schema-1 cache" in lines[0] and "extract into a new --cache-dir" in lines[0]

    _extract(genimage, tmp_path / "v2", pixels=False, splits=("val",))
    for verb, src, dst in (
        ("push", cache, tmp_path / "v2" / "sdv14.zarr"),
        ("pull", tmp_path / "v2" / "sdv14.zarr", cache),
    ):
        proc = run_cli("cache", verb, str(src), str(dst), check=False)
        assert proc.returncode == 2 and "one cache holds one schema" in proc.stderr, proc.stderr


def test_a_schema_2_cache_is_read_as_one_generator_and_migrated_in_place(genimage, tmp_path):
    """A version-2 cache (no generator or group columns) reads as one generator, its subset; the first
    extraction into it migrates it to version 3 and finds its GenImage artifacts up to date: the same
    fingerprints (issue 27)."""
    import json
    import shutil

    from pipeline.fingerprint import checksum_bytes
    from stages.runs.cachedata import CacheData

    _extract(genimage, tmp_path, splits=("val",))
    cache = tmp_path / "sdv14.zarr"
    before = json.loads((cache / "manifest.json").read_text())
    (index,) = before["indexes"]
    # the cache as version 2 wrote it: no generator/group arrays, attrs, metadata entries
    for name in ("generator", "group"):
        shutil.rmtree(cache / index / name)
    meta = json.loads((cache / index / "zarr.json").read_text())
    for attrs in (meta["attributes"], before["indexes"][index]):
        attrs["files"] = {
            k: v for k, v in attrs["files"].items() if "/generator/" not in k and "/group/" not in k
        }
        for key in ("layout", "unlabelled"):
            attrs.pop(key)
    (cache / index / "zarr.json").write_text(json.dumps(meta))
    root = json.loads((cache / "zarr.json").read_text())
    root["attributes"]["schema_version"] = 2
    consolidated = root["consolidated_metadata"]["metadata"]
    for key in [k for k in consolidated if k.endswith(("/generator", "/group"))]:
        del consolidated[key]
    consolidated[index]["attributes"] = meta["attributes"]
    (cache / "zarr.json").write_text(json.dumps(root))
    before["schema_version"] = 2
    files = before["metadata_files"]
    for key in [k for k in files if k.startswith((f"{index}/generator/", f"{index}/group/"))]:
        del files[key]
    for key in ("zarr.json", f"{index}/zarr.json"):
        files[key] = checksum_bytes((cache / key).read_bytes())
    (cache / "manifest.json").write_text(json.dumps(before))

    assert run_cli("cache", "verify", str(cache)).returncode == 0
    info = run_cli("cache", "info", str(cache)).stdout
    assert (
        "schema 2: its indexes have no generator and group columns" in info and "migrates it in place" in info
    )
    source = CacheData([str(cache)], split="val").sources[0]
    assert set(source.columns["generator"]) == {"sdv14"} and source.generators() == ["sdv14"]

    proc = run_cli(*extract_args(genimage, tmp_path, "--split", "val", "--batch-size", "4",
                                 "--rows-per-shard", "8"))  # fmt: skip
    assert "schema 2 -> 3 in place" in proc.stderr and "sdv14: up to date" in proc.stderr, proc.stderr
    after = json.loads((cache / "manifest.json").read_text())
    assert after["schema_version"] == 3 and after["artifacts"].keys() == before["artifacts"].keys()
    assert json.loads((cache / "zarr.json").read_text())["attributes"]["migrated_from"] == 2
    assert run_cli("cache", "verify", str(cache)).returncode == 0


def test_small_images_reflect_pads_the_pixel_window(genimage, tmp_path):
    """`--small-images reflect` (the EGRE reference's padding) as a user types it; bad values: one line."""
    import json

    run_cli(
        *extract_args(
            genimage, tmp_path, "--split", "val", "--pixel-size", "384", "--small-images", "reflect"
        )
    )
    cache = tmp_path / "sdv14.zarr"
    manifest = json.loads((cache / "manifest.json").read_text())
    ((path, art),) = [(p, a) for p, a in manifest["artifacts"].items() if a["kind"] == "pixels"]
    assert art["params"]["small_images"] == "reflect" and "reflect-101" in art["params"]["geometry"]
    group = zarr.open_group(str(cache), mode="r")
    index = group[f"index/{art['upstream']['index'][:16]}"]
    crops = group[f"{path}/crops"][:]
    root = next(p for p in genimage.rglob("imagenet_ai_0419_sdv4") if p.is_dir())
    for row, rel in enumerate(index["path"][:]):
        rgb = pixels.decode_rgb((root / str(rel)).read_bytes())
        assert np.array_equal(crops[row], pixels.crop_reflect(rgb, 384).transpose(2, 0, 1)), rel
    proc = run_cli(*extract_args(genimage, tmp_path / "x", "--small-images", "mirror"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert (
        proc.returncode == 2 and len(lines) == 1 and "--small-images must be one of tile, reflect" in lines[0]
    )
