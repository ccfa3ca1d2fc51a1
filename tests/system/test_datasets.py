"""Any dataset, as a user types it: every `pipeline extract` command of the README's "Your own data and
other benchmarks" runs on a small tree of its dataset's shape (built here), and a run trained on a
GenImage-layout cache is evaluated on ForenSynths-, manifest-, pair- and one-class-shaped caches,
per generator, with the report's columns checked."""

from __future__ import annotations

import csv
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.store import CacheStore, latest
from stages.genimage import index
from tests.helpers import ONE_THREAD, ROOT, TINY_TRAIN, make_folder, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.cli]

# what the README's commands leave to the user (`add --cache-dir, --model, --device`), for the tiny model;
# the geometry of the `learn_set` cache, so that its EGRE run can score these caches
TINY = (
    "--cache-dir",
    "cache",
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--size",
    "64",
    "--pixel-size",
    "64",
    "--preprocess",
    "crop",
    "--rows-per-shard",
    "16",
    "--no-progress",
)


def readme_commands() -> dict[str, list[str]]:
    """--dataset NAME -> the README's `pipeline extract` command for it, as tokens."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own data and other benchmarks", 1)[1].split("\n## ", 1)[0]
    block = section.split("<!-- datasets:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("pipeline extract")]
    commands = [shlex.split(ln)[1:] for ln in lines]
    return {c[c.index("--dataset") + 1]: c for c in commands}


def _pair(base: Path, real: str, fake: str, k: int) -> None:
    if not (base / real).exists():  # a real folder serving several generators is written once
        make_folder(base / real, 2, False, 2 * k, "JPEG")
    make_folder(base / fake, 2, True, 2 * k + 1, "PNG")


def _labelled(base: Path, folders: list[str], real: str = "0_real", fake: str = "1_fake", n: int = 2) -> None:
    for k, f in enumerate(folders):
        make_folder(base / f / real, n, False, 10 * k)
        make_folder(base / f / fake, n, True, 10 * k + 1)


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _synthbuster(tmp: Path) -> None:
    rows = []
    for k, typ in enumerate(("real", "dalle2", "firefly")):
        folder = "real_RAISE_1k" if typ == "real" else typ
        for p in make_folder(tmp / "synthbuster" / folder, 2, typ != "real", 40 + k, "PNG"):
            rows.append([f"synthbuster/{folder}/{p.name}", typ])
    _csv(tmp / "commercial_tools.csv", ["filename", "typ"], rows)


def _synthwildx(tmp: Path) -> None:
    rows = []
    for k, typ in enumerate(("real", "dalle3")):
        for p in make_folder(tmp / "synthwildx" / typ, 2, typ != "real", 50 + k, "JPEG"):
            rows.append([f"https://x.com/{p.stem}", f"{typ}/{p.name}", typ])
    _csv(tmp / "synthwildx" / "list.csv", ["url", "filename", "typ"], rows)


def _bfree(tmp: Path) -> None:
    reals = make_folder(tmp / "images", 2, False, 60)
    fakes = make_folder(tmp / "images", 2, True, 61)
    labels = ["0", "REAL", "1", "FAKE"]
    _csv(
        tmp / "metainfo.csv",
        ["filename", "label"],
        [[f"images/{p.name}", lab] for p, lab in zip(reals + fakes, labels, strict=True)],
    )


# --dataset -> (tree builder, the generators its cache must hold, its splits)
SHAPES: dict[str, tuple[Callable[[Path], None], set[str], set[str]]] = {
    "mine": (
        lambda t: (
            make_folder(t / "my_images" / "real", 2, False, 1),
            make_folder(t / "my_images" / "holiday" / "fake", 2, True, 2),
        ),
        {"holiday"},
        {"test"},
    ),
    "chameleon": (lambda t: _labelled(t / "Chameleon", ["test"]), {"chameleon"}, {"test"}),
    "aigcdetect": (
        lambda t: _labelled(t / "test", ["ADM", "progan/car", "progan/cat"]),
        {"ADM", "progan"},
        {"test"},
    ),
    "forensynths": (
        lambda t: _labelled(t / "CNN_synth_testset", ["crn", "progan/airplane", "progan/car"]),
        {"crn", "progan"},
        {"test"},
    ),
    "progan": (
        lambda t: _labelled(t / "CNNDetection" / "train", ["airplane", "bird"]),
        {"progan"},
        {"train"},
    ),
    "univfd": (
        lambda t: [
            _pair(t / "diffusion_datasets", r, f"{g}/1_fake", k)
            for k, (r, g) in enumerate(
                [
                    ("imagenet/0_real", "guided"),
                    ("laion/0_real", "ldm_200"),
                    ("laion/0_real", "glide_100_27"),
                    ("laion/0_real", "dalle"),
                ]
            )
        ],
        {"guided", "ldm_200", "glide_100_27", "dalle"},
        {"test"},
    ),
    "synthbuster": (_synthbuster, {"dalle2", "firefly"}, {"test"}),
    "drct-2m": (
        lambda t: [
            _pair(t, "MSCOCO/val2017", f"DRCT-2M/{g}/val2017", k)
            for k, g in enumerate(["sd-turbo", "stable-diffusion-v1-4"])
        ],
        {"sd-turbo", "stable-diffusion-v1-4"},
        {"test"},
    ),
    "aigibench": (
        lambda t: (
            _labelled(t / "AIGIBench" / "train", ["car", "sdv1.4"], n=4),
            _labelled(t / "AIGIBench" / "test", ["FLUX", "SD3"]),
        ),
        {"car", "sdv1.4", "FLUX", "SD3"},
        {"train", "test"},
    ),
    "wildrf": (
        lambda t: (
            _labelled(t / "WildRF", ["train", "val"], n=4),
            _labelled(t / "WildRF" / "test", ["reddit", "twitter"]),
        ),
        {"wildrf", "reddit", "twitter"},
        {"train", "val", "test"},
    ),
    "synthwildx": (_synthwildx, {"dalle3"}, {"test"}),
    "community-forensics": (
        lambda t: _labelled(t / "community_forensics", ["sdxl", "dalle"], "real", "fake"),
        {"sdxl", "dalle"},
        {"test"},
    ),
    "bfree": (_bfree, {"bfree"}, {"test"}),
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """A folder holding a small tree of each README dataset's shape and, in cache/, what each README
    command extracted from it (run as typed, from that folder, with the tiny model)."""
    tmp = tmp_path_factory.mktemp("datasets")
    commands = readme_commands()
    assert set(commands) == set(SHAPES), set(commands) ^ set(SHAPES)  # a README command without a test fails
    for name, (build, _, _) in SHAPES.items():
        build(tmp)
        proc = run_cli(*commands[name], *TINY, cwd=tmp, env=ONE_THREAD)
        assert f"{name}: " in proc.stderr and "rows done" in proc.stderr, proc.stderr
    return tmp


def _index(cache: Path) -> tuple[dict, dict]:
    store = CacheStore(str(cache))
    path = latest(store.tables("index"))
    assert path is not None
    return store.read_table(path)


def test_every_readme_dataset_command_indexes_its_shape(datasets):
    for name, (_, generators, splits) in SHAPES.items():
        cols, attrs = _index(datasets / "cache" / f"{name}.zarr")
        assert index.generated_by(cols, name) == sorted(generators), name
        assert set(cols["split"]) == splits and attrs["unlabelled"]["count"] == 0, name
        assert attrs["subset"] == name
    # ForenSynths' multi-class generators keep their class as the group; one real folder serving three
    # generators is indexed once; Synthbuster's manifest reals are `real`
    cols, _ = _index(datasets / "cache" / "forensynths.zarr")
    grouped = {g for g, k in zip(cols["generator"], cols["group"], strict=True) if k}
    assert grouped == {"progan"}
    assert set(cols["group"]) == {"", "airplane", "car"}
    cols, attrs = _index(datasets / "cache" / "univfd.zarr")
    assert len(cols["path"]) == 4 + 4 * 2 and attrs["pairs"]["dalle"] == ["laion/0_real"]
    info = run_cli("cache", "info", str(datasets / "cache" / "forensynths.zarr")).stdout
    assert re.search(
        r"\n  crn:\n    real: [^\n]+\n    generated: png x2\n  progan:\n    real: [^\n]+\n    generated: ",
        info,
    )
    assert "labelled folders under CNN_synth_testset" in info
    assert run_cli("cache", "verify", str(datasets / "cache" / "univfd.zarr")).returncode == 0


def test_the_format_shortcut_is_warned_in_one_line(tmp_path):
    _pair(tmp_path, "reals", "fakes", 0)  # JPEG reals, PNG fakes
    proc = run_cli(
        "extract",
        "--dataset",
        "shortcut",
        "--pair",
        "reals",
        "fakes=gen",
        *TINY,
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    (line,) = [ln for ln in proc.stderr.splitlines() if "warning:" in ln]
    assert "real files are 100% jpeg, the generated 100% png" in line and "Fake or JPEG" in line


def test_bad_data_options_are_one_line(tmp_path):
    make_folder(tmp_path / "flat", 2, False, 1)
    (tmp_path / "m.csv").write_text("path,label\nnope.png,1\n")
    for args, message in (
        (
            ["--data-root", "flat", "--dataset", "flat"],
            "no labelled image files under flat: a file's label is its nearest folder named real: 0_real",
        ),
        (["--data-root", "flat", "--dataset", "bad/name"], "--dataset 'bad/name': use letters, digits"),
        (["--data-root", "flat"], "--data-root needs --dataset NAME"),
        (
            ["--manifest", "m.csv", "--dataset", "m"],
            "1 bad row(s), nothing written: row 2 (nope.png): no such file",
        ),
        (["--pair", "flat", "--dataset", "p"], "--pair takes two values: REAL_DIR FAKE_DIR[=GENERATOR]"),
        (["--subset", "sdv14", "--dataset", "x", "--data-root", "flat"], "--subset is a GenImage subset"),
    ):
        proc = run_cli("extract", *args, *TINY, cwd=tmp_path, check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)
        assert not (tmp_path / "cache" / "m.zarr").exists()


def test_train_on_genimage_then_eval_and_report_per_dataset_and_generator(datasets, learn_set, tmp_path):
    """A run trained on a GenImage-layout cache, evaluated on a ForenSynths-shaped, a manifest-defined,
    a paired and a one-class cache: every metric per generator against the reals that go with it."""
    make_folder(datasets / "flux" / "1_fake", 3, True, 70)  # a folder of one generator's images alone
    run_cli("extract", "--data-root", "flux", "--dataset", "flux", *TINY, cwd=datasets, env=ONE_THREAD)
    run = run_cli(
        "train",
        "--from-cache",
        str(learn_set[1]),
        "--method",
        "egre",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "runs"),
        "--no-progress",
        *TINY_TRAIN,
        env=ONE_THREAD,
    ).stdout.strip()
    caches = [str(datasets / "cache" / f"{n}.zarr") for n in ("forensynths", "synthbuster", "univfd", "flux")]
    proc = run_cli(
        "eval",
        "--checkpoint",
        run,
        "--from-cache",
        *caches,
        "--out",
        str(tmp_path / "results"),
        "--no-progress",
        env=ONE_THREAD,
    )
    results = {
        r["test_subset"]: r
        for r in (json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json"))
    }
    assert set(results) == {"forensynths", "synthbuster", "univfd", "flux"}
    assert {r["split"] for r in results.values()} == {"test"}  # auto: these caches have a test split
    fs = results["forensynths"]["by_generator"]
    assert (fs["progan"]["n_real"], fs["progan"]["n_generated"], fs["crn"]["n_real"]) == (
        4,
        4,
        2,
    )  # its own reals
    sb = results["synthbuster"]["by_generator"]
    assert (
        sb["dalle2"]["n_real"] == sb["firefly"]["n_real"] == 2 and sb["dalle2"]["n_generated"] == 2
    )  # every real
    uv = results["univfd"]["by_generator"]
    assert (
        len(uv) == 4 and uv["guided"]["n_real"] == 2 and uv["dalle"]["n_real"] == uv["ldm_200"]["n_real"] == 2
    )
    assert (
        results["univfd"]["metrics"]["n_real"] == 4
    )  # the LAION reals scored once, serving three generators
    flux = results["flux"]["metrics"]
    assert flux["ap"] is None and flux["undefined"]["ap"] == "needs real and generated rows"
    assert flux["generated_acc"] is not None and "AP undefined (needs real and generated rows)" in proc.stdout
    report = run_cli(
        "report", str(tmp_path / "results"), "--metric", "ap", "--csv", str(tmp_path / "ap.csv")
    ).stdout
    with open(tmp_path / "ap.csv") as f:
        head, row = list(csv.reader(f))
    columns = [c for c in head[1:] if not c.startswith("n:") and c != "mean"]
    assert columns == sorted(
        [
            "flux",
            "forensynths:crn",
            "forensynths:progan",
            "synthbuster:dalle2",
            "synthbuster:firefly",
            "univfd:dalle",
            "univfd:glide_100_27",
            "univfd:guided",
            "univfd:ldm_200",
        ]
    )
    assert row[1 + columns.index("flux")] == "n/a" and "n/a" in report and "nan" not in report.lower()
    card = (Path(run) / "README.md").read_text()  # the run's model card: a section per test set
    assert "### flux (test)" in card and "| ap | undefined |" in card and "| progan |" in card


def test_train_on_several_datasets_and_chosen_generators(datasets, tmp_path):
    caches = [str(datasets / "cache" / f"{n}.zarr") for n in ("aigibench", "wildrf")]
    common = [
        "--method",
        "lol",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
        "--no-progress",
        *TINY_TRAIN,
    ]
    both = Path(run_cli("train", "--from-cache", *caches, *common, env=ONE_THREAD).stdout.strip())
    sample = json.loads((both / "sample.json").read_text())
    assert [c["subset"] for c in sample["caches"]] == ["aigibench", "wildrf"] and all(
        c["rows"] for c in sample["caches"]
    )
    assert both.name.startswith("lol-aigibench+wildrf-")
    one = Path(
        run_cli(
            "train", "--from-cache", caches[0], "--generators", "sdv1.4", *common, env=ONE_THREAD
        ).stdout.strip()
    )
    paths = [p for c in json.loads((one / "sample.json").read_text())["caches"] for p in c["paths"]]
    assert paths and all(p.startswith("train/sdv1.4/") for p in paths)  # its generated rows and its own reals
    assert json.loads((one / "params.json").read_text())["hparams"]["generators"] == ["sdv1.4"]
    proc = run_cli("train", "--from-cache", caches[0], "--generators", "dalle", *common, check=False)
    assert proc.returncode == 2 and "no generator dalle in" in proc.stderr and "sdv1.4" in proc.stderr
