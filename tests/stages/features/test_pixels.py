import io

import numpy as np
import pytest
from PIL import Image

from stages.features import pixels
from tests.helpers import add_bad_files


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_large_image_crop_is_an_exact_slice():
    rgb = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    out = pixels.crop_tiled(pixels.decode_rgb(_png(rgb)), 256)
    top, left = (300 - 256) // 2, (410 - 256) // 2
    assert out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out, rgb[top : top + 256, left : left + 256])  # no resampling


def test_small_image_is_tiled_not_resized():
    rgb = np.random.default_rng(1).integers(0, 256, (100, 300, 3), dtype=np.uint8)
    out = pixels.crop_tiled(rgb, 256)
    tiled = np.tile(rgb, (3, 1, 1))  # 300 x 300
    np.testing.assert_array_equal(out, tiled[22:278, 22:278])
    # every output row is an original row: copies of the image, no interpolation
    originals = {r.tobytes() for r in rgb[:, 22:278]}
    assert all(row.tobytes() in originals for row in out)


def test_resize_square_ignores_aspect():
    rgb = np.zeros((120, 333, 3), dtype=np.uint8)
    assert pixels.resize_square(rgb, 256).shape == (256, 256, 3)


def test_modes_become_rgb():
    for mode in ("L", "RGBA", "P", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (20, 10)).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        assert pixels.decode_rgb(buf.getvalue()).shape == (10, 20, 3)


def test_each_bad_file_gets_its_reason(tmp_path):
    expected = add_bad_files(tmp_path)
    for name, reason in expected.items():
        with pytest.raises(pixels.BadImage, match=reason):
            pixels.decode_rgb((tmp_path / name).read_bytes())


def test_max_pixels_is_the_bomb_limit():
    data = _png(np.zeros((100, 100, 3), dtype=np.uint8))
    assert pixels.decode_rgb(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(pixels.BadImage, match="decompression bomb: 100x100"):
        pixels.decode_rgb(data, max_pixels=9_999)


def test_reflect_101_padding_is_centred_and_never_repeats_the_edge():
    row = np.arange(1, 4, dtype=np.uint8)  # one row [1, 2, 3]: reflect-101 gives ... 3 2 | 1 2 3 | 2 1 ...
    rgb = np.repeat(np.repeat(row[None, :, None], 3, axis=0), 3, axis=2)  # 3 x 3 x 3
    out = pixels.crop_reflect(rgb, 7)
    assert out.shape == (7, 7, 3)
    assert out[3, :, 0].tolist() == [3, 2, 1, 2, 3, 2, 1]  # 2 padded on each side, as PadIfNeeded centres
    big = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    assert np.array_equal(pixels.centre_crop(big, 256, "reflect"), pixels.centre_crop(big, 256, "tile"))
    assert pixels.centre_crop(rgb, 7, "tile")[3, :, 0].tolist() != out[3, :, 0].tolist()
