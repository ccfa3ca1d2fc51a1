"""Perturbations (`--perturb SPEC`): each family's effect, draws keyed by content, perturbed caches that
are bitwise the same after a resume, with decode workers and on a two-worker cluster, bad SPECs; the
source families against each source's computation rebuilt here from plain library calls."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import torchvision
from PIL import Image
from scipy import ndimage

from pipeline.errors import UserError
from stages import extract
from stages.configs import ExtractConfig
from stages.extract import ShardComputer, run_extract
from stages.features import perturb, perturb_spec
from stages.genimage.index import jpeg_quality
from stages.genimage.synthetic import make_genimage, make_image
from stages.runs import cachedata, choice
from tests.helpers import artifact_arrays, assert_same_cache, run_cli, tiny_extract, torch_threads

RGB = make_image(np.random.default_rng(0), 96, 128, generated=False)  # noisy, like a photo


def _apply(spec: str, rgb: np.ndarray = RGB, image_id: str = "abc", label: int = 1, **kw) -> np.ndarray:
    return perturb.apply(perturb_spec.Perturbation.parse(spec, **kw), rgb, image_id, label)


def _high_freq(rgb: np.ndarray) -> float:
    """Energy of the horizontal and vertical pixel differences."""
    x = rgb.astype(np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def test_specs_parse_to_one_canonical_text():
    assert perturb_spec.canonical(" JPEG:096 ") == "jpeg:96"
    chain = "noise:5-20+blur:3,5,7,9+jpeg:10-75+crop:5-20"
    assert perturb_spec.canonical(chain) == chain
    mixed = "blur:sigma=3+resize:112px+resize:0.5"
    assert perturb_spec.canonical(mixed) == mixed
    assert perturb_spec.Perturbation.parse("jpeg:96", seed=3, only="generated").record() == {
        "spec": "jpeg:96", "only": "generated", "seed": 3,
    }  # fmt: skip


def test_every_step_the_spec_parses_has_a_computation():
    """The SPEC's table (perturb_spec.FAMILIES) and the computations' (perturb.APPLY) name the same steps."""
    keys = set()
    for family, rule in perturb_spec.FAMILIES.items():
        if isinstance(rule, perturb_spec.Source):
            keys |= {(family, mode) for mode in rule.modes}
        else:
            keys |= {(family, ""), (family, rule.unit)}
    assert keys == set(perturb.APPLY)


@pytest.mark.parametrize(
    "spec", ["", "gauss:3", "jpeg", "jpeg:0", "jpeg:101", "jpeg:75-10", "blur:4", "blur:1", "crop:100",
             "resize:2", "resize:1.5px", "noise:a", "jpeg:96+"],
)  # fmt: skip
def test_a_malformed_spec_names_the_families(spec):
    with pytest.raises(UserError, match="families jpeg, blur, noise, crop, resize, frank, genimage"):
        perturb_spec.Perturbation.parse(spec)


@pytest.mark.parametrize(
    "spec", ["frank:gauss", "frank:noise=3", "genimage:lowres", "genimage:lowres=1.5", "aigcdetect:blur=0",
             "aigcdetect:half=2", "genimage:half"],
)  # fmt: skip
def test_a_malformed_source_step_names_the_modes(spec):
    with pytest.raises(UserError, match="families jpeg"):
        perturb_spec.Perturbation.parse(spec)


def test_jpeg_changes_the_pixels_and_the_quality_estimated_is_q():
    for q in (30, 75, 96):
        data = perturb.jpeg_bytes(RGB, q)
        with Image.open(io.BytesIO(data)) as img:
            assert jpeg_quality(img.quantization) == q
            decoded = np.asarray(img.convert("RGB"))
        out = _apply(f"jpeg:{q}")
        assert np.array_equal(out, decoded) and not np.array_equal(out, RGB)


def test_blur_lowers_high_frequencies_more_with_a_larger_kernel():
    energy = [_high_freq(RGB)] + [_high_freq(_apply(f"blur:{k}")) for k in (3, 9)]
    energy.append(_high_freq(_apply("blur:sigma=3")))
    assert energy[0] > energy[1] > energy[2] > energy[3], energy
    assert _apply("blur:9", RGB[:3, :5]).shape == (3, 5, 3)  # a kernel larger than the image still works


def test_noise_has_the_variance_asked_and_crop_and_resize_keep_or_set_the_size():
    flat = np.full((200, 200, 3), 128, dtype=np.uint8)
    diff = _apply("noise:16", flat).astype(np.float64) - 128
    assert abs(diff.var() - 16) < 1.0 and abs(diff.mean()) < 0.1
    cropped = _apply("crop:5-20")
    assert cropped.shape == RGB.shape and not np.array_equal(cropped, RGB)
    assert _apply("resize:0.5").shape == (48, 64, 3)
    assert _apply("resize:64px").shape == (64, 85, 3)  # the shorter side, aspect kept


def test_draws_are_keyed_by_seed_content_and_spec():
    spec = "noise:5-20+blur:3,5,7,9+jpeg:10-75+crop:5-20"
    a = _apply(spec, image_id="id-1")
    assert np.array_equal(a, _apply(spec, image_id="id-1"))
    assert not np.array_equal(a, _apply(spec, image_id="id-2"))
    assert not np.array_equal(a, _apply(spec, image_id="id-1", seed=1))
    assert np.array_equal(_apply("jpeg:50", label=0, only="generated"), RGB)  # the other class: untouched
    assert not np.array_equal(_apply("jpeg:50", label=1, only="generated"), RGB)


# ---- perturbed caches ------------------------------------------------------------------------------
SPEC = "noise:5-20+jpeg:10-75+crop:5-20"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb-data")
    make_genimage(root, "sdv14", {"train": 2, "val": 1}, seed=7)
    return root


def _cfg(data, cache, **kw) -> ExtractConfig:
    base = dict(size=32, pixel_size=32, rows_per_shard=2, batch_size=2, perturb=SPEC)
    return tiny_extract(data, cache, **{**base, **kw})


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """A perturbed single-process run with one torch thread (as each dask worker has)."""
    cache = tmp_path_factory.mktemp("perturb-ref")
    with torch_threads(1):
        run_extract(_cfg(small, cache))
    return cache


def test_a_perturbed_artifact_lives_beside_the_clean_one(small, reference, tmp_path):
    manifest = json.loads((reference / "sdv14.zarr" / "manifest.json").read_text())
    recorded = {a["params"]["perturb"]["spec"] for a in manifest["artifacts"].values()}
    assert recorded == {SPEC}
    clean = run_extract(_cfg(small, tmp_path, perturb=None))
    perturbed = run_extract(_cfg(small, tmp_path))
    assert set(clean.artifacts.values()).isdisjoint(perturbed.artifacts.values())  # other fingerprints
    cache = tmp_path / "sdv14.zarr"
    crops = [artifact_arrays(cache, r.artifacts["pixels"])["crops"] for r in (clean, perturbed)]
    assert crops[0] != crops[1]
    info = run_cli("cache", "info", str(tmp_path / "sdv14.zarr")).stdout
    assert f"perturbed: {SPEC}, seed 0" in info


def test_artifacts_of_earlier_code_stay_readable_beside_a_changed_family(small, tmp_path, monkeypatch):
    """A cache perturbed before this code (its code version faked) is neither overwritten nor hidden
    when the changed family's source-faithful SPEC is extracted: new artifacts beside it."""
    with monkeypatch.context() as patch:
        patch.setattr(extract, "lare_code_version", lambda: "earlier perturbation code")
        patch.setattr(extract, "pixel_code_version", lambda: "earlier perturbation code")
        old = run_extract(_cfg(small, tmp_path, perturb="resize:16px"))
    cache = tmp_path / "sdv14.zarr"
    before = {path: artifact_arrays(cache, path) for path in old.artifacts.values()}
    new = run_extract(_cfg(small, tmp_path, perturb="genimage:lowres=16"))
    assert set(new.artifacts.values()).isdisjoint(old.artifacts.values())
    assert {path: artifact_arrays(cache, path) for path in old.artifacts.values()} == before
    run_cli("cache", "verify", str(cache))
    picked = choice.Choice(perturb=perturb_spec.requested("resize:16px"))
    source, _ = cachedata.open_source(str(cache), split="train", choice=picked)
    assert (source.lare, source.pixels) == (old.artifacts["lare"], old.artifacts["pixels"])


def test_resumed_with_decode_workers_the_perturbed_cache_is_bitwise_the_same(small, reference, tmp_path):
    def two_shards_then_stop(job, shards, on_rows):
        ShardComputer(job).run(shards[:2], on_rows)
        raise KeyboardInterrupt

    with torch_threads(1):
        with pytest.raises(KeyboardInterrupt):
            run_extract(_cfg(small, tmp_path), compute=two_shards_then_stop)
        resumed = run_extract(_cfg(small, tmp_path, loader_workers=2))
    assert resumed.rows_done == 2  # 6 rows in shards of 2: only the third shard was left
    assert_same_cache(tmp_path / "sdv14.zarr", reference / "sdv14.zarr")


def test_other_batch_size_gives_the_same_perturbed_crops(small, reference, tmp_path):
    result = run_extract(_cfg(small, tmp_path, batch_size=1, rows_per_shard=2))
    pixels = result.artifacts["pixels"]
    assert artifact_arrays(tmp_path / "sdv14.zarr", pixels) == artifact_arrays(
        reference / "sdv14.zarr", pixels
    )


def test_two_cluster_workers_write_the_same_perturbed_cache(small, reference, tmp_path):
    args = ["extract", "--data-root", str(small), "--subset", "sdv14", "--cache-dir", str(tmp_path),
            "--model", "tiny", "--device", "cpu", "--size", "32", "--pixel-size", "32",
            "--rows-per-shard", "2", "--batch-size", "2", "--no-progress", "--perturb", SPEC,
            "--workers", "2"]  # fmt: skip
    run_cli(*args)
    assert_same_cache(tmp_path / "sdv14.zarr", reference / "sdv14.zarr")


@pytest.mark.parametrize(
    "extra", [["--perturb", "sharpen:2"], ["--perturb-only", "generated"]],
)  # fmt: skip
def test_bad_perturbation_options_are_one_line_and_write_nothing(small, tmp_path, extra):
    args = ["extract", "--data-root", str(small), "--subset", "sdv14", "--cache-dir", str(tmp_path / "c"),
            "--model", "tiny", "--device", "cpu", *extra]  # fmt: skip
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()


# ---- source families against each source's code, rebuilt here from plain library calls ------------
# Images of several shapes: a photo-like one, odd sizes, a square one (Frank's images are square).
IMAGES = [RGB, make_image(np.random.default_rng(1), 77, 61, generated=True),
          make_image(np.random.default_rng(2), 64, 64, generated=False)]  # fmt: skip
IDS = [f"img-{i}" for i in range(8)]


def _lol_text_reference(spec: str, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The generic families as stages.features.perturb documents them, from Pillow, OpenCV and numpy calls,
    with the draws from `rng` in its order: the value, then the family's own draws."""
    h, w = rgb.shape[:2]
    family, value = spec.split(":")
    if family == "noise":
        variance = rng.uniform(5, 20)
        noisy = rgb.astype(np.float32) + rng.standard_normal(rgb.shape, dtype=np.float32) * np.sqrt(
            np.float32(variance)
        )
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if family == "blur" and value.startswith("sigma="):
        return cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(value[6:]))  # OpenCV's kernel for the sigma
    if family == "blur":
        k = (3, 5, 7, 9)[int(rng.integers(4))]
        # OpenCV's formula for the sigma of a kernel size, passed explicitly: asked for sigma 0, OpenCV
        # itself uses fixed tables for k <= 7 instead (measured: up to 2 grey levels from this)
        return cv2.GaussianBlur(rgb, (k, k), sigmaX=0.3 * ((k - 1) * 0.5 - 1) + 0.8)
    if family == "jpeg":
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="JPEG", quality=int(rng.integers(10, 76)))
        return np.array(Image.open(out).convert("RGB"))
    if family == "crop":
        keep = 1 - rng.uniform(5, 20) / 100
        ch, cw = round(h * keep), round(w * keep)
        top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        window = Image.fromarray(rgb[top : top + ch, left : left + cw])
        return np.asarray(window.resize((w, h), Image.Resampling.BICUBIC))
    px = int(value[:-2])  # resize:PXpx
    size = (round(w * px / min(h, w)), round(h * px / min(h, w)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


@pytest.mark.parametrize(
    ("spec", "tolerance"),
    [("noise:5-20", 0), ("jpeg:10-75", 0), ("crop:5-20", 0), ("resize:40px", 0), ("blur:3,5,7,9", 1),
     ("blur:sigma=3", 1)],
)  # fmt: skip
def test_lol_text_families_match_plain_library_calls(spec, tolerance):
    """Exact but for the blurs: within one grey level of OpenCV's fixed-point Gaussian (torchvision's
    float kernel, reflect-101 border like OpenCV's default)."""
    parsed = perturb_spec.Perturbation.parse(spec)
    for rgb in IMAGES:
        for image_id in IDS[:4]:
            ours = perturb.apply(parsed, rgb, image_id, 1)
            theirs = _lol_text_reference(spec, rgb, parsed.rng(image_id))
            assert ours.shape == theirs.shape
            assert np.abs(ours.astype(int) - theirs).max() <= tolerance, (spec, image_id)


def _frank_reference(mode: str, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`create_perturbed_imagedata.py` of Frank et al. (2020) with its draws taken from `rng` in the
    order stages.features.perturb documents: (combined) which of the four, the 0.5 coin, the values."""
    if mode == "combined":
        mode = ("noise", "blur", "jpeg", "crop")[int(rng.integers(4))]
    if not rng.random() > 0.5:
        return rgb
    if mode == "noise":
        variance = rng.uniform(5.0, 20.0)
        image = np.copy(rgb).astype(np.float64)
        image += variance * rng.standard_normal(image.shape)
        return np.clip(image, 0.0, 255.0).astype(np.uint8)
    if mode == "blur":
        k = (3, 5, 7, 9)[int(rng.integers(4))]
        return cv2.GaussianBlur(rgb, (k, k), sigmaX=cv2.BORDER_DEFAULT)
    if mode == "jpeg":
        _, data = cv2.imencode(".jpg", rgb, [42, 90])  # Frank passes [quality, 90]: an unknown flag
        return cv2.imdecode(data, 1)
    percentage = rng.uniform(0.05, 0.2)
    x, y = rgb.shape[:2]
    x_crop, y_crop = int(x * percentage * 0.5), int(y * percentage * 0.5)
    cropped = rgb[x_crop : x - x_crop, y_crop : y - y_crop]
    # Frank asks for dsize=(x, y) (a transpose unless square); (y, x) keeps every shape
    return cv2.resize(cropped, dsize=(y, x), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize(
    ("mode", "tolerance"), [("noise", 0), ("jpeg", 0), ("blur", 1), ("crop", 1), ("combined", 1)]
)
def test_frank_modes_match_frank_code_on_opencv(mode, tolerance):
    """Exact for noise and JPEG; blur and crop within one grey level (OpenCV's fixed-point kernels
    against torch's float ones). The coin leaves about half of the images untouched, the same ones."""
    spec = perturb_spec.Perturbation.parse(f"frank:{mode}")
    untouched = 0
    for rgb in IMAGES:
        for image_id in IDS:
            ours = perturb.apply(spec, rgb, image_id, 1)
            theirs = _frank_reference(mode, rgb, spec.rng(image_id))
            assert ours.shape == theirs.shape
            assert np.abs(ours.astype(int) - theirs).max() <= tolerance, (mode, image_id)
            untouched += np.array_equal(ours, rgb)
    assert 0 < untouched < len(IMAGES) * len(IDS)


def test_frank_noise_has_the_standard_deviation_drawn_and_truncates():
    flat = np.full((200, 200, 3), 128, dtype=np.uint8)
    for image_id in IDS:
        rng = perturb_spec.Perturbation.parse("frank:noise").rng(image_id)
        if rng.random() > 0.5:
            std = rng.uniform(5.0, 20.0)
            diff = _apply("frank:noise", flat, image_id).astype(np.float64) - 128
            assert abs(diff.std() - std) < 0.05 * std and -1.0 < diff.mean() < 0.0  # truncation: -0.5
            return
    raise AssertionError("no image perturbed")


def test_frank_combined_gives_each_image_one_of_the_four():
    spec = perturb_spec.Perturbation.parse("frank:combined")
    modes = [("noise", "blur", "jpeg", "crop")[int(spec.rng(f"id-{i}").integers(4))] for i in range(200)]
    assert set(modes) == {"noise", "blur", "jpeg", "crop"}
    assert all(25 <= modes.count(m) <= 75 for m in set(modes))


def test_genimage_lowres_goes_down_and_back_up_with_pillow_bicubic():
    """Our choice of filters (GenImage's code was not found): exact against Pillow."""
    for rgb in IMAGES:
        h, w = rgb.shape[:2]
        for px in (112, 32):
            small = Image.fromarray(rgb).resize(
                (round(w * px / min(h, w)), round(h * px / min(h, w))), Image.Resampling.BICUBIC
            )
            expected = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))
            assert np.array_equal(_apply(f"genimage:lowres={px}", rgb), expected)


def test_aigcdetect_steps_match_the_benchmark_code():
    """Exact: half size as its `custom_augment` + `custom_resize` (torchvision on PIL, bilinear),
    blur as its `gaussian_blur` (scipy per channel, in place), JPEG 95 as its `pil_jpg`."""
    for rgb in IMAGES:
        h, w = rgb.shape[:2]
        img = torchvision.transforms.Resize((int(h / 2), int(w / 2)))(Image.fromarray(rgb))
        img = torchvision.transforms.functional.resize(img, 256, interpolation=Image.BILINEAR)
        assert np.array_equal(_apply("aigcdetect:half", rgb), np.asarray(img))

        blurred = np.array(rgb)
        for c in range(3):
            ndimage.gaussian_filter(blurred[:, :, c], output=blurred[:, :, c], sigma=1.0)
        assert np.array_equal(_apply("aigcdetect:blur=1", rgb), blurred)

        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="jpeg", quality=95)
        assert np.array_equal(_apply("jpeg:95", rgb), np.array(Image.open(out)))
