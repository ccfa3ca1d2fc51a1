"""The README, docs and Makefile say what is true: every command and option they show exists, the
layout names every module, no link leaves the repository, `make` passes each command its own
defaults, and the README's demo robustness command runs as typed."""

import subprocess

from tests.helpers import ONE_THREAD, ROOT, run_cli


def test_readme_recipes_use_only_options_the_commands_have():
    """Each `pipeline <command> --option` of the README's reproduction recipes is in its --help (the
    recipes run `pipeline reproduce` alone: the loops over subsets it replaced are gone)."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Reproduce the papers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line.strip() for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    used: dict[str, set[str]] = {}
    for line in commands:
        for m in re.finditer(r"pipeline (\w+)(.*?)(?:\)|;|$)", line):
            used.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", m.group(2)))
    assert set(used) == {"reproduce", "synth"}
    assert {"--dry-run", "--scale", "--subsets", "--epochs", "--data-root"} <= set().union(*used.values())
    for command, options in used.items():
        help_text = run_cli(command, "--help", env={"COLUMNS": "200"}).stdout
        for option in options:
            assert re.search(rf"(?<![\w-]){option}(?![\w-])", help_text), (command, option)


def test_readme_layout_names_every_module_and_only_those():
    import re

    root = ROOT
    layout = (root / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    entries = re.split(r"\n(?=\S)", layout.strip())  # one entry per top-level folder
    for package in ("pipeline", "stages"):
        (entry,) = [e for e in entries if e.startswith(f"{package}/")]
        text = " ".join(entry.split()).split(":", 1)[1].split(";")[0]
        named = {name.strip() for name in re.sub(r"\([^)]*\)", "", text).split(",")}
        modules = {p.stem for p in (root / package).glob("*.py") if p.stem != "__init__"}
        packages = {p.parent.name for p in (root / package).glob("*/__init__.py")}
        assert named == modules | packages, (package, named ^ (modules | packages))
        for sub in packages:  # a subpackage's modules are named in the parentheses after it
            inside = set(re.findall(r"\w+", re.search(rf"\b{sub} \(([^)]*)\)", text).group(1)))
            subs = {
                p.stem for p in (root / package / sub).glob("*.py") if p.stem not in ("__init__", "__main__")
            }
            assert subs <= inside, (package, sub, subs - inside)


def _make(*args: str) -> str:
    """What `make` prints (-n: the commands it would run, none run) in the repository."""
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_help_lists_every_target_and_only_those():
    import re

    makefile = (ROOT / "Makefile").read_text()
    (phony,) = re.findall(r"^\.PHONY:(.*)$", makefile, flags=re.M)
    listed = {line.split()[1] for line in _make("help").splitlines() if line.startswith("make ")}
    assert listed == set(phony.split())
    for target in listed:
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), target


def test_make_leaves_the_defaults_to_the_commands():
    """METHOD, MODEL, DEVICE and GRID not given: no option, so each command's own default applies
    (train: egre, robustness: lol), written once in its config; given: passed on."""
    for target in ("extract", "train", "eval", "robustness"):
        line = " ".join(_make("-n", target, "RUN=runs/r").replace("\\\n", " ").split())
        command = line[line.index("bin/pipeline") :]
        for option in ("--method", "--model", "--device", "--grid"):
            assert option not in command, (target, option, command)
    given = _make("-n", "train", "METHOD=lol", "DEVICE=cpu")
    assert "--method lol" in given and "--device cpu" in given


def test_make_extract_and_train_take_any_dataset():
    """`make extract DATASET=mine DATA=my_images` (README): labelled folders named mine; SUBSET: GenImage."""
    line = " ".join(_make("-n", "extract", "DATASET=mine", "DATA=my_images").replace("\\\n", " ").split())
    assert "--data-root my_images --dataset mine" in line and "--subset" not in line
    assert "--subset sdv14" in _make("-n", "extract") and "--dataset" not in _make("-n", "extract")
    assert "--from-cache cache/mine.zarr" in _make("-n", "train", "DATASET=mine")


def test_readme_names_nothing_outside_the_repository():
    """A newcomer has the repository only: no `../` path in the README, and every relative link of
    the docs resolves to a file inside it."""
    import re

    assert "../" not in (ROOT / "README.md").read_text()
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" in link:
                continue
            target = (page.parent / link).resolve()
            assert target.is_relative_to(ROOT.resolve()) and target.exists(), (page.name, link)


def test_readme_demo_robustness_command_runs(tmp_path):
    """The README's robustness command on the demo data, as typed (fewer epochs), on a tiny demo set."""
    import re
    import shlex

    from stages.genimage.synthetic import make_genimage

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "--data-root demo/" in b]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["pipeline", "robustness"]
    makefile = (ROOT / "Makefile").read_text()  # the demo's extraction options: its clean caches are reused
    demo_lare = shlex.split(re.search(r"^DEMO_LARE\s*\?=(.*)$", makefile, flags=re.M).group(1))
    typed = " ".join(words)
    for option, value in zip(demo_lare[::2], demo_lare[1::2], strict=True):
        assert f"{option} {value}" in typed, option
    assert "--model tiny" in typed and "--rows-per-shard 16" in typed and "--rows-per-shard 16" in makefile
    make_genimage(tmp_path / "demo" / "data", "sdv14", {"train": 4, "val": 3}, seed=1)
    make_genimage(tmp_path / "demo" / "data", "adm", {"train": 4, "val": 3}, seed=2)
    proc = run_cli(*words[1:], "--epochs", "1", cwd=tmp_path, env=ONE_THREAD)
    out = tmp_path / "demo" / "results" / "robustness"
    assert (out / "robustness-aigcdetect-lol.csv").is_file(), proc.stdout


def test_make_test_fast_leaves_out_processes_and_long_trainings():
    """README, Tests: `make test` is the command the README writes, `make test-fast` the same with
    `-m "not slow"`; a test that starts a process (here through run_cli, or a helper of its module) is
    marked slow by conftest, the long trainings where written."""
    import re
    import sys

    makefile = (ROOT / "Makefile").read_text()
    (command,) = re.findall(r"^test:.*\n\t\$\(BIN\)/(python -m pytest .*)$", makefile, re.M)
    assert f"make test          # = .venv/bin/{command} ;" in (ROOT / "README.md").read_text()
    assert re.search(rf'^test-fast:.*\n\t\$\(BIN\)/{re.escape(command)} -m "not slow"$', makefile, re.M)
    files = [
        str(ROOT / "tests" / f)
        for f in (
            "pipeline/test_cli.py",
            "system/test_docs.py",
            "system/test_learnability.py",
            "system/test_format_shortcut.py",
        )
    ]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    fast = subprocess.run(
        [*collect, "-m", "not slow", *files], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "test_offline_a_cached_backbone_loads_from_the_hub_cache" in fast  # in-process
    for name in ("test_help_lists_commands_and_options",  # run_cli in the test
                 "test_every_help_shows_each_default_from_the_stage_config",  # through a helper
                 "test_make_help_lists_every_target_and_only_those",  # make, through _make
                 "test_learnability.py", "test_format_shortcut.py"):  # fmt: skip
        assert name not in fast, name


def test_readme_states_the_precision_and_decode_worker_rules_with_the_stages_constants():
    """The README's `--precision` row and its `--loader-workers` note say what the stage applies
    (stages.configs' constants through pipeline.config's rules), so a changed constant fails here."""
    import re

    from stages import configs, extract

    readme = " ".join((ROOT / "README.md").read_text().split())
    (row,) = re.findall(r"\| `--precision` \| `(\w+)` \| compute: fp32 on CPU, (\w+) on GPU", readme)
    assert row == ("auto", configs.EXTRACT_ON_CUDA)
    assert configs.ExtractConfig(".", "sdv14").precision == "auto"
    assert configs.ExtractConfig(".", "sdv14").resolved_precision("cpu") == "fp32"
    assert f"at least 2 and at most {configs.DECODE_WORKERS})" in readme
    assert extract.loader_workers(-1, "cuda", configs.DECODE_WORKERS, gpus=1) >= 2
    assert extract.loader_workers(-1, "cpu", configs.DECODE_WORKERS) == 0


def test_readme_share_and_compare_runs_commands_exist_with_their_options():
    """Each `pipeline ...` line of the README's "Share and compare runs" is a command (or a command
    of a group) whose --help shows every option the line uses."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Share and compare runs", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    used: dict[tuple[str, ...], set[str]] = {}
    for line in block.splitlines():
        m = re.search(r"\bpipeline ((?:run|runs) \w+|\w+)(.*?)(?:#|$)", line)
        if m is None:
            continue
        words = tuple(m.group(1).split())
        if words[0] == "runs" and words[1:] != ("diff",):
            words = ("runs",)  # `pipeline runs DIR`: the command itself
        used.setdefault(words, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", m.group(2)))
    assert set(used) >= {
        ("run", "push"),
        ("run", "verify"),
        ("run", "pull"),
        ("detect",),
        ("eval",),
        ("runs",),
    }
    for words, options in used.items():
        command = words[:1] if words == ("runs", "diff") else words
        help_text = run_cli(*command, "--help", env={"COLUMNS": "200"}).stdout
        for option in options:
            assert re.search(rf"(?<![\w-]){option}(?![\w-])", help_text), (words, option)


def test_the_lock_pins_every_declared_dependency_and_make_and_ci_install_from_it():
    """requirements.lock (`make lock`, pip-compile) holds one `==` version of every dependency
    pyproject.toml declares, the [dev] extra and the extras it names included; `make install` takes it
    as pip constraints (`LOCK=`: none, the unpinned path) and .ci/run installs through it."""
    import re

    import pytest
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the lock is compiled for
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    extras, seen = ["dev"], set()
    while extras:  # the extras [dev] names through the package itself ("lare-pipeline[share,curves]")
        extra = extras.pop()
        seen.add(extra)
        for req in map(Requirement, project["optional-dependencies"][extra]):
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                extras += sorted(req.extras - seen)
            else:
                declared.append(req)
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith(("#", " ", "-")):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+!-]+", version), line  # exact, no range, no marker
            pins[canonicalize_name(name)] = version
    for req in declared:
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(version, prereleases=True), (str(req), version)
    torch = re.search(r"^TORCH\s*\?=(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1).split()
    for pin in torch:  # installed first, from local disk on this project's machines: the lock agrees
        name, version = pin.split("==")
        assert pins[canonicalize_name(name)] == version, pin

    install = " ".join(_make("-n", "-B", "install").split())
    assert install.count("pip install -q -c requirements.lock") == 2, install  # torch, then the package
    unpinned = " ".join(_make("-n", "-B", "install", "LOCK=").split())
    assert "-c " not in unpinned and "-e .[dev]" in unpinned.replace("'", "")
    assert re.search(r"^make install LOCK=requirements\.lock\b", (ROOT / ".ci" / "run").read_text(), re.M)
    assert "pip-compile" in _make("-n", "lock") and "--output-file requirements.lock" in _make("-n", "lock")


def test_a_module_sharing_a_fixture_runs_in_one_worker():
    """README, Tests: under `-n 2` the tests of a module that defines a module-scoped fixture run in
    one worker (tests/conftest.py's scheduler), so the fixture is built once, not once per worker."""
    import re
    import sys

    module = "tests/stages/test_papers.py"  # five fast tests sharing the papers' text (a module fixture)
    assert '@pytest.fixture(scope="module")' in (ROOT / module).read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider", module,
         "tests/system/test_layers.py"], cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    ran = re.findall(r"^\[(gw\d)\] .* (?:PASSED|SKIPPED) (\S+)", proc.stdout, re.M)
    workers = {gw for gw, test in ran if test.startswith(module)}
    assert len([t for _, t in ran if t.startswith(module)]) == 5 and len(workers) == 1, proc.stdout
    assert {gw for gw, test in ran} == {"gw0", "gw1"}, proc.stdout  # the other tests went to both
