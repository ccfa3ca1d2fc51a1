"""Training curves: TensorBoard event files read back with tensorboard's own reader equal the epoch
records; a run stopped and resumed (also in the window between a record and its events) logs each
epoch once; without tensorboard training goes on and says so once."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from stages.configs import TrainConfig
from stages.runs import curves
from stages.train import run_train
from tests.helpers import lines_said, torch_threads


def _cfg(cache, out, **kw) -> TrainConfig:
    tiny = dict(
        method="lol", epochs=3, batch_size=16, lr=1e-3, crop_size=32, backbone="tiny-RN",
        backbone_weights="random", progress=False,
    )  # fmt: skip
    return TrainConfig(caches=[str(cache)], out=str(out), **{**tiny, **kw})


def _train(cfg: TrainConfig):
    with torch_threads(1):
        return run_train(cfg)


def _events(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's event files, by tag: (step, value), as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / curves.EVENTS), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _records(run) -> dict[int, dict]:
    return {e: json.loads((run / f"epoch-{e:03d}.json").read_text()) for e in (1, 2, 3)}


def _assert_events_equal_records(run) -> None:
    events, records = _events(run), _records(run)
    assert set(events) == {"train/loss", "val/auc", "val/ap", "val/acc", "val/loss", "lr"}
    for tag, values in events.items():
        assert [step for step, _ in values] == [1, 2, 3], (tag, values)  # each epoch once, in order
        for step, value in values:
            want = curves.scalars(records[step])[tag]
            assert value == pytest.approx(want, rel=1e-6, abs=1e-7), (tag, step)  # stored as float32


def test_events_equal_the_epoch_records_and_a_resumed_run_logs_each_epoch_once(learn_set, tmp_path):
    _, cache = learn_set
    whole = _train(_cfg(cache, tmp_path / "whole"))
    _assert_events_equal_records(whole)
    assert curves.logged_epochs(whole) == {1, 2, 3}
    assert Image.open(whole / curves.PNG).size[0] > 0

    # stopped after epoch 2, as a kill would leave it; the events of epoch 2 lost too (a kill between
    # the epoch's record and its events): the resumed run logs epoch 2 once and epoch 3 once
    out = tmp_path / "resumed"
    run = _train(_cfg(cache, out, stop_after=2))
    assert curves.logged_epochs(run) == {1, 2} and not (run / "done.json").exists()
    (lost,) = [p for p in (run / curves.EVENTS).iterdir() if p.name.endswith(".epoch-002")]
    lost.unlink()
    png_before = (run / curves.PNG).read_bytes()
    assert _train(_cfg(cache, out)) == run
    _assert_events_equal_records(run)
    assert (run / curves.PNG).read_bytes() != png_before  # redrawn with epoch 3
    names = sorted(p.name for p in (run / curves.EVENTS).iterdir())
    assert names == [curves.event_file(e) for e in (1, 2, 3)]  # one file per epoch, in epoch order


def test_without_tensorboard_training_goes_on_and_says_so_once(learn_set, tmp_path, monkeypatch):
    _, cache = learn_set
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(curves, "_told", False)
    with lines_said() as said:
        run = _train(_cfg(cache, tmp_path, epochs=2))
    assert (run / "done.json").is_file() and (run / curves.PNG).is_file()
    assert not (run / curves.EVENTS).exists()
    assert [m for m in said if "tensorboard" in m] == [f"note: {curves.NEEDS_EXTRA}"]
