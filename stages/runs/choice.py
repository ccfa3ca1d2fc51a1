"""Which artifacts of a cache a command reads: the `--lare` / `--pixels` selectors, the perturbation
(`--perturb SPEC [--perturb-only CLASS]`) and, for evaluation, what the run was trained on.

`choose` is the one rule: an artifact whose index covers the wanted split, complete, carrying the
wanted perturbation, matching the selector; of those left, the run's own artifact, then one like
it, then the newest. It reads the manifest only (no array), so `pipeline cache info` describes
artifacts with the same words the selectors filter by.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.errors import UserError
from pipeline.schema import ArtifactAttrs, ArtifactOrigin, Manifest, ManifestArtifact, index_splits
from stages.features.params import PixelParams
from stages.features.perturb_spec import Perturbation, describe

if TYPE_CHECKING:  # types only: the records import no torch, but cache info need not read them
    from stages.runs.records import RunParams

CODE_ID = "stages.choice"  # the name its code is hashed under, wherever the file lives

# The split a test reads by default (stages.runs.cachedata.default_split): `test` where the cache's
# LaRE artifacts cover one, else `val` (GenImage's test set is its val split).
AUTO = "auto"


# ---- which perturbation (`--perturb SPEC`, `--perturb-only CLASS`): a filter of every artifact choice --
def perturbation_of(art: ArtifactOrigin) -> Perturbation | None:
    return Perturbation.from_record(art.get("params", {}).get("perturb"))


def with_perturbation(
    found: list[tuple[str, ManifestArtifact]], wanted: Perturbation | None
) -> list[tuple[str, ManifestArtifact]]:
    """The artifacts among `found` perturbed as wanted (clean ones when `wanted` is None)."""
    return [(path, art) for path, art in found if perturbation_of(art) == wanted]


@dataclass(frozen=True)
class Choice:
    """Which artifacts of a cache to read: the user's `--lare` / `--pixels` selectors, and (eval) what
    the run was trained on, preferred by default.

    A selector is a fingerprint prefix (as `pipeline cache info` prints it) or comma-separated
    `key=value` filters on the artifact's parameters (`dtype=float32`, `timestep=200,seed=1`, `model=tiny`).
    """

    lare: str | None = None
    pixels: str | None = None
    # a run's params: its "lare" record and the "caches" it was trained on
    run: RunParams | None = None
    perturb: Perturbation | None = None  # the perturbation the artifacts must carry (None: clean)

    def rank(self, kind: Literal["lare", "pixels"]) -> Callable[[ArtifactAttrs], tuple[bool, bool]] | None:
        """How well an artifact fits the run (higher first): the very artifact it was trained on, then
        one with its parameters and model; None without a run."""
        if self.run is None:
            return None
        trained = {c[kind] for c in self.run["caches"]}
        rec = self.run["lare"]

        def fits(a: ArtifactAttrs) -> tuple[bool, bool]:
            if kind == "lare":
                same = (a["params"], a["model"].get("weights")) == (
                    rec["params"],
                    rec["model"].get("weights"),
                )
            else:
                same = PixelParams.from_record(a["params"]).size == rec["pixel_size"]
            return a["fingerprint"] in trained, same

        return fits


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _fields(art: ArtifactOrigin) -> dict[str, str]:
    fields = {k: _value(v) for k, v in art.get("params", {}).items()}
    if "perturb" in fields:  # a record, shown (and filtered) as its SPEC
        fields["perturb"] = describe(perturbation_of(art))
    if "model" in art:
        fields["model"] = _value(art["model"].get("spec"))
    return fields


def _selector(text: str, option: str, pool: list[tuple[str, ManifestArtifact]]):
    """A predicate on (path, attrs) from a selector's text; a malformed one is a one-line error."""
    text = text.strip()
    if "=" not in text:
        prefix = text.lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise UserError(
                f"{option} takes a fingerprint prefix (4 or more hex digits, as `pipeline cache info` "
                f"prints it) or key=value filters such as dtype=float32, not '{text}'"
            )
        return lambda kv: kv[1]["fingerprint"].startswith(prefix)
    filters = {}
    for part in text.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        value = value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value
        if not sep or not key:
            raise UserError(f"{option}: '{part}' is not key=value")
        filters[key] = value
    known = {k for _, art in pool for k in _fields(art)}
    unknown = sorted(set(filters) - known) if pool else []
    if unknown:
        raise UserError(
            f"{option}: no parameter '{unknown[0]}'; the artifacts have {', '.join(sorted(known))}"
        )
    return lambda kv: all(_fields(kv[1]).get(k) == v for k, v in filters.items())


def selectable_fields(art: ArtifactOrigin) -> str:
    """An artifact's parameters as `key=value` words, the way `--lare`/`--pixels` filter them."""
    return " ".join(f"{k}='{v}'" if " " in v else f"{k}={v}" for k, v in _fields(art).items())


def _listing(found: list[tuple[str, ManifestArtifact]]) -> str:
    return "; ".join(f"{path} ({selectable_fields(art)})" for path, art in found)


def choose(
    manifest: Manifest,
    url: str,
    kind: str,
    split: str | None,
    selector: str | None,
    rank: Callable[[ArtifactAttrs], tuple[bool, bool]] | None = None,
    index_fp: str | None = None,
    allow_incomplete: bool = False,
    perturb: Perturbation | None = None,
) -> tuple[str, ManifestArtifact]:
    """The artifact of `kind` to read: one whose index covers `split` (and is `index_fp` when given),
    complete (an unfinished one only with allow_incomplete, when no complete one qualifies), matching
    the selector (several matching it: an error listing them); of those left, the best by `rank`
    (a run's own artifact, then one like it), then the newest."""
    what, option = {"lare": ("LaRE", "--lare"), "pixels": ("pixel", "--pixels")}[kind]
    indexes = manifest.get("indexes", {})
    pool = [
        (path, art)
        for path, art in sorted(manifest["artifacts"].items())
        if art["kind"] == kind
        and (index_fp is None or art["upstream"]["index"] == index_fp)
        and (split is None or split in index_splits(indexes, art))
    ]
    pool = [kv for kv in pool if kv[1]["complete"]] or (pool if allow_incomplete else [])
    if selector is None or "=" in selector:  # a fingerprint prefix names one artifact, perturbed or not
        others = {describe(perturbation_of(a)) for _, a in pool} - {describe(perturb)}
        pool = with_perturbation(pool, perturb)
        if not pool and others:
            raise UserError(
                f"{url} holds no complete {what} artifact {describe(perturb)} (it holds: "
                f"{', '.join(sorted(others))}); extract one with that --perturb/--perturb-only"
            )
    covering = f" covering split '{split}'" if split else ""
    if selector is not None:
        match = _selector(selector, option, pool)
        pool = [kv for kv in pool if match(kv)]
        if len(pool) > 1:
            raise UserError(f"{option} {selector} matches {len(pool)} artifacts of {url}: {_listing(pool)}")
        if not pool:
            raise UserError(
                f"no complete {what} artifact{covering} of {url} matches {option} {selector}; "
                f"`pipeline cache info {url}` lists them"
            )
    if not pool:
        hint = "extract with --pixels" if kind == "pixels" else "finish `pipeline extract` first"
        same = " for the index of the chosen LaRE artifact" if index_fp else ""
        raise UserError(f"{url} holds no complete {what} artifact{covering}{same} ({hint})")
    return max(pool, key=lambda kv: ((rank(kv[1]) if rank else ()), kv[1].get("created_at", "")))
