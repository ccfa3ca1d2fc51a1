"""EGRE's structure: the LaRE map steers attention and channels; shapes follow the reference."""

from __future__ import annotations

import pytest
import torch

from stages.detectors import backbone, egre, egre_method
from stages.detectors.egre import EGRE
from stages.runs.batches import make_inputs
from tests.helpers import save_random_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_egre(crop: int = 64) -> EGRE:
    visual = backbone.load_visual(backbone.BackboneSpec(backbone.TINY, "random"), crop, seed=0)
    torch.manual_seed(0)
    return EGRE(visual, lare_channels=4, grid=crop // 16).eval()


def test_head_width_and_output():
    model = tiny_egre()
    c3, d = backbone.dims(model.visual)
    assert model.head.in_features == d + 2 * c3  # RN50: 1024 + 1024 + 1024 = 3072
    logits = model(torch.randn(3, 3, 64, 64), torch.rand(3, 4, 8, 8))
    assert logits.shape == (3, 2)
    assert torch.allclose(EGRE.score(logits), torch.softmax(logits, 1)[:, 1])


def test_lare_map_changes_the_decision_through_both_refinements():
    model = tiny_egre()
    x = torch.randn(2, 3, 64, 64)
    lare = torch.rand(2, 4, 8, 8)
    f3, _ = backbone.visual_features(model.visual, x)
    spatial_a = model.spatial(f3, lare)
    spatial_b = model.spatial(f3, lare.flip(-1))  # same channel means, other places
    assert not torch.allclose(spatial_a, spatial_b)  # the map's layout biases the attention
    assert not torch.allclose(model(x, lare), model(x, lare * 3))  # its magnitude weighs the channels


def test_aligned_crop_takes_the_same_window_of_map_and_image():
    crops = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    maps = torch.zeros(4, 4, 8, 8)
    for i in range(8):  # mark LaRE cell row i and image rows 8i..8i+7 with the same value
        crops[:, :, 8 * i : 8 * i + 8] = 10 * i
        maps[:, :, i] = i
    hp = {"crop_size": 32}
    gen = torch.Generator().manual_seed(0)
    x, m = make_inputs(egre_method.METHOD, hp, crops, maps, True, gen, aligned=True)
    assert m.shape == (4, 4, 4, 4)
    for img, mp in zip(x, m, strict=True):
        first_pixel_value = round(float(img[0, 0, 0] * 0.229 + 0.485) * 255)
        assert first_pixel_value == 10 * int(mp[0, 0, 0])  # the window starts on the same cell
    _, m_whole = make_inputs(
        egre_method.METHOD, hp, crops, maps, True, torch.Generator().manual_seed(0), aligned=False
    )
    assert m_whole.shape == (4, 4, 8, 8)  # reference (resize) maps: whole map, pooled later


def test_backbone_weights_file_is_loaded_by_the_real_open_clip_path(tmp_path):
    path = save_random_clip(backbone.TINY, tmp_path / "clip.safetensors", seed=5, image_size=64)
    loaded = backbone.load_visual(backbone.BackboneSpec(backbone.TINY, str(path)), 64, seed=0)
    built = backbone.load_visual(backbone.BackboneSpec(backbone.TINY, "random"), 64, seed=5)
    other = backbone.load_visual(backbone.BackboneSpec(backbone.TINY, "random"), 64, seed=0)
    a, b, c = (m.state_dict() for m in (loaded, built, other))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the file's weights, not the seed's
    assert not all(torch.equal(a[k], c[k]) for k in a)
    spec = backbone.BackboneSpec(backbone.TINY, str(path))
    assert spec.identity()["xxh3"] and "weights" in spec.identity()
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="no file"):
        backbone.BackboneSpec(backbone.TINY, str(tmp_path / "missing.safetensors")).identity()


def test_attention_and_gate_follow_the_reference_layers_and_init():
    """q, k, v: layer3 width -> 8 x 64; o: 512 -> layer3 width; xavier-uniform, zero biases; the
    channel gate Linear(4, 128) and Linear(128, C3) without biases."""
    import math

    model = tiny_egre()
    c3, _ = backbone.dims(model.visual)
    for name, (fan_in, fan_out) in {"q": (c3, 512), "k": (c3, 512), "v": (c3, 512), "o": (512, c3)}.items():
        layer = getattr(model, name)
        assert (layer.in_features, layer.out_features) == (fan_in, fan_out), name
        bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform: U(-bound, bound)
        w = layer.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        assert torch.count_nonzero(layer.bias) == 0, name
    assert (model.heads, model.head_dim) == (8, 64)
    gate = [m for m in model.channel if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in gate] == [(4, 128), (128, c3)]
    assert all(m.bias is None for m in gate)


def test_batched_crops_are_the_per_sample_windows():
    crops = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    maps = torch.randn(16, 4, 8, 8)
    x, m = make_inputs(
        egre_method.METHOD, {"crop_size": 32}, crops, maps, True, torch.Generator().manual_seed(2), True
    )
    off = torch.randint(0, 5, (16, 2), generator=torch.Generator().manual_seed(2)) * 8  # the same draw
    assert len({tuple(o) for o in off.tolist()}) > 4
    for k, (t, s) in enumerate(off.tolist()):
        window = crops[k : k + 1, :, t : t + 32, s : s + 32]
        assert torch.equal(x[k], backbone.normalise(window, egre.IMAGENET_MEAN, egre.IMAGENET_STD)[0])
        assert torch.equal(m[k], maps[k, :, t // 8 : t // 8 + 4, s // 8 : s // 8 + 4])
