"""The artifacts' recorded params as typed records: the dicts extraction writes, and older ones read."""

from __future__ import annotations

from types import SimpleNamespace

from stages.configs import ExtractConfig
from stages.extract import lare_artifact, pixel_artifact
from stages.features.params import LareParams, PixelParams
from stages.features.perturb_spec import Perturbation

BIG = 64 * 1024 * 1024
MODEL = SimpleNamespace(weights="w" * 64, identity=lambda: {"spec": "tiny"})


def _params(**kw) -> tuple[dict, dict]:
    cfg = ExtractConfig(data_root=".", subset="sdv14", **kw)
    lare = lare_artifact(cfg, "i" * 64, MODEL, "fp32", (4, 32)).attrs["params"]
    return lare, pixel_artifact(cfg, "i" * 64).attrs["params"]


def test_extraction_writes_the_params_it_always_wrote_and_reads_them_back():
    """The stored dicts (and so the fingerprints) are those written before the records existed."""
    lare, pixels = _params()
    assert lare == {
        "timestep": 200, "ensemble": 4, "size": 256, "preprocess": "resize", "resample": "bicubic",
        "small_images": None, "prompt": "a photo", "prompt_template": None, "dtype": "float16",
        "precision": "fp32", "seed": 0, "max_pixels": BIG, "perturb": None,
    }  # fmt: skip
    assert pixels == {"size": 256, "geometry": "centre crop, tiled when smaller", "small_images": "tile",
                      "max_pixels": BIG, "perturb": None}  # fmt: skip
    lare, pixels = _params(preprocess="crop", small_images="reflect", perturb="JPEG:96", perturb_only="real")
    perturbed = {"spec": "jpeg:96", "only": "real", "seed": 0}
    assert (lare["resample"], lare["small_images"], lare["perturb"]) == (None, "reflect", perturbed)
    assert pixels["geometry"] == "centre crop, reflect-101 padded when smaller"
    assert pixels["perturb"] == perturbed
    for record, kind in ((lare, LareParams), (pixels, PixelParams)):
        assert kind.from_record(record).to_record() == record


def test_older_records_read_as_their_version_computed():
    """No `small_images`: tiled; no `perturb`: clean; no `resample`: cache schema 1 (bilinear); a
    schema-1 null prompt: the default; no pixel `max_pixels`: the default."""
    lare, _ = _params(preprocess="crop")
    old = {k: v for k, v in lare.items() if k not in ("small_images", "perturb", "resample")}
    read = LareParams.from_record({**old, "prompt": None, "prompt_template": "a photo of a {cls}"})
    assert (read.small_images, read.perturb, read.schema1, read.prompt) == ("tile", None, True, "a photo")
    assert LareParams.from_record({**old, "preprocess": "resize"}).resample == "bilinear"
    assert not LareParams.from_record(lare).schema1
    assert PixelParams.from_record({"size": 64}) == PixelParams(64, "tile", BIG, None)
    recorded = PixelParams.from_record({"size": 64, "perturb": {"spec": "blur:3", "only": None, "seed": 2}})
    assert recorded.perturb == Perturbation("blur:3") and recorded.perturb.seed == 2
