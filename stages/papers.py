"""The papers' published numbers, as data: what `pipeline reproduce` sets beside ours.

`stages/data/papers/lol.csv` holds every number of LoL's Tables 1, 2 and 3 (and the overall AP its
Sec. 4.4 states), one per line, in percent, with the table it comes from (the text we have has no
page numbers; tests/stages/test_papers.py reads each back out of ../shared/papers/ and compares):

  table       row                                 column                        metric  std
  lol-table1  method (LoL, CNNSpot, ...)           test subset, or `mean`        acc     -
  lol-table2  training images (400 ... 323994)    backbone (RN50, RN101, ViT-L-14) acc/ap  yes
  lol-table3  mask ratio range ("0.6-0.8")        aspect ratio range ("0.33-3.0")  acc   yes

LoL's Table 1 row "LaRE2" is LoL's retraining of LaRE^2 (1,600 + 1,600 images per training subset,
averaged over the eight), not LaRE^2's own figure, and is labelled so. Figure 5 (AP per training and
test subset) exists only as an image: of it the text gives the overall mean alone (98.6, Sec. 4.4).
LaRE^2's own per-subset figures have no primary source here (../shared/papers holds its abstract
only): they are absent, and the `lare2` tables say so instead of borrowing other numbers.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

LARE2_ABSENT = (
    "LaRE^2's own per-subset figures: no primary source for them was found (../shared/papers holds "
    "its abstract only), so this table has no paper column"
)
LOL_RETRAINED_LARE2 = "LaRE2 (LoL's retraining)"


@dataclass(frozen=True)
class PaperCell:
    """One published number (percent) and where it is printed."""

    table: str
    row: str
    column: str
    metric: str
    value: float
    std: float | None
    source: str


@functools.cache
def cells(paper: str = "lol") -> tuple[PaperCell, ...]:
    """Every number stored for `paper` (the file stages/data/papers/<paper>.csv)."""
    text = resources.files("stages").joinpath(f"data/papers/{paper}.csv").read_text()
    return tuple(
        PaperCell(
            r["table"],
            r["row"],
            r["column"],
            r["metric"],
            float(r["value"]),
            float(r["std"]) if r["std"] else None,
            r["source"],
        )  # fmt: skip
        for r in csv.DictReader(text.splitlines())
    )


def lookup(table: str, row: str, column: str, metric: str) -> PaperCell | None:
    """The published number of a cell, or None where the paper prints none."""
    for c in cells("lol"):
        if (c.table, c.row, c.column, c.metric) == (table, row, column, metric):
            return c
    return None
