"""A declared equivalence renames a refactor's hash to the published one; anything else is itself."""

from __future__ import annotations

import json

import pytest

from pipeline import code_versions


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "code_versions.json"
    monkeypatch.setattr(code_versions, "TABLE", path)
    code_versions._same_as.cache_clear()
    yield path
    code_versions._same_as.cache_clear()


def test_a_refactor_is_named_as_published_and_other_code_is_itself(table):
    table.write_text(json.dumps({"b" * 16: {"same_as": "a" * 16}, "c" * 16: {"same_as": "b" * 16}}))
    assert code_versions.published("c" * 16) == "a" * 16  # two refactors in a row
    assert code_versions.published("b" * 16) == "a" * 16
    assert code_versions.published("d" * 16) == "d" * 16  # code edited by a user: a new name


def test_a_cycle_in_the_table_is_refused(table):
    table.write_text(json.dumps({"a" * 16: {"same_as": "b" * 16}, "b" * 16: {"same_as": "a" * 16}}))
    with pytest.raises(ValueError, match="cycle"):
        code_versions.published("a" * 16)


def test_the_shipped_table_maps_to_hashes_and_says_why():
    for new, entry in json.loads(code_versions.TABLE.read_text()).items():
        assert len(new) == len(entry["same_as"]) == 16 and new != entry["same_as"]
        assert entry["why"]
