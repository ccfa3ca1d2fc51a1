"""A run's training curves: TensorBoard event files and `curves.png`, redrawn after every epoch.

    <run>/tensorboard/events.out.tfevents.<epoch>.lare-pipeline.epoch-NNN   one file per epoch (step)
    <run>/curves.png                                        loss and validation metrics per epoch

Both are drawn from the epoch records (`epoch-NNN.json`), the run's truth, not from memory: after
each epoch `update` writes the events of every finished epoch that has no event file yet, so a run
killed between its record and its events, then resumed, gets that epoch's events once, and a
resumed run never logs an epoch twice. Each file is written in a scratch folder and moved into
place whole. `tensorboard --logdir runs/` shows every run beside the others.

The events need the `tensorboard` package (`pip install -e '.[curves]'`); without it training goes on
and says once that the curves need it (curves.png is drawn either way).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from stages.runs.checkpoint import epoch_records
from stages.runs.records import EpochRecord

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

CODE_ID = "stages.runs.curves"
EVENTS = "tensorboard"
PNG = "curves.png"
_SUFFIX = re.compile(r"\.epoch-(\d{3})$")
NEEDS_EXTRA = "training curves for TensorBoard need the tensorboard package: pip install -e '.[curves]'"
_told = False  # said once per process


def scalars(record: EpochRecord) -> dict[str, float]:
    """What an epoch logs, by TensorBoard tag: training loss, validation AUC/AP/ACC/loss, learning rate."""
    out = {"train/loss": float(record["loss"])}
    for key in ("auc", "ap", "acc", "loss"):
        out[f"val/{key}"] = float(record["val"][key])
    groups = record.get("param_groups") or [{}]
    if "lr" in groups[0]:
        out["lr"] = float(groups[0]["lr"])
    return out


def event_file(epoch: int) -> str:
    """An epoch's event file, named by the epoch: TensorBoard reads a folder's files in name order,
    and the names it writes itself (time, host, pid, a counter) do not sort by epoch when several
    epochs are written in one second (a resumed run catching up) or the counter gains a digit."""
    return f"events.out.tfevents.{epoch:010d}.lare-pipeline.epoch-{epoch:03d}"


def logged_epochs(run: Path) -> set[int]:
    """Epochs that have their event file in the run."""
    folder = run / EVENTS
    return {int(m[1]) for p in folder.glob("events.out.tfevents.*") if (m := _SUFFIX.search(p.name))}


def update(run: Path, best: int | None) -> None:
    """After an epoch's record is written: the missing epochs' event files, and curves.png redrawn
    with the `best` epoch so far marked."""
    records = epoch_records(run)
    write_events(run, records)
    draw(run / PNG, records, best)


def write_events(run: Path, records: dict[int, EpochRecord]) -> None:
    global _told
    missing = sorted(set(records) - logged_epochs(run))
    if not missing:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _told:
            logger.info(f"note: {NEEDS_EXTRA}")
            _told = True
        return
    folder = run / EVENTS
    folder.mkdir(exist_ok=True)
    for epoch in missing:
        with tempfile.TemporaryDirectory(dir=run, prefix=".events-") as scratch:
            writer = SummaryWriter(log_dir=scratch, filename_suffix=f".epoch-{epoch:03d}")
            for tag, value in scalars(records[epoch]).items():
                writer.add_scalar(tag, value, global_step=epoch)
            writer.close()
            (written,) = os.listdir(scratch)
            shutil.move(os.path.join(scratch, written), folder / event_file(epoch))


def draw(out: Path, records: dict[int, EpochRecord], best: int | None) -> Path:
    """Training and validation loss (left), validation AUC, AP and ACC (right) against the epoch; the
    best epoch a dotted line. Written whole (a reader never sees half a PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, and faster (once per epoch)
    from matplotlib.ticker import MaxNLocator

    epochs = sorted(records)
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [records[e]["loss"] for e in epochs], "o-", label="training loss")
    left.plot(epochs, [records[e]["val"]["loss"] for e in epochs], "s--", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    for key, marker in (("auc", "o-"), ("ap", "s-"), ("acc", "^-")):
        values = [dict(records[e]["val"]).get(key) for e in epochs]
        values = [math.nan if v is None else v for v in values]
        right.plot(epochs, values, marker, label=f"validation {key.upper()}")
    right.set(xlabel="epoch", ylabel="metric", title="validation", ylim=(-0.02, 1.02))
    for ax, corner in ((left, "upper right"), (right, "lower right")):  # where the curves seldom are
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best epoch {best}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc=corner)  # a fixed place: loc="best" costs more than the plot itself
        ax.grid(alpha=0.3)
    fig.suptitle(out.parent.name, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.86, wspace=0.2)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, out)
    return out
