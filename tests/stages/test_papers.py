"""Every number stored in stages/data/papers/ is the one printed in the paper's text (../shared/papers)."""

from __future__ import annotations

import re

import pytest

from stages import papers
from tests.helpers import ROOT

PAPERS = ROOT.parent / "shared" / "papers"
LOL = PAPERS / "learning_on_less_full.txt"
PM = r"\(±plus-or-minus\\pm±(\d+\.\d)\)"  # how the text renders "(± 1.6)"


@pytest.fixture(scope="module")
def lol_text() -> list[str]:
    if not LOL.is_file():
        pytest.skip(f"the paper's text is not at {LOL}")
    return LOL.read_text().splitlines()


def _between(lines: list[str], head: str, caption: str) -> list[str]:
    """The lines of a table: after the line starting with `head`, before its caption."""
    start = next(i for i, s in enumerate(lines) if s.strip().startswith(head))
    end = next(i for i, s in enumerate(lines) if i > start and s.startswith(caption))
    return lines[start + 1 : end]


def _table1(lines: list[str]) -> dict[tuple[str, str], float]:
    """Table 1's rows as printed: the method's name, then its eight subsets and the mean."""
    names = {"CNNSpot": "CNNSpot", "Spec": "Spec", "F3Net": "F3Net", "GramNet": "GramNet", "DIRE": "DIRE",
             "LaRE2superscript": papers.LOL_RETRAINED_LARE2, "Ours": "LoL"}  # fmt: skip
    columns = ["adm", "biggan", "glide", "midjourney", "sdv14", "sdv15", "vqdm", "wukong", "mean"]
    out = {}
    for line in _between(lines, "Methods Testing Subset", "Table 1:")[1:]:
        s = line.strip()
        if not s:
            continue
        (name,) = [v for k, v in names.items() if s.startswith(k)]
        numbers = re.findall(r"\b\d+\.\d\b", s.rsplit("]", 1)[-1] if "]" in s else s.split(" ", 1)[1])
        assert len(numbers) == 9, s
        out.update({(name, c): float(n) for c, n in zip(columns, numbers, strict=True)})
    return out


def test_every_stored_table1_number_is_the_papers(lol_text):
    printed = _table1(lol_text)
    stored = {
        (c.row, c.column): c.value for c in papers.cells() if c.table == "lol-table1" and c.metric == "acc"
    }
    assert stored == printed and len(stored) == 7 * 9
    assert printed[("LoL", "mean")] == 92.7 and printed[(papers.LOL_RETRAINED_LARE2, "mean")] == 79.1


def test_the_overall_ap_is_the_one_sec_4_4_states(lol_text):
    (ap,) = [c for c in papers.cells() if c.table == "lol-table1" and c.metric == "ap"]
    assert (ap.row, ap.column) == ("LoL", "mean") and ap.std is None
    assert f"average precision (AP) of {ap.value}%" in "\n".join(lol_text)


def test_every_stored_table2_number_and_std_is_the_papers(lol_text):
    printed = {}
    for line in _between(lol_text, "Data Volume count", "Table 2:"):
        m = re.match(r"\s*([\d,]+) \(([\d.]+)%\) (.*)", line)
        if m:
            pairs = re.findall(rf"(\d+\.\d) {PM}", m.group(3))
            assert len(pairs) == 6, line
            cols = [(b, metric) for b in ("RN50", "RN101", "ViT-L-14") for metric in ("acc", "ap")]
            for (backbone, metric), (v, sd) in zip(cols, pairs, strict=True):
                printed[(m.group(1).replace(",", ""), backbone, metric)] = (float(v), float(sd))
    stored = {
        (c.row, c.column, c.metric): (c.value, c.std) for c in papers.cells() if c.table == "lol-table2"
    }
    assert stored == printed and len(stored) == 10 * 6
    assert stored[("323994", "RN50", "acc")] == (89.9, 3.3)


def test_every_stored_table3_number_and_std_is_the_papers(lol_text):
    printed = {}
    for line in _between(lol_text, "Masked Ratio", "Table 3:"):
        m = re.match(r"\s*\((\d\.\d+), (\d\.\d+)\) (.*)", line)
        if m and (pairs := re.findall(rf"(\d+\.\d) {PM}", m.group(3))):
            assert len(pairs) == 3, line
            for aspect, (v, sd) in zip(("1.0-1.0", "0.5-2.0", "0.33-3.0"), pairs, strict=True):
                printed[(f"{m.group(1)}-{m.group(2)}", aspect)] = (float(v), float(sd))
    stored = {(c.row, c.column): (c.value, c.std) for c in papers.cells() if c.table == "lol-table3"}
    assert stored == printed and len(stored) == 5 * 3
    assert stored[("0.6-0.8", "0.33-3.0")] == (
        96.0,
        0.7,
    )  # LoL's chosen ranges (lol.MASK_RANGE, ASPECT_RANGE)


def test_every_cell_names_its_table_and_lare2s_own_figures_are_absent():
    cells = papers.cells()
    assert {c.table for c in cells} == {"lol-table1", "lol-table2", "lol-table3"}
    for c in cells:
        assert c.source.startswith("LoL ") and ("Table" in c.source or "Sec." in c.source), c
    # the LaRE^2 row is LoL's retraining, labelled so; nothing claims to be LaRE^2's own figure
    assert {c.row for c in cells if "LaRE" in c.row} == {papers.LOL_RETRAINED_LARE2}
    if PAPERS.is_dir():  # LaRE^2's abstract, all we have of it, prints its gains only: no subset's figure
        assert set(re.findall(r"\d+\.\d", (PAPERS / "lare2_abstract.txt").read_text())) == {"11.9", "12.1"}
