"""Runs at any URL, through the installed `pipeline` against servers on loopback: push to S3 and
detect from s3:// (the local run's scores), pull back bitwise, a zipped run over HTTP evaluated from
its URL, calibrate writing back to S3 (refused in one line on HTTP), a flipped weight byte refused in
one line by verify, eval and detect, unsafe manifest paths refused, an interrupted push resumed."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline import runstore, share
from pipeline.errors import UserError
from tests.helpers import ONE_THREAD, run_cli
from tests.servers import guarded_env, range_http, s3_in_environment


@pytest.fixture(scope="module")
def s3():
    """The loopback S3 server, its endpoint and dummy credentials in the environment, a bucket."""
    with s3_in_environment("team") as served:
        yield {**served, "env": {**served["env"], **ONE_THREAD}}


@pytest.fixture
def run(egre_run, tmp_path) -> Path:
    """A copy of the session's finished EGRE run (sealed by train), free to change."""
    copy = tmp_path / "runs" / egre_run.name
    shutil.copytree(egre_run, copy)
    return copy


@pytest.fixture(scope="module")
def images(learn_set, tmp_path_factory) -> Path:
    """Six images of the learn set's val split, three of each label."""
    folder = tmp_path_factory.mktemp("images")
    for label in ("ai", "nature"):
        for p in sorted((next(learn_set[0].rglob("val")) / label).iterdir())[:3]:
            shutil.copy(p, folder / f"{label}-{p.name}")
    return folder


def _scores(csv_path: Path) -> list[tuple[str, str, str, str]]:
    with open(csv_path, newline="") as f:
        return [(r["path"], r["score"], r["run"], r["epoch"]) for r in csv.DictReader(f)]


def _flip(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    return bytes(flipped)


def _one_line_error(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_push_to_s3_detect_from_s3_pull_back_and_calibrate_there(s3, run, images, tmp_path):
    env, url = s3["env"], f"s3://team/runs/{run.name}"
    files = json.loads((run / runstore.MANIFEST).read_text())["files"]
    first = run_cli("run", "push", str(run), url, env=env).stdout
    assert f"{len(files)} files copied" in first and "0 already there" in first
    again = run_cli("run", "push", str(run), url, env=env).stdout
    assert f"0 files copied (0.0 MB), {len(files)} already there" in again
    assert run_cli("run", "verify", url, env=env).returncode == 0

    local, remote = tmp_path / "local.csv", tmp_path / "remote.csv"
    common = ("--device", "cpu", "--no-progress")
    run_cli("detect", str(images), "--checkpoint", str(run), "--out", str(local), *common, env=env)
    run_cli("detect", str(images), "--checkpoint", url, "--out", str(remote), *common, env=env)
    assert _scores(remote) == _scores(local) and len(_scores(local)) == 6
    assert {r[2] for r in _scores(remote)} == {run.name}

    pulled = tmp_path / "pulled" / run.name
    run_cli("run", "pull", url, str(pulled), env=env)
    for key in files:
        assert (pulled / key).read_bytes() == (run / key).read_bytes(), key
    assert runstore.verify(str(pulled)) == []

    # calibrate on the run where it lies: the thresholds and the card go back, the manifest follows
    s3["fs"].rm_file(f"team/runs/{run.name}/calibration.json")
    s3["fs"].pipe_file(  # as if the run had been pushed without one
        f"team/runs/{run.name}/{runstore.MANIFEST}",
        json.dumps({**json.loads((run / runstore.MANIFEST).read_text()),
                    "files": {k: v for k, v in files.items() if k != "calibration.json"}}).encode(),
    )  # fmt: skip
    out = run_cli("calibrate", "--checkpoint", url, "--device", "cpu", env=env).stdout
    assert f"wrote {url}/calibration.json" in out
    assert (
        s3["fs"].cat_file(f"team/runs/{run.name}/calibration.json") == (run / "calibration.json").read_bytes()
    )
    listed = json.loads(s3["fs"].cat_file(f"team/runs/{run.name}/{runstore.MANIFEST}"))["files"]
    assert listed == files  # calibration.json listed again, every other entry as it was
    assert run_cli("run", "verify", url, env=env).returncode == 0


def test_a_flipped_weight_byte_is_refused_by_verify_eval_and_detect(s3, run, images, learn_set, tmp_path):
    env, url = s3["env"], f"s3://team/flipped/{run.name}"
    run_cli("run", "push", str(run), url, env=env)
    key = "epoch-002.safetensors"  # the best (= last) epoch: the one eval and detect read
    s3["fs"].pipe_file(
        f"team/flipped/{run.name}/{key}", _flip(s3["fs"].cat_file(f"team/flipped/{run.name}/{key}"))
    )
    proc = run_cli("run", "verify", url, env=env, check=False)
    assert proc.returncode == 1  # after the progress bar, one line per damaged file
    assert proc.stderr.strip().splitlines()[-1] == f"{url}: {key} does not match its checksum"
    proc = run_cli(
        "detect", str(images), "--checkpoint", url, "--out", str(tmp_path / "s.csv"), env=env, check=False
    )
    _one_line_error(proc, key, "does not match its checksum")
    assert not (tmp_path / "s.csv").exists()

    (run / key).write_bytes(_flip((run / key).read_bytes()))  # and a local run
    proc = run_cli("eval", "--checkpoint", str(run), "--from-cache", str(learn_set[1]), "--out",
                   str(tmp_path / "results"), env=env, check=False)  # fmt: skip
    _one_line_error(proc, key, "does not match its checksum")


def _zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:  # `zip -r run.zip <run>/`: the run's folder inside
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder.parent).as_posix())
    return out


def test_a_zipped_run_over_http_is_evaluated_from_its_url(run, learn_set, tmp_path):
    served = tmp_path / "site"
    served.mkdir()
    _zip_folder(run, served / f"{run.name}.zip")
    env = {**ONE_THREAD, **guarded_env()}
    cache = str(learn_set[1])
    with range_http(served) as (base, _):
        url = f"{base}/{run.name}.zip"
        assert run_cli("run", "verify", url, env=env).returncode == 0
        run_cli("eval", "--checkpoint", url, "--from-cache", cache, "--out", str(tmp_path / "remote"),
                "--no-progress", env=env)  # fmt: skip
        proc = run_cli("calibrate", "--checkpoint", url, env=env, check=False)
        _one_line_error(proc, "read-only", f"pipeline run pull {url} DIR")
    run_cli("eval", "--checkpoint", str(run), "--from-cache", cache, "--out", str(tmp_path / "local"),
            "--no-progress", env=env)  # fmt: skip
    (remote,) = (json.loads(p.read_text()) for p in (tmp_path / "remote").glob("*.json"))
    (local,) = (json.loads(p.read_text()) for p in (tmp_path / "local").glob("*.json"))
    assert remote["run"] == local["run"] == run.name and remote["metrics"] == local["metrics"]


def test_paths_that_would_leave_the_run_are_refused(run, tmp_path):
    manifest = json.loads((run / runstore.MANIFEST).read_text())
    for bad in ("../outside", "/etc/passwd", "evals//x", "s3://elsewhere/x"):
        manifest["files"] = {bad: {"xxh3": "0" * 32, "size": 1}}
        (run / runstore.MANIFEST).write_text(json.dumps(manifest))
        proc = run_cli("run", "verify", str(run), check=False)
        _one_line_error(proc, "refusing unsafe path", bad)
    proc = run_cli("run", "pull", str(run), str(tmp_path / "pulled"), check=False)
    _one_line_error(proc, "refusing unsafe path")
    assert not (tmp_path / "pulled").exists()


def test_an_interrupted_push_leaves_no_manifest_and_a_rerun_copies_the_rest(run, tmp_path, monkeypatch):
    dst = tmp_path / "target" / run.name
    real, calls = share._Target.write, []

    def failing(self, key, data):
        calls.append(key)
        if len(calls) > 3:
            raise ConnectionError("network went away")
        real(self, key, data)

    monkeypatch.setattr(share._Target, "write", failing)
    with pytest.raises(ConnectionError):
        runstore.copy_run(str(run), str(dst), jobs=1, progress=False)
    monkeypatch.undo()
    assert not (dst / runstore.MANIFEST).exists() and len(list(dst.iterdir())) == 3
    with pytest.raises(UserError, match="no run-manifest.json"):
        runstore.verify(str(dst))
    rest = runstore.copy_run(str(run), str(dst), jobs=1, progress=False)
    total = len(json.loads((run / runstore.MANIFEST).read_text())["files"])
    assert (rest.skipped, rest.copied) == (3, total - 3)
    assert runstore.verify(str(dst)) == []


def test_every_local_url_kind_opens_to_the_run_checked(run, tmp_path):
    """A folder and file:// are read where they are; a zip (the run's folder inside, or its files at
    the root) is read into a temporary folder named like the run: the records, the card and the
    weights of the epoch asked for, no optimizer state, no curves; gone afterwards."""
    for url in (str(run), f"file://{run}"):
        with runstore.opened(url) as folder:
            assert folder == run
    inside = _zip_folder(run, tmp_path / "inside.zip")
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as z:
        for p in sorted(run.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(run).as_posix())
    for archive in (inside, flat, f"file://{flat}"):
        with runstore.opened(str(archive), "last") as view:
            assert view.name == run.name and view != run
            assert (view / "params.json").read_bytes() == (run / "params.json").read_bytes()
            assert sorted(p.name for p in view.glob("*.safetensors")) == ["epoch-002.safetensors"]
            assert not (view / "curves.png").exists() and not (view / "tensorboard").exists()
        assert not view.exists()
