"""LoL's random rectangle mask (Algorithm 1), property-tested, and its place in the batch; its towers
(the CLIP ResNets and, for Table 2, a ViT)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.detectors import backbone, lol, lol_method
from stages.detectors import method as method_registry
from stages.runs import batches
from stages.runs.batches import make_inputs
from tests.helpers import save_random_clip

HP = {"crop_size": 32, "mask_range": [0.6, 0.8], "aspect_range": [0.33, 3.0]}


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(8, 256),
    width=st.integers(8, 256),
    r_mask=st.floats(0.05, 0.95),
    r_aspect=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31),
)
def test_mask_rectangle(height, width, r_mask, r_aspect, seed):
    """Inside the image; area and aspect as asked, up to integer rounding, wherever the image allows.

    Tolerance, derived rather than tuned: h is sqrt(S r) rounded (|dh| <= 1/2) and w is S/h rounded
    (|dw| <= 1/2), so |h w - S| <= h/2 and the area fraction is off by at most h / (2 H W) <= 1/(2W).
    For the aspect, log(h/w) differs from log(r) by at most 2|log(1 - 1/(2 h0))| + |log(1 - h/(2S))|.
    """
    rect = lol.mask_rects(
        height, width, torch.tensor([r_mask]), torch.tensor([r_aspect]), torch.Generator().manual_seed(seed)
    )
    top, left, h, w = rect[0].tolist()
    assert top >= 0 and left >= 0 and h >= 1 and w >= 1
    assert top + h <= height and left + w <= width
    area = height * width * r_mask
    h0 = math.sqrt(area * r_aspect)
    fits = h0 <= height - 0.5 and area / h <= width - 0.5 and h0 >= 2
    if fits:
        assert abs(h * w / (height * width) - r_mask) <= h / (2 * height * width) + 1e-12
        tol = 2 * abs(math.log(1 - 1 / (2 * h0))) + abs(math.log(1 - h / (2 * area))) + 1e-9
        assert abs(math.log(h / w) - math.log(r_aspect)) <= tol
    else:  # clipped by the image: never larger than asked
        assert h * w <= area + h / 2


def test_masks_differ_per_sample_and_follow_the_ranges():
    masks = lol.draw_masks(64, 32, 32, torch.Generator().manual_seed(0))
    frac = masks.float().mean(dim=(1, 2))
    # each sample draws its own rectangle (on a 32 px image a few coincide by chance: 51 of 64 differ)
    assert len({m.numpy().tobytes() for m in masks}) >= 48
    assert frac.min() >= 0.6 - 1 / 64 - 0.1 and frac.max() <= 0.8 + 1 / 64  # clipped ones can be smaller
    assert frac.std() > 0.02  # r_mask is drawn per sample, not fixed


def test_mask_applied_after_normalisation_in_training_only():
    crops = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(1)
    x, _ = make_inputs(lol_method.METHOD, HP, crops, torch.zeros(8, 1, 1, 1), True, gen, aligned=False)
    zero_frac = (x == 0).all(dim=1).float().mean(dim=(1, 2))
    assert (zero_frac >= 0.5).all()  # masked pixels are exactly 0 in normalised space, all channels
    x_eval, _ = make_inputs(lol_method.METHOD, HP, crops, torch.zeros(8, 1, 1, 1), False, None, aligned=False)
    # at test: centre crop (here the whole crop), no mask
    assert torch.equal(x_eval, backbone.normalise(crops, lol.CLIP_MEAN, lol.CLIP_STD))
    assert not (x_eval == 0).all(dim=1).any()


def test_flip_and_rotation_move_pixels_without_resampling():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    out = lol.augment(img, torch.Generator().manual_seed(0))
    for a, b in zip(img, out, strict=True):
        assert sorted(a.flatten().tolist()) == sorted(b.flatten().tolist())


def test_batched_augment_is_the_per_sample_flip_then_rotation():
    """The one-gather version against the definition: flip if drawn, then torch.rot90 by the drawn turns."""
    img = torch.randint(0, 256, (64, 3, 7, 7), dtype=torch.uint8)
    out = lol.augment(img, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order
    flips, turns = torch.rand(64, generator=gen) < 0.5, torch.randint(0, 4, (64,), generator=gen)
    assert len({(bool(f), int(k)) for f, k in zip(flips, turns, strict=True)}) == 8  # all eight cases
    for x, y, f, k in zip(img, out, flips, turns, strict=True):
        assert torch.equal(y, torch.rot90(x.flip(-1) if f else x, int(k), dims=(1, 2)))


def test_masks_are_the_drawn_rectangles():
    gen = torch.Generator().manual_seed(4)
    masks = lol.draw_masks(32, 24, 40, gen)
    gen = torch.Generator().manual_seed(4)
    u = torch.rand(32, 2, generator=gen, dtype=torch.float64)
    r_mask, r_aspect = 0.6 + u[:, 0] * 0.2, 0.33 + u[:, 1] * (3.0 - 0.33)
    for mask, (top, left, h, w) in zip(
        masks, lol.mask_rects(24, 40, r_mask, r_aspect, gen).tolist(), strict=True
    ):
        want = torch.zeros(24, 40, dtype=torch.bool)
        want[top : top + h, left : left + w] = True
        assert torch.equal(mask, want)


def test_lol_crops_at_any_pixel_while_egre_keeps_the_map_grid(monkeypatch):
    """LoL reads no map: on an aligned (--preprocess crop) cache its windows start at any pixel, its test
    window is the exact centre; EGRE crops its map with the window, so its offsets stay on the 8 px grid."""
    offsets: dict[str, list[torch.Tensor]] = {"lol": [], "egre": []}
    real = batches.crop_windows

    def record(method: str):
        def crop_windows(x: torch.Tensor, off: torch.Tensor, crop: int) -> torch.Tensor:
            if x.dtype == torch.uint8:  # the image window, not the map's
                offsets[method].append(off)
            return real(x, off, crop)

        return crop_windows

    crops = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    for method in ("lol", "egre"):
        monkeypatch.setattr(batches, "crop_windows", record(method))
        gen = torch.Generator().manual_seed(4)
        make_inputs(method_registry.get(method), HP, crops, torch.zeros(64, 4, 8, 8), True, gen, aligned=True)
    assert (offsets["lol"][0] % batches.LARE_GRID != 0).any()
    assert torch.equal(
        offsets["egre"][0], batches.crop_offsets(64, 64, 32, True, torch.Generator().manual_seed(4), 8)
    )
    monkeypatch.setattr(batches, "crop_windows", real)
    odd = torch.randint(0, 256, (2, 3, 60, 60), dtype=torch.uint8)  # centre offset 14, off the grid
    x, _ = make_inputs(lol_method.METHOD, HP, odd, torch.zeros(2, 4, 1, 1), False, None, aligned=True)
    assert torch.equal(x, backbone.normalise(odd[..., 14:46, 14:46], lol.CLIP_MEAN, lol.CLIP_STD))


def test_lol_heads_the_image_embedding_of_a_resnet_or_a_vit_and_egre_refuses_a_vit():
    import open_clip
    import pytest

    from pipeline.errors import UserError
    from stages.detectors import egre

    x = torch.randn(2, 3, 32, 32)
    rn = backbone.load_visual(backbone.BackboneSpec("tiny-RN", "random"), 32)
    # the ResNet's embedding is the attention pool of visual_features, bit for bit: LoL's RN50 is unchanged
    assert torch.equal(backbone.embedding(rn, x), backbone.visual_features(rn, x)[1])
    vit = backbone.load_visual(backbone.BackboneSpec("tiny-ViT", "random"), 32)
    model = lol.LoL(vit)
    assert model.head.in_features == vit.output_dim == 32 and model(x).shape == (2,)
    with pytest.raises(UserError, match="not a CLIP ResNet: egre reads its layer3"):
        egre.EGRE(vit, lare_channels=4, grid=2)
    # LoL's three towers (Table 2) are open_clip configs with OpenAI's weights
    for arch in ("RN50", "RN101", "ViT-L-14"):
        assert (arch, "openai") in open_clip.list_pretrained()


def test_a_lol_run_trains_a_vit_from_a_weight_file(learn_set, tmp_path):
    """--backbone tiny-ViT --backbone-weights FILE: the loading code of a real ViT-L-14 checkpoint."""
    from stages.configs import TrainConfig
    from stages.train import run_train
    from tests.helpers import torch_threads

    weights = save_random_clip("tiny-ViT", tmp_path / "vit.safetensors", image_size=32)
    cfg = TrainConfig(
        caches=[str(learn_set[1])], method="lol", out=str(tmp_path / "runs"), epochs=1, batch_size=16,
        lr=1e-3, crop_size=32, backbone="tiny-ViT", backbone_weights=str(weights), progress=False,
    )  # fmt: skip
    with torch_threads(1):
        run = run_train(cfg)
    assert (run / "done.json").is_file() and (run / "epoch-001.safetensors").is_file()
    import pytest

    from pipeline.errors import UserError

    cfg.method, cfg.out = "egre", str(tmp_path / "egre")
    with pytest.raises(UserError, match="not a CLIP ResNet"):  # before any run directory is written
        run_train(cfg)
    assert not (tmp_path / "egre").exists()
