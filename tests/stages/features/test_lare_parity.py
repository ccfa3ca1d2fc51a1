"""Reference parity: our cached maps equal the LaRE^2 reference's `extract_lare.py` on the same weights
and the same random draws.

The reference computation below is written from plain Pillow / torchvision / diffusers / transformers
/ torch calls as docs/REFERENCE_NOTES.md describes it (one image per pass, fp32; `Image.open(p).convert('RGB')
.resize((256, 256))` with no filter; `(PILToTensor(img) / 255 - 0.5) * 2`; `latent_dist.mean + std * n0`
scaled; the latent repeated e times, `add_noise` at t, one UNet call; squared error averaged over the
ensemble; the template `a photo of a [CLS]`). It imports none of our helpers: only the random draws
follow cache_schema.md's definition (the reference has no seed), and the tiny model's folder is located
through `sd.resolve_model`. The classes are asserted literally.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zarr
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torchvision.transforms import PILToTensor
from transformers import CLIPTextModel, CLIPTokenizer

from stages.features import sd
from tests.helpers import ONE_THREAD, run_cli

TOL = 1e-5  # of each map's maximum: batching moves the last bits (cache_schema.md's stated tolerance)
T, E, SEED = 200, 4, 0
TEMPLATE = "a photo of a {cls}"

# file (label folder, name, width, height, format) -> the reference's class text (None: no class, the
# fixed prompt 'a photo'); one or more files per naming rule, non-square and smaller-than-256 images.
FILES = {
    ("nature", "n01440764_10026.JPEG", 300, 200, "JPEG"): "tench",  # synset prefix, non-square
    ("nature", "n01494475_12.JPEG", 256, 256, "JPEG"): "hammerhead",  # not "hammerhead shark"
    ("nature", "ILSVRC2012_val_00042597.JPEG", 500, 375, "JPEG"): "beach wagon",  # val ground truth
    ("nature", "ILSVRC2012_val_00000001.JPEG", 180, 240, "JPEG"): "sea snake",  # smaller than 256
    ("ai", "7_sdv4_00001.png", 256, 256, "PNG"): "cock",  # class index, not "rooster"; already 256
    ("ai", "15_sdv4_00002.png", 512, 512, "PNG"): "robin",  # not "American robin"
    ("ai", "GLIDE_1000_200_08_808_glide_00138.png", 200, 150, "PNG"): "sombrero",  # 5th field, small
    ("ai", "VQDM_1000_200_00_123_vqdm_00001.png", 384, 256, "PNG"): "spiny lobster",  # 5th field
    ("ai", "midjourney_0001.png", 320, 240, "PNG"): None,  # no rule fits: the fixed prompt
}


def _rule(name: str) -> str:
    if name.startswith("ILSVRC2012"):
        return "ILSVRC val"
    if name.startswith(("GLIDE", "VQDM")):
        return name.split("_")[0]
    if name.startswith("n0"):
        return "synset"
    return "no class" if FILES_BY_NAME[name] is None else "index"


FILES_BY_NAME = {name: cls for (_, name, *_), cls in FILES.items()}


@pytest.fixture(scope="module")
def parity_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(7)
    for (label, name, w, h, fmt), _ in FILES.items():
        folder = root / "sdv14" / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
        rgb = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
        rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root


def _reference_map(path: Path, cls: str | None, folder: Path, models: dict) -> torch.Tensor:
    """The reference's computation for one file, batch of one, fp32."""
    img = Image.open(path).convert("RGB").resize((256, 256))
    x = ((PILToTensor()(img) / 255.0 - 0.5) * 2).unsqueeze(0)
    prompt = TEMPLATE.replace("{cls}", cls) if cls is not None else "a photo"
    tok = models["tokenizer"]
    ids = tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    digest = xxhash.xxh3_128_hexdigest(path.read_bytes())
    seed = xxhash.xxh3_64_intdigest(f"{SEED}:{digest}".encode()) & ((1 << 63) - 1)
    draws = torch.randn((1 + E, 4, 32, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        cond = models["text_encoder"](ids.input_ids)[0]
        dist = models["vae"].encode(x).latent_dist
        z0 = (dist.mean + dist.std * draws[:1]) * models["vae"].config.scaling_factor
        latents = z0.repeat(E, 1, 1, 1)
        noise = draws[1:]
        t = torch.full((E,), T, dtype=torch.long)
        noisy = models["scheduler"].add_noise(latents, noise, t)
        pred = models["unet"](noisy, t, encoder_hidden_states=cond.repeat(E, 1, 1)).sample
        return ((pred - noise) ** 2).mean(dim=0)


def test_cached_maps_equal_the_reference(parity_set, tmp_path, capsys):
    cache = tmp_path / "cache"
    proc = run_cli(
        "extract", "--data-root", str(parity_set), "--subset", "sdv14", "--cache-dir", str(cache),
        "--model", "tiny", "--device", "cpu", "--dtype", "float32", "--prompt-template", TEMPLATE,
        "--timestep", str(T), "--ensemble", str(E), "--seed", str(SEED), "--no-progress", env=ONE_THREAD,
    )  # fmt: skip
    assert "1 file name(s) name no ImageNet class" in proc.stdout + proc.stderr
    info = run_cli("cache", "info", str(cache / "sdv14.zarr")).stdout
    assert (
        "1 row(s) with no class in the file name used 'a photo' (e.g. train/ai/midjourney_0001.png)" in info
    )
    assert "resample=bicubic" in info

    folder = sd.resolve_model("tiny").folder
    models = {
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae").eval(),
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    }

    manifest = json.loads((cache / "sdv14.zarr" / "manifest.json").read_text())
    (lare,) = [p for p, a in manifest["artifacts"].items() if a["kind"] == "lare"]
    params = manifest["artifacts"][lare]["params"]
    assert params["resample"] == "bicubic" and params["preprocess"] == "resize"
    group = zarr.open_group(str(cache / "sdv14.zarr"), mode="r")
    index = group[f"index/{manifest['artifacts'][lare]['upstream']['index'][:16]}"]
    paths = [str(p) for p in index["path"][:]]
    maps, status = group[f"{lare}/maps"][:], group[f"{lare}/status"][:]
    assert (status == 1).all() and len(paths) == len(FILES)

    worst: dict[str, float] = {}
    subset_root = parity_set / "sdv14"
    for row, rel in enumerate(paths):
        name = rel.split("/")[-1]
        ref = _reference_map(subset_root / rel, FILES_BY_NAME[name], folder, models)
        rel_err = float((torch.from_numpy(maps[row]) - ref).abs().max() / ref.abs().max())
        worst[_rule(name)] = max(worst.get(_rule(name), 0.0), rel_err)
        assert rel_err <= TOL, (name, rel_err)
    with capsys.disabled():
        print("\nlargest disagreement per naming rule (of the map's maximum):", json.dumps(worst))
    assert set(worst) == {"synset", "ILSVRC val", "index", "GLIDE", "VQDM", "no class"}


def test_bilinear_would_have_failed(parity_set):
    """The check has teeth: the old bilinear resize moves the model input of a resized image visibly."""
    path = parity_set / "sdv14" / "train" / "nature" / "n01440764_10026.JPEG"
    img = Image.open(path).convert("RGB")
    bicubic = np.asarray(img.resize((256, 256)), dtype=np.int16)
    bilinear = np.asarray(img.resize((256, 256), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.abs(bicubic - bilinear).max() > 2
