"""The Stable Diffusion components LaRE needs: where they come from, who they are, how they load.

A model is a diffusers folder (the hub's layout). A hub id is resolved to its snapshot folder,
`tiny` (and `random-sd15`) to a randomly initialised model written once in that same layout, so
the tests load the tiny model through exactly the code that loads Stable Diffusion v1.5.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import home
from pipeline.errors import UserError, first_line
from pipeline.fingerprint import checksum_files
from pipeline.schema import ModelIdentity
from stages.features import lare as lare_math

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# the weight file diffusers / transformers load from each component folder, in order of preference
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}
HUB_PATTERNS = ["model_index.json", *(f"{c}/*.json" for c in COMPONENTS), "tokenizer/*.txt"] + [
    f"{c}/{w}" for c, names in WEIGHTS.items() for w in names
]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the folder to load from and what identifies it.

    `weights` (a hash of the component files actually loaded) is what enters fingerprints, so the
    same weights give the same fingerprint whether they came from the hub, a copy or a teammate.
    """

    spec: str
    folder: Path
    source: str  # "hub", "local" or "random" (tiny, random-sd15: no forensic signal)
    weights: str
    revision: str | None = None

    def identity(self) -> ModelIdentity:
        return {"spec": self.spec, "source": self.source, "revision": self.revision, "weights": self.weights}


def random_weights_note(model: Mapping[str, Any]) -> str | None:
    """The note every command prints that runs or scores a model of random weights, so that nobody
    reads its numbers as a detector's: `model` is an identity as caches and runs record it, of the
    LaRE model (`ModelRef.identity()`) or of a run's CLIP backbone (params["backbone"], from
    `BackboneSpec.identity()`: trained from random initialisation, not pre-trained). None for real
    weights."""
    if model.get("source") == "random":
        return f"model '{model.get('spec')}' has random weights: its maps carry no forensic signal"
    if "arch" in model and model.get("weights") == "random":
        return (
            f"backbone '{model['arch']}' started from random weights, not pre-trained CLIP "
            "(--backbone-weights random): its scores are no measure of the papers' detectors"
        )
    return None


def _component_files(folder: Path) -> list[Path]:
    files = []
    for comp in COMPONENTS:
        sub = folder / comp
        if not sub.is_dir():
            raise UserError(
                f"{folder} is not a Stable Diffusion folder: missing '{comp}/' (need {', '.join(COMPONENTS)})"
            )
        files += sorted(p for p in sub.iterdir() if p.suffix in (".json", ".txt"))
        for name in WEIGHTS.get(comp, ()):
            if (sub / name).is_file():
                files.append(sub / name)
                break
        else:
            if comp in WEIGHTS:
                raise UserError(f"{sub} holds no weights (looked for {' or '.join(WEIGHTS[comp])})")
    return files


def _weights_hash(folder: Path) -> str:
    return checksum_files(folder, _component_files(folder), stat_cache=home() / "weight-hashes.json")


def resolve_model(spec: str) -> ModelRef:
    """Turn `--model` into a folder and an identity, without loading any weights."""
    if spec in ARCHITECTURES:
        folder = ensure_random(spec)
        return ModelRef(spec, folder, "random", _weights_hash(folder))
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path.resolve()
        return ModelRef(spec, folder, "local", _weights_hash(folder))
    if not _HUB_ID.match(spec):
        raise UserError(
            f"model not found: '{spec}' is neither a local diffusers folder, a hub id, nor 'tiny'"
        )
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: all end the same way
        raise UserError(
            f"model '{spec}' is not in the local Hugging Face cache and could not be downloaded "
            f"({first_line(e)}); fetch it once where the hub is reachable, or pass a local diffusers folder"
        ) from None
    return ModelRef(spec, snapshot, "hub", _weights_hash(snapshot), revision=snapshot.name)


def _tiny_tokenizer_files(folder: Path) -> None:
    """A byte-level CLIP vocabulary with no merges: every byte is a token, no download needed.

    The byte -> printable character map is GPT-2's (printable bytes map to themselves, the others
    to code points from 256 on), which CLIP's BPE expects in vocab.json.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


# Random-weight architectures, built from configs: `tiny` for tests and the demo, `random-sd15` (the
# full SD v1.5 architecture: same cost as the real model, no signal) for benchmarks.
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": dict(
            sample_size=32, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, norm_num_groups=8,
        ),
        "vae": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                    sample_size=256),
        "text": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
    },
    "random-sd15": {
        "unet": dict(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            hidden_act="quick_gelu", projection_dim=768,
        ),
    },
}  # fmt: skip
RANDOM_VERSION = "2"


def build_random(folder: Path, arch: str) -> None:
    """Write a randomly initialised (fixed seed) SD v1-style model of `arch` in the diffusers layout.

    SD v1's structure (8x VAE downsampling, 4 latent channels, cross-attention UNet, CLIP text
    encoder, scaled-linear DDPM schedule). Its maps carry no forensic signal: `tiny` exists so the
    tests and the demo run the real code on a CPU, `random-sd15` to measure the real model's cost.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = ARCHITECTURES[arch]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.18215,
        **cfg["vae"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_tokenizer_files(Path(tmp))
        # local_files_only said, not read from HF_HUB_OFFLINE: the saved tokenizer_config records it,
        # and the model's identity must not depend on the environment it was built in
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, local_files_only=True)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **cfg["text"],
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)  # type: ignore[attr-defined]  # diffusers' lazy pipeline class hides it


def ensure_random(arch: str) -> Path:
    """A random-weight model's folder under the tool's home, built once (atomically) on first use."""
    folder = home() / "models" / f"{arch}-v{RANDOM_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{arch}-"))
    try:
        build_random(tmp, arch)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass
class SDModel:
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (P, L, D) for the UNet's cross-attention, each distinct prompt once."""
        return lare_math.text_embeddings(self.tokenizer, self.text_encoder, prompts)


def load_model(ref: ModelRef, device: str, dtype: torch.dtype) -> SDModel:
    """Load the components with diffusers / transformers `from_pretrained`, as for any SD v1 checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()  # SD v1.5 ships a PNDM scheduler config: DDPM ignores its extra keys
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    folder = str(ref.folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for m in (vae, unet, text_encoder):
        # transformers' decorator types PreTrainedModel.to as a plain function (a gap in its typing)
        m.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    if device.startswith("cuda"):
        # Kernel choice by cuDNN's fixed heuristics, not by per-process timing (benchmark mode): a resumed
        # run or another worker on the same GPU model then computes the same bits at a fixed batch size.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        vae.to(memory_format=torch.channels_last)
        unet.to(memory_format=torch.channels_last)
    return SDModel(vae, unet, text_encoder, tokenizer, scheduler)


def latent_geometry(ref: ModelRef, image_size: int) -> tuple[int, int]:
    """(latent channels, latent side) for an image side, read from the VAE config without loading it."""
    cfg = json.loads((ref.folder / "vae" / "config.json").read_text())
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    if image_size % factor:
        raise UserError(f"--size {image_size} must be a multiple of the VAE's downsampling factor {factor}")
    return int(cfg["latent_channels"]), image_size // factor
