"""The `pipeline` command: extract caches; inspect, verify and share them; train, evaluate, report, detect.

One module per group of commands: extract (extract, synth), cache (the `cache` group), runs (train,
eval, calibrate, report, detect), run (the `run` group: push, pull, verify; and `runs`, the table
of runs), study (robustness); options holds every option they share,
declared once, and the --help defaults read from the stages' config dataclasses.

Bad input ends in one line on stderr and exit code 2 (pipeline.errors.UserError), never a traceback.

Layering: `pipeline/` (orchestration) is used by `stages/`; the CLI is the one place where
`pipeline/` calls into `stages/` (tests/system/test_layers.py checks it). It imports each
stage inside its command, so that `pipeline --help`, every command's --help (the defaults come from
the torch-free stages.configs) and the cache commands start without torch.
"""

from __future__ import annotations

import os
import sys

import typer

from pipeline.cli import cache, extract, run, runs, study
from pipeline.cli.options import show_progress_lines
from pipeline.errors import UserError, first_line

app = typer.Typer(
    help="Feature-cache pipeline for detecting diffusion-generated images (LaRE^2, Learning on Less).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(extract.app)
app.add_typer(runs.app)
app.add_typer(study.app)
app.add_typer(cache.app, name="cache")
app.add_typer(run.app, name="run")
app.add_typer(run.table_app)
show_progress_lines()  # the stages say what they do through `logging`; a command shows it on stderr

# botocore's credential errors are not OSErrors; named, so that botocore need not be imported.
_STORAGE_ACCESS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}
_PEER_GONE = "Connection closed by peer"  # what gloo raises in a collective whose peer has gone


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UserError as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished shards are kept; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:
        # Storage the user pointed at refused us (permissions, no credentials, a full disk): one line.
        if isinstance(e, OSError) or type(e).__name__ in _STORAGE_ACCESS_ERRORS:
            typer.echo(f"Error: {type(e).__name__}: {first_line(e)}", err=True)
            sys.exit(2)
        # Under torchrun: another rank died (its own error is above); gloo says so in a RuntimeError.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _PEER_GONE in str(e):
            rank = os.environ.get("RANK", "?")
            typer.echo(f"Error: rank {rank} stopped: another process of the job ended ({_PEER_GONE})",
                       err=True)  # fmt: skip
            sys.exit(2)
        raise
