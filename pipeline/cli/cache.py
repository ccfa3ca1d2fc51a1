"""`pipeline cache`: what a cache holds, whether it is intact, and copying it to and from shared storage.

They read the manifest and the stored objects, without torch (`cache info` describes artifacts
with stages.runs.choice and stages.features.perturb_spec, which import none)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import typer

from pipeline.cli.options import help_defaults

if TYPE_CHECKING:
    from pipeline.schema import IndexAttrs, ManifestArtifact

app = typer.Typer(help="Inspect, check and share caches.", no_args_is_help=True)


def _describe_artifact(path: str, art: ManifestArtifact, indexes: Mapping[str, IndexAttrs]) -> list[str]:
    """The artifact's lines in `cache info`: its path names it (`--lare`/`--pixels` take the fingerprint
    prefix after the slash), its index and splits, then its parameters as those options filter them."""
    from pipeline.schema import index_path, index_splits
    from stages.features.perturb_spec import Perturbation, describe
    from stages.runs.choice import selectable_fields

    state = "complete" if art["complete"] else "INCOMPLETE"
    done = f"{art['shards_done']}/{art['n_shards']} shards"
    index = index_path(art["upstream"]["index"])
    splits = ",".join(index_splits(indexes, art))
    head = f"{path:<28} {state} {done}, {art['n_rows']} rows, {art['n_failed']} failed; {index} ({splits})"
    lines = [head]
    p = art.get("params", {})
    if art["kind"] == "lare":
        m = art.get("model", {})
        note = "  (random weights: no forensic signal)" if m.get("source") == "random" else ""
        lines.append(
            f"  model {m.get('spec')} [{m.get('source')}, weights {str(m.get('weights'))[:12]}]{note}"
        )
        if p.get("preprocess") == "resize" and "resample" not in p:
            lines.append("  resize (bilinear, schema 1): not the reference's bicubic")
        if fallback := art.get("prompt_fallback"):
            examples = f" (e.g. {', '.join(fallback['examples'][:3])})" if fallback["rows"] else ""
            lines.append(
                f"  {fallback['rows']} row(s) with no class in the file name used '{p['prompt']}'{examples}"
            )
    lines.append(f"  {selectable_fields(art)}")
    if perturbed := Perturbation.from_record(p.get("perturb")):
        lines.append(f"  perturbed: {describe(perturbed)}, seed {perturbed.seed}")
    return lines


def _describe_formats(store, path: str, attrs) -> list[str]:
    """Rows per generator x class x source format and JPEG quality of an index (the format bias of a
    data set, generator by generator), then the images under no label folder, which it did not index."""
    from stages.genimage.index import format_table

    group = store.group[path]
    names = [n for n in ("label", "format", "jpeg_quality", "generator") if n in group]
    table = format_table({n: group[n][:] for n in names}, attrs["subset"])
    lines = []
    several = len(table) > 1  # one generator: a line per class, as before generators were recorded
    for gen, mix in table.items():
        if several:
            lines.append(f"  {gen}:")
        for cls in ("real", "generated"):
            kinds = sorted(mix.get(cls, {}).items(), key=lambda kv: (-kv[1], kv[0]))
            if several and not kinds:
                continue
            shown = ", ".join(f"{k} x{n}" for k, n in kinds[:8])
            more = f", {len(kinds) - 8} more" if len(kinds) > 8 else ""
            lines.append(f"{'    ' if several else '  '}{cls}: {shown or 'none'}{more}")
    if attrs.get("pairs"):
        lines.append(
            "  reals of each generator: "
            + "; ".join(f"{g}: {', '.join(r)}" for g, r in attrs["pairs"].items())
        )
    unlabelled = attrs.get("unlabelled") or {"count": 0, "examples": []}
    if unlabelled["count"]:
        lines.append(f"  not indexed, under no label folder ({unlabelled['count']}):")
        lines += [f"    {p}" for p in unlabelled["examples"]]
        if unlabelled["count"] > len(unlabelled["examples"]):
            lines.append(f"    ... {unlabelled['count'] - len(unlabelled['examples'])} more")
    return lines


@app.command("info", cls=help_defaults())
def cache_info(
    cache: str = typer.Argument(..., help="Path or URL of a <subset>.zarr cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """What a cache holds: index, artifacts (parameters, model, progress) and failed rows."""
    from pipeline.schema import LEGACY_SCHEMAS, MIGRATES
    from pipeline.store import CacheStore

    store = CacheStore(cache, mode="r")
    manifest = store.read_manifest() or store.build_manifest()
    if as_json:
        typer.echo(json.dumps(manifest, indent=1, sort_keys=True))
        return
    typer.echo(
        f"cache {cache}  dataset {manifest['subset']}  schema {manifest['schema_version']}  "
        f"updated {manifest['updated_at']}"
    )
    if manifest["schema_version"] in MIGRATES:
        typer.echo(
            f"schema {manifest['schema_version']}: {MIGRATES[manifest['schema_version']]} (an extraction "
            "into it migrates it in place)"
        )
    if manifest["schema_version"] in LEGACY_SCHEMAS:
        typer.echo(
            f"schema {manifest['schema_version']}: {LEGACY_SCHEMAS[manifest['schema_version']]}; read-only"
        )
    for path, attrs in sorted(manifest["indexes"].items()):
        latest = "  (latest)" if path == manifest.get("latest_index") else ""
        typer.echo(f"{path:<28} {attrs['n_rows']} rows, splits {','.join(attrs['splits'])}{latest}")
        if attrs.get("layout"):
            typer.echo(f"  {attrs['layout']}")
        for line in _describe_formats(store, path, attrs):
            typer.echo(line)
    failed: dict[str, str] = {}
    for path, art in sorted(manifest["artifacts"].items()):
        for line in _describe_artifact(path, art, manifest["indexes"]):
            typer.echo(line)
        for f in art["failed"]:
            failed.setdefault(f["path"], f["reason"])
    if failed:
        typer.echo(f"failed rows ({len(failed)}):")
        for path, reason in sorted(failed.items()):
            typer.echo(f"  {path}: {reason}")


@app.command("verify")
def cache_verify(cache: str = typer.Argument(..., help="Path or URL of a <subset>.zarr cache.")) -> None:
    """Recompute every checksum in the manifest: exit 0 when intact, 1 naming each damaged object."""
    from pipeline.integrity import manifest_files, verify
    from pipeline.store import CacheStore

    store = CacheStore(cache, mode="r")
    problems = verify(store, progress=sys.stderr.isatty())
    if problems:
        for line in problems:
            typer.echo(f"FAILED {line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {len(manifest_files(store.manifest()))} objects match the manifest of {cache}")


def _copy(src: str, dst: str, jobs: int, recheck: bool, verb: str) -> None:
    from pipeline.share import copy_cache

    report = copy_cache(src, dst, jobs=jobs, progress=sys.stderr.isatty(), recheck=recheck)
    typer.echo(report.line(verb, src, dst))


_JOBS = typer.Option(8, "--jobs", "-j", help="Objects copied in parallel.")
_RECHECK = typer.Option(
    False, "--recheck", help="Read back objects the target's manifest vouches for (repairs a damaged target)."
)


@app.command("push", cls=help_defaults())
def cache_push(
    local: str = typer.Argument(..., help="The <subset>.zarr cache to share (path or URL)."),
    url: str = typer.Argument(..., help="Where to put it: s3://bucket/prefix/<subset>.zarr, a folder, ..."),
    jobs: int = _JOBS,
    recheck: bool = _RECHECK,
) -> None:
    """Copy a cache to shared storage: only objects missing or different there; resumable; manifest last."""
    _copy(local, url, jobs, recheck, "pushed")


@app.command("pull", cls=help_defaults())
def cache_pull(
    url: str = typer.Argument(..., help="A shared cache: s3://..., https://..., a .zip, a folder."),
    local: str = typer.Argument(..., help="Local <subset>.zarr folder to copy it into."),
    jobs: int = _JOBS,
    recheck: bool = _RECHECK,
) -> None:
    """Copy a shared cache here: only objects missing or different; resumable; checked on arrival."""
    _copy(url, local, jobs, recheck, "pulled")
