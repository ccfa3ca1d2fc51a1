"""Declared equivalences of code versions: a refactor that rewrites the code a stage hashes without
changing one value it computes keeps every fingerprint.

An artifact or a run is named by the code that decides its values (pipeline.fingerprint.code_version,
a hash of its syntax tree), so that a change to what the code does never reuses stale work. A change to
how the code is written (a record typed, a function split) changes that hash too, and would have every
user recompute a week of maps and rerun every training. An entry of `code_versions.json` (beside this
module) maps such a new hash to the one its artifacts were published under, and says why. What justifies
an entry is tests/system/test_fingerprints_hold.py: the fingerprints and the values (maps, crops,
trained weights, metrics) of a fixed extraction, two runs and an evaluation, which any real change
moves.

A hash with no entry is its own name: code edited by a user names new artifacts, as it should.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from pipeline.fingerprint import code_version

TABLE = Path(__file__).with_name("code_versions.json")


@functools.cache
def _same_as() -> dict[str, str]:
    return {new: entry["same_as"] for new, entry in json.loads(TABLE.read_text()).items()}


def published(version: str) -> str:
    """The version the values of code hashed as `version` were published under (itself if none)."""
    seen = {version}
    while (older := _same_as().get(version)) is not None:
        if older in seen:
            raise ValueError(f"{TABLE}: the code versions {sorted(seen)} map to each other in a cycle")
        seen.add(older)
        version = older
    return version


def stage_code(*parts: ModuleType | type | Callable) -> str:
    """code_version of `parts`, under the name its values were published with."""
    return published(code_version(*parts))
