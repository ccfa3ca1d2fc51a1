"""Sharing and listing runs: the `run` group (push, pull, verify) and `pipeline runs` (the table of
runs; `pipeline runs diff A B`). pipeline.runstore holds the run manifest and the copying;
stages.runs.listing reads the run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline import runstore
from pipeline.errors import UserError

app = typer.Typer(
    help="Share runs: push, pull and verify a run at any URL (folder, file://, s3://, https://, .zip)."
)
table_app = typer.Typer()

Jobs = Annotated[int, typer.Option(help="Files copied in parallel.")]


@app.command()
def push(
    run: Annotated[str, typer.Argument(help="A finished run directory (or URL).")],
    url: Annotated[str, typer.Argument(help="Where the run goes: a folder, file://, s3://...")],
    jobs: Jobs = 4,
) -> None:
    """Copy a run to URL: only the files missing or different there, its run-manifest.json last."""
    _copy("pushed", run, url, jobs)


@app.command()
def pull(
    url: Annotated[str, typer.Argument(help="The run's URL (folder, file://, s3://, https://, .zip).")],
    folder: Annotated[str, typer.Argument(help="The run directory to write, e.g. runs/<run>.")],
    jobs: Jobs = 4,
) -> None:
    """Copy a run from URL into a local run directory: only what differs, checked, the manifest last."""
    _copy("pulled", url, folder, jobs)


def _copy(verb: str, src: str, dst: str, jobs: int) -> None:
    report = runstore.copy_run(src, dst, jobs=jobs)
    typer.echo(report.line(verb, src, dst).replace("objects", "files"))


@app.command("verify")
def verify_(
    url: Annotated[str, typer.Argument(help="A run directory or URL.")],
    jobs: Jobs = 8,
) -> None:
    """Recompute the checksum of every file of a run: exit 0 when intact, 1 naming each damaged file."""
    problems = runstore.verify(url, jobs=jobs, progress=True)
    for line in problems:
        typer.echo(f"{url}: {line}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{url}: intact (every file matches {runstore.MANIFEST})")


@table_app.command("runs")
def runs_(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders of runs or run directories (default: runs); `diff A B` compares two runs."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run, as a list.")] = False,
) -> None:
    """A table of runs: method, training subsets, epochs done/planned, best epoch, validation AUC,
    thresholds, fingerprint, status (finished / stopped at epoch N / failed). `pipeline runs diff
    RUN_A RUN_B`: the parameters and inputs that differ."""
    from stages.runs import listing

    args = args or ["runs"]
    if args[0] == "diff":
        if len(args) != 3:
            raise UserError("pipeline runs diff takes two run directories: pipeline runs diff RUN_A RUN_B")
        a, b = Path(args[1]), Path(args[2])
        differences = listing.diff(a, b)
        if as_json:
            typer.echo(json.dumps({k: {"a": va, "b": vb} for k, (va, vb) in differences.items()}, indent=1))
        else:
            typer.echo(listing.diff_text(a, b, differences))
        return
    rows = [listing.row(run) for run in listing.find_runs(args)]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
    elif not rows:
        typer.echo(f"no runs under {' '.join(args)}")
    else:
        typer.echo(listing.table(rows))
