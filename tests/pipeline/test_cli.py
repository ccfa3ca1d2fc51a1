"""The CLI as a user types it: the installed `pipeline` command in a subprocess."""

import json
import os
import subprocess
import time

import pytest

from tests.helpers import (
    ONE_THREAD,
    PIPELINE,
    extract_args,
    extract_cache,
    run_cli,
    save_random_clip,
    tiny_run,
)


def test_help_lists_commands_and_options():
    top = run_cli("--help").stdout
    for command in ("extract", "cache", "synth"):
        assert command in top
    extract = run_cli("extract", "--help").stdout
    for option in (
        "--data-root",
        "--subset",
        "--model",
        "--timestep",
        "--ensemble",
        "--preprocess",
        "--prompt-template",
        "--dtype",
        "--rows-per-shard",
        "--batch-size",
    ):
        assert option in extract
    assert "verify" in run_cli("cache", "--help").stdout


def test_extract_info_verify_tamper(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    assert "wrote 12 images" in run_cli("synth", str(data), "--train", "4", "--val", "2").stdout
    args = extract_args(data, cache)
    first = run_cli(*args)
    assert "12 rows done, 0 failed" in first.stderr and "images/s" in first.stderr
    assert "no forensic signal" in first.stderr
    assert "up to date" in run_cli(*args).stderr

    zarr_path = str(cache / "sdv14.zarr")
    info = run_cli("cache", "info", zarr_path).stdout
    assert (
        "subset sdv14" in info
        and "complete 3/3 shards" in info
        and all(f" {kv}" in info for kv in ("timestep=200", "ensemble=4", "size=256", "preprocess=resize"))
    )
    import re  # each artifact's line names its index and the splits that index covers

    assert re.search(r"^lare/\w{16} +complete 3/3 shards, .*; index/\w{16} \(train,val\)$", info, re.M), info
    manifest = json.loads(run_cli("cache", "info", zarr_path, "--json").stdout)
    lare = next(a for a in manifest["artifacts"].values() if a["kind"] == "lare")
    assert lare["params"]["timestep"] == 200 and lare["n_rows"] == 12
    from stages.extract import ExtractConfig  # the options not typed take the config's defaults

    for name in (
        "timestep",
        "ensemble",
        "size",
        "preprocess",
        "prompt",
        "dtype",
        "seed",
    ):  # precision: resolved
        assert lare["params"][name] == getattr(ExtractConfig, name), name

    ok = run_cli("cache", "verify", zarr_path)
    assert ok.stdout.startswith("ok:")
    shard_key = next(iter(lare["shards"]["1"]["files"]))
    target = cache / "sdv14.zarr" / shard_key
    data_bytes = bytearray(target.read_bytes())
    data_bytes[-1] ^= 0x01
    target.write_bytes(bytes(data_bytes))
    bad = run_cli("cache", "verify", zarr_path, check=False)
    assert bad.returncode == 1
    assert "shard 1 of lare/" in bad.stderr and shard_key in bad.stderr


def test_info_on_a_missing_cache_is_one_line(tmp_path):
    proc = run_cli("cache", "info", str(tmp_path / "nothing.zarr"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no cache at" in proc.stderr


def test_storage_without_credentials_is_one_line():
    """An object store the user cannot reach with credentials: one line, exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",  # loopback: never reached, the request is refused unsigned
    )  # fmt: skip
    proc = subprocess.run(
        [PIPELINE, "cache", "verify", "s3://no-bucket/sdv14.zarr"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("Error: NoCredentialsError")


def test_a_rank_whose_peer_died_says_so_in_one_line(monkeypatch, capsys):
    """Under torchrun, the RuntimeError gloo raises in a collective when another rank has died is
    one line and exit 2 on the survivors (the dead rank's own error is the one to read)."""
    import pipeline.cli as cli

    def peer_gone():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1")

    monkeypatch.setattr(cli, "app", peer_gone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: rank 0 stopped: another process of the job ended")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: not ours to explain
    with pytest.raises(RuntimeError):
        cli.main()


_WITHOUT_TORCH = (
    "import sys\n"
    "from pipeline.cli import main\n"
    "sys.argv = ['pipeline', *sys.argv[1:]]\n"
    "try:\n    main()\n"
    "except SystemExit:\n    pass\n"
    "assert 'torch' not in sys.modules, 'torch imported'\n"
)


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a fresh interpreter that fails when torch was imported."""
    import sys

    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args], capture_output=True, text=True)


def test_help_and_the_cache_commands_start_without_torch(tmp_path):
    """`pipeline --help`, every command's --help (its defaults, its rules and the methods' own options
    read from stages.configs and the methods' declarations) and a cache command import no torch
    (seconds at each start): the stages are imported inside the commands that need them."""
    commands = [[c] for c in ("extract", "synth", "train", "eval", "calibrate", "report", "detect",
                              "robustness", "reproduce", "cache", "run", "runs")]  # fmt: skip
    info = ["cache", "info", str(tmp_path / "none.zarr")]
    for args in (["--help"], *([*c, "--help"] for c in commands), info):
        proc = _without_torch(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Usage:" in proc.stdout or args[0] == "cache", (args, proc.stdout)


def test_cache_info_describes_perturbed_artifacts_without_torch(genimage, tmp_path):
    """`cache info` on a cache holding a clean and a perturbed extraction: their selectable fields and
    the perturbation come from the manifest, read with the torch-free SPEC and params records."""
    cache = extract_cache(genimage, tmp_path)
    extract_cache(genimage, tmp_path, perturb="jpeg:60-90", perturb_only="generated", splits=("val",))
    proc = _without_torch("cache", "info", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "perturbed: jpeg:60-90 (generated only), seed 0" in proc.stdout


def test_an_unusable_device_is_refused_before_anything_is_created(tmp_path):
    """Without a GPU `cuda` and `cuda:3` (with one, a GPU it lacks), and anywhere the misspelt `gpu`, end
    in one line, exit 2, and leave no cache, run directory or results behind (an INCOMPLETE artifact
    from a refused start would mislead)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    unusable = ("cuda", "cuda:3", "gpu") if gpus == 0 else (f"cuda:{gpus}", "gpu")
    data = tmp_path / "data"
    (data / "sdv14" / "train" / "ai").mkdir(parents=True)  # a data root that would be accepted
    out = tmp_path / "out"
    commands = {
        "extract": ["--data-root", str(data), "--subset", "sdv14", "--cache-dir", str(out / "cache")],
        "train": ["--from-cache", str(tmp_path / "sdv14.zarr"), "--out", str(out / "runs")],
        "eval": ["--checkpoint", str(tmp_path / "run"), "--from-cache", str(tmp_path / "c.zarr"),
                 "--out", str(out / "results")],
        "detect": [str(data), "--checkpoint", str(tmp_path / "run"), "--out", str(out / "scores.csv")],
        "robustness": ["--data-root", str(data), "--test-subsets", "sdv14", "--out", str(out / "rob"),
                       "--cache-dir", str(out / "cache")],
    }  # fmt: skip
    for command, args in commands.items():
        for device in unusable:
            proc = run_cli(command, *args, "--device", device, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, (command, device, proc.stderr)
            assert lines[0].startswith(f"Error: --device {device}:"), (command, device, lines)
            assert not out.exists(), (command, device, list(out.rglob("*")))


def _help_defaults(*command: str) -> dict[str, str | None]:
    """option -> the default its --help shows (None: none shown), read from the rendered help."""
    import re

    text = run_cli(*command, "--help", env={"COLUMNS": "250"}).stdout
    blocks = re.split(r"\n(?=│ +(?:\* +)?--)", text)  # one block per option (its help may wrap)
    shown = {}
    for block in blocks[1:]:
        name = re.match(r"│ +(?:\* +)?(--[a-z-]+)", block).group(1)
        joined = " ".join(line.strip("│ ") for line in block.splitlines())
        m = re.search(r"\[default: \(?(.*?)\)?\]", joined)
        if "[required]" not in joined:
            shown[name] = m.group(1) if m else None
    return shown


def test_every_help_shows_each_default_from_the_stage_config():
    """Each option of extract, train, eval, calibrate, detect and robustness shows its default, and the
    value is the one the stage's config dataclass holds (the CLI retypes none of them)."""
    import dataclasses

    from stages.configs import (
        CalibrateConfig,
        DetectConfig,
        EvalConfig,
        ExtractConfig,
        RobustnessConfig,
        TrainConfig,
    )
    from stages.detectors import lol

    def defaults(source) -> dict:
        return {f.name: f.default for f in dataclasses.fields(source) if f.default is not dataclasses.MISSING}

    sources = {
        "extract": [ExtractConfig], "train": [TrainConfig, lol.Options], "eval": [EvalConfig],
        "detect": [DetectConfig],
        "calibrate": [CalibrateConfig],
        "robustness": [RobustnessConfig, TrainConfig, ExtractConfig],
    }  # fmt: skip
    renamed = {("extract", "--split"): "splits", ("robustness", "--extract-batch-size"): "batch_size"}
    compared = 0
    for command, srcs in sources.items():
        for option, text in _help_defaults(command).items():
            if option == "--help":
                continue
            assert text is not None, f"{command} {option} shows no default"
            field = renamed.get((command, option), option[2:].replace("-", "_"))
            pool = [ExtractConfig] if option == "--extract-batch-size" else srcs
            found = [defaults(s)[field] for s in pool if field in defaults(s)]
            if not found:
                continue  # an option with no stage default (--workers, --from-cache): shown as it is
            value = found[0]
            if value is None:
                assert text == "none" or text.startswith("the method's: "), (command, option, text)
            elif isinstance(value, bool):
                assert text in ({"on", option[2:]} if value else {"off", f"no-{option[2:]}"}), (
                    command,
                    option,
                )
            else:
                expected = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                assert text == expected, (command, option, text, expected)
            compared += 1
    assert compared > 80
    for command in (["report"], ["synth"], ["cache", "info"], ["cache", "verify"], ["cache", "push"]):
        shown = _help_defaults(*command)
        assert all(text is not None for option, text in shown.items() if option != "--help"), shown
    assert _help_defaults("train")["--epochs"] == "the method's: egre 50, lol 20"


def test_precision_and_loader_workers_help_say_the_stages_rule_with_its_constants(monkeypatch):
    """extract's and train's --precision and --loader-workers help is pipeline.config's rule described
    (describe_precision, describe_loader_workers) with the constants the stage applies it with: a
    changed constant changes the rule and the help alike, and no help text restates a rule."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import describe_loader_workers, describe_precision
    from pipeline.errors import UserError
    from stages import configs, train

    def shown(command: str) -> str:  # the help's words in order, the table's frame and wrapping removed
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output
        return " ".join(out.replace("│", " ").split())

    def constants():  # command -> (offered precisions, auto on CUDA, most loader workers), as applied
        return {
            "extract": (configs.EXTRACT_PRECISIONS, configs.EXTRACT_ON_CUDA, configs.DECODE_WORKERS),
            "train": (configs.TRAIN_PRECISIONS, configs.TRAIN_ON_CUDA, configs.READ_WORKERS),
        }

    for changed in (False, True):
        if changed:
            monkeypatch.setattr(configs, "EXTRACT_ON_CUDA", "bf16")
            monkeypatch.setattr(configs, "DECODE_WORKERS", 5)
            monkeypatch.setattr(configs, "TRAIN_PRECISIONS", ("fp32",))
            monkeypatch.setattr(configs, "TRAIN_ON_CUDA", "fp32")
            monkeypatch.setattr(configs, "READ_WORKERS", 3)
        for command, (offered, on_cuda, most) in constants().items():
            text = shown(command)
            assert describe_precision(offered, on_cuda) in text, (command, text)
            assert describe_loader_workers(most) in text, (command, text)
            assert f"({on_cuda} on CUDA" in text and f"at most {most} per GPU" in text, (command, text)
    # the rule applies the same constants the help describes
    assert configs.ExtractConfig(data_root="unused", subset="sdv14").resolved_precision("cuda") == "bf16"
    assert train.resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(UserError, match="one of auto, fp32, not 'bf16'"):
        train.resolve_precision("bf16", "cpu")


def test_an_option_shared_by_commands_is_one_declaration():
    """An option of the same name in two commands has the same flags and help (robustness takes
    extract's and train's as they are), but for the few whose meaning is the command's own."""
    import typer.main

    from pipeline.cli import app

    commands = typer.main.get_command(app).commands
    own = {
        "help",
        "out",
        "from_cache",
        "split",
        "batch_size",
        "precision",
        "loader_workers",
        "pixels",
        "perturb",
        "data_root",  # extract: any dataset's folder; robustness: GenImage's subsets
    }
    seen: dict[str, tuple] = {}
    shared = 0
    for name in ("extract", "train", "eval", "calibrate", "detect", "robustness"):
        for p in commands[name].params:
            if p.name in own:
                continue
            declared = (p.opts, p.secondary_opts, getattr(p, "help", None))
            if p.name in seen:
                assert declared == seen[p.name], (name, p.name, declared, seen[p.name])
                shared += 1
            seen.setdefault(p.name, declared)
    assert shared >= 30, shared

    def helps(command: str) -> dict[str, str]:
        return {p.name: getattr(p, "help", None) for p in commands[command].params}

    extract, train = helps("extract"), helps("train")
    assert helps("robustness")["batch_size"] == train["batch_size"]
    assert helps("robustness")["extract_batch_size"] == extract["batch_size"] == helps("detect")["batch_size"]


@pytest.fixture(scope="module")
def small_cache(genimage, tmp_path_factory):
    """The session's synthetic sdv14 set extracted with the tiny model (64 px pixel crops)."""
    return extract_cache(genimage, tmp_path_factory.mktemp("cli-cache"))


def test_an_offline_pretrained_backbone_fails_at_once_naming_the_fix(small_cache, tmp_path):
    """Offline with no cached CLIP weights: one line naming --backbone-weights, within seconds (no hub
    retries), and no run directory left behind."""
    args = ["train", "--from-cache", str(small_cache), "--out", str(tmp_path / "runs"), "--no-progress",
            "--backbone", "RN50", "--backbone-weights", "openai", "--crop-size", "32"]  # fmt: skip
    env = {
        **ONE_THREAD,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path),
    }
    t0 = time.monotonic()
    proc = run_cli(*args, check=False, env=env)
    seconds = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("Error: ") and "--backbone-weights" in errors[0], errors
    assert seconds < 60, seconds
    assert not (tmp_path / "runs").exists()


def test_a_missing_backbone_fails_at_once_when_the_hub_cannot_be_reached(small_cache, tmp_path):
    """No HF_HUB_OFFLINE, just no network (the loopback guard refuses the hub): one quick connection
    attempt, then one line naming the fix, instead of huggingface_hub's minute of retries."""
    from tests.servers import guarded_env

    args = ["train", "--from-cache", str(small_cache), "--out", str(tmp_path / "runs"), "--no-progress",
            "--backbone", "RN50", "--backbone-weights", "openai", "--crop-size", "32"]  # fmt: skip
    env = {**ONE_THREAD, **guarded_env(), "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path)}  # fmt: skip
    t0 = time.monotonic()
    proc = run_cli(*args, check=False, env=env)
    seconds = time.monotonic() - t0
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "not in the local Hugging Face cache, and the hub cannot be reached" in errors[0], errors
    assert "--backbone-weights PATH" in errors[0] and "Retrying" not in proc.stderr
    assert seconds < 30, seconds  # the retries alone took 46 s here
    assert not (tmp_path / "runs").exists()


def test_offline_a_cached_backbone_loads_from_the_hub_cache(tmp_path, monkeypatch):
    """Offline, the weights open_clip would download come from the local hub cache, in the hub's own
    layout (refs/main -> snapshots/<rev>/<file>), without a connection."""
    import huggingface_hub
    import torch
    from safetensors.torch import load_file

    from stages.detectors import backbone

    snapshot = tmp_path / "hub" / "models--timm--resnet50_clip.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("abc123")
    weights = save_random_clip("RN50", snapshot / "open_clip_model.safetensors", seed=7)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(backbone, "_hub_reachable", lambda: False)
    assert backbone.offline_weights("RN50", "openai") == str(weights)
    visual = backbone.load_visual(backbone.BackboneSpec("RN50", "openai"), 224)
    saved = load_file(str(weights))
    assert all(torch.equal(v, saved[f"visual.{k}"]) for k, v in visual.state_dict().items())


def test_eval_and_detect_of_a_random_backbone_run_say_so(small_cache, genimage, tmp_path):
    """A run whose CLIP backbone started from random weights is flagged like random SD weights are."""
    run = tiny_run(small_cache, tmp_path / "runs", "egre", epochs=1)
    evaluated = run_cli("eval", "--checkpoint", str(run), "--from-cache", str(small_cache),
                        "--out", str(tmp_path / "results"), "--no-progress", env=ONE_THREAD)  # fmt: skip
    detected = run_cli("detect", str(genimage), "--checkpoint", str(run), "--out", str(tmp_path / "s.csv"),
                       "--no-progress", env=ONE_THREAD)  # fmt: skip
    for proc in (evaluated, detected):
        said = proc.stdout + proc.stderr
        assert "backbone 'tiny-RN' started from random weights" in said, said
        assert "model 'tiny' has random weights" in said, said  # the same kind of note as for the SD model


def test_robustness_reuses_what_pipeline_extract_made(tmp_path):
    """Caches a user extracted with `pipeline extract` (both splits) are reused by a study with the same
    parameters, though it needs only the val split of a test subset: no clean map is computed again."""
    from stages.genimage.synthetic import make_genimage

    data, cache = tmp_path / "data", tmp_path / "cache"
    make_genimage(data, "sdv14", {"train": 4, "val": 3}, seed=2)
    make_genimage(data, "adm", {"train": 4, "val": 3}, seed=3)
    same = [
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "32",
        "--pixel-size",
        "64",
        "--rows-per-shard",
        "8",
    ]
    for subset in ("sdv14", "adm"):
        run_cli("extract", "--data-root", str(data), "--subset", subset, "--cache-dir", str(cache), *same,
                "--no-progress", env=ONE_THREAD)  # fmt: skip

    def clean_maps() -> dict[str, set[str]]:
        out = {}
        for subset in ("sdv14", "adm"):
            manifest = json.loads((cache / f"{subset}.zarr" / "manifest.json").read_text())
            out[subset] = {p for p, a in manifest["artifacts"].items() if not a["params"].get("perturb")}
        return out

    before = clean_maps()
    study = run_cli("robustness", "--data-root", str(data), "--train-subset", "sdv14", "--test-subsets",
                    "adm", "--grid", "aigcdetect", "--out", str(tmp_path / "out"), "--cache-dir", str(cache),
                    *same, "--backbone", "tiny-RN", "--backbone-weights", "random", "--crop-size", "32",
                    "--epochs", "1", "--batch-size", "8", "--no-progress", env=ONE_THREAD)  # fmt: skip
    assert clean_maps() == before
    for subset in ("sdv14", "adm"):
        assert f"{subset}: up to date, reusing lare/" in study.stderr, study.stderr
