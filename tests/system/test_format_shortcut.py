"""The format shortcut is real and the JPEG-Q control catches it.

On a set whose classes differ ONLY in file format (real: JPEG at Q, generated: PNG, the same content
generator), a detector scores high on its clean val split and falls to chance once the generated val
images are JPEG'd at Q too (`--perturb jpeg:Q --perturb-only generated`): it learned the format. On
the set whose generated class carries a real artifact, the same control (at that set's JPEG quality,
95) leaves it standing.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.store import CacheStore
from stages.configs import EvalConfig, TrainConfig
from stages.evaluate import run_eval
from stages.genimage.synthetic import make_genimage
from stages.train import run_train
from tests.helpers import extract_cache

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # 30- and 60-epoch trainings
Q = 50


def _control(cache, tmp_path, quality: int, epochs: int = 30) -> dict[str, dict]:
    """Train LoL (tiny backbone) on the clean train split; val metrics clean and with generated JPEG'd."""
    cfg = TrainConfig(
        caches=[str(cache)], method="lol", out=str(tmp_path / "runs"), epochs=epochs, batch_size=16, lr=1e-3,
        crop_size=32, backbone="tiny-RN", backbone_weights="random", progress=False,
    )  # fmt: skip
    run = run_train(cfg)
    out = {}
    for name, spec in (("clean", None), ("jpeg", f"jpeg:{quality}")):
        only = "generated" if spec else None
        ecfg = EvalConfig(
            run, [str(cache)], tmp_path / "results", progress=False, perturb=spec, perturb_only=only
        )
        (result,) = run_eval(ecfg)
        out[name] = result
    return out


def test_a_format_only_set_is_learned_and_the_jpeg_control_exposes_it(tmp_path):
    make_genimage(tmp_path / "data", "sdv14", {"train": 20, "val": 12}, seed=4, format_only_quality=Q)
    cache = extract_cache(tmp_path / "data", tmp_path / "cache")
    extract_cache(tmp_path / "data", tmp_path / "cache", perturb=f"jpeg:{Q}", perturb_only="generated")
    store = CacheStore(str(cache))
    cols, _ = store.read_table(store.manifest()["latest_index"])
    real = cols["label"] == 0
    assert set(cols["jpeg_quality"][real]) == {Q} and set(cols["format"][~real]) == {"png"}

    # 60 epochs: LoL's crops start at any pixel, so JPEG's 8 px block grid meets them at every phase
    result = _control(cache, tmp_path, Q, epochs=60)
    clean, control = result["clean"]["metrics"], result["jpeg"]["metrics"]
    print(f"format-only set: clean ACC {clean['acc']:.3f}, generated JPEG'd at {Q}: ACC {control['acc']:.3f}")
    assert clean["acc"] >= 0.9, clean
    assert control["acc"] <= 0.65, control
    assert control["generated_acc"] < 0.3  # the JPEG'd generated images are called real
    by_format = result["clean"]["by_format"]
    assert set(by_format) == {"jpeg", "png"} and by_format["png"]["n_real"] == 0


def test_a_real_artifact_survives_the_same_control(learn_set, tmp_path):
    _, cache = learn_set
    copy = tmp_path / "cache" / cache.name
    shutil.copytree(cache, copy)
    data_root = learn_set[0]
    extract_cache(data_root, copy.parent, perturb="jpeg:95", perturb_only="generated")
    result = _control(copy, tmp_path, 95)
    clean, control = result["clean"]["metrics"], result["jpeg"]["metrics"]
    print(f"artifact set: clean ACC {clean['acc']:.3f}, generated JPEG'd at 95: ACC {control['acc']:.3f}")
    assert clean["acc"] >= 0.9, clean
    assert control["acc"] >= 0.8, control
    assert np.isfinite(result["jpeg"]["by_format"]["png"]["acc"])
