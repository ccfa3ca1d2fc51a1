import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.errors import UserError
from stages.features import sd


def test_tiny_is_saved_in_the_diffusers_layout_and_loaded_from_it():
    ref = sd.resolve_model("tiny")
    assert (
        json.loads((ref.folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    )
    for comp in sd.COMPONENTS:
        assert (ref.folder / comp).is_dir()
    model = sd.load_model(ref, "cpu", torch.float32)
    assert model.vae.config.scaling_factor == 0.18215
    assert model.scheduler.config.beta_schedule == "scaled_linear"
    assert sd.latent_geometry(ref, 256) == (4, 32)
    emb = model.encode_prompts(["a photo", "a photo of a tench"])
    assert emb.shape == (2, 77, 32) and not torch.equal(emb[0], emb[1])


def test_identity_follows_the_weights_not_the_location(tmp_path):
    tiny = sd.resolve_model("tiny")
    copy = tmp_path / "my-sd"
    shutil.copytree(tiny.folder, copy)
    local = sd.resolve_model(str(copy))
    assert local.source == "local" and local.weights == tiny.weights
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert sd.resolve_model(str(copy)).weights != tiny.weights


def test_hub_id_resolves_from_the_local_hub_cache(tmp_path, monkeypatch):
    """The hub path without network: a snapshot laid out exactly as huggingface_hub caches it."""
    tiny = sd.resolve_model("tiny")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny.folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    ref = sd.resolve_model("someone/tiny-sd")
    assert ref.source == "hub" and ref.revision == commit and ref.weights == tiny.weights
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        sd.resolve_model("someone/absent-model")


def test_bad_model_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing 'unet/'"):
        sd.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="neither a local diffusers folder"):
        sd.resolve_model("not a model!")


def test_the_tiny_model_is_the_same_built_online_or_offline(tmp_path):
    """Its identity names every tiny-model cache: it must not depend on HF_HUB_OFFLINE (transformers
    records the flag it read in the tokenizer's saved config)."""
    code = "from stages.features import sd; print(sd.resolve_model('tiny').weights)"
    built = []
    for offline in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env["PIPELINE_HOME"] = str(tmp_path / f"home-{offline}")
        if offline:
            env["HF_HUB_OFFLINE"] = offline
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        built.append(proc.stdout.strip())
    assert built[0] == built[1] == sd.resolve_model("tiny").weights
