"""The CLIP image tower both detectors fine-tune, loaded through open_clip.

`RN50` with the `openai` weights is the papers' backbone; LoL's Table 2 also fine-tunes `RN101` and
`ViT-L-14` (open_clip's names; both have `openai` weights). EGRE reads the ResNet's layer3 feature map,
so it takes a ResNet only (`dims` says so in one line); LoL reads the image embedding alone
(`embedding`), which a ViT has too. `--backbone-weights PATH` loads a local open_clip checkpoint file
instead (safetensors or a torch state dict, loaded weights-only). The attention pool's (or the ViT's)
positional embedding fixes the input size: a checkpoint loads at the crop size it was made for (224).
`tiny-RN` and `tiny-ViT` are small configs of the same ModifiedResNet and VisionTransformer classes
(our own, in stages/data/open_clip) for tests and the demo: a new architecture is a config, not a
fork, so tests run the very code real runs use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import UserError, first_line
from pipeline.fingerprint import checksum_file

if TYPE_CHECKING:  # open_clip has no type information: this names what load_visual returns
    from open_clip.modified_resnet import ModifiedResNet

CODE_ID = "stages.backbone"  # the name its code is hashed under, wherever the file lives

TINY = "tiny-RN"  # stages/data/open_clip holds it and tiny-ViT
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _register_configs() -> None:
    import open_clip

    if TINY not in open_clip.list_models():
        open_clip.add_model_config(Path(str(resources.files("stages").joinpath("data/open_clip"))))


@dataclass(frozen=True)
class BackboneSpec:
    """Which tower: an open_clip config name and its weights ('openai', 'random', or a file path)."""

    arch: str = "RN50"
    weights: str = "openai"

    def identity(self) -> dict[str, Any]:
        """What enters a run's fingerprint: a local file by its content, not its path."""
        if self.weights in ("openai", "random"):
            return {"arch": self.arch, "weights": self.weights}
        path = Path(self.weights)
        if not path.is_file():
            raise UserError(f"--backbone-weights: no file at {path}")
        return {"arch": self.arch, "weights": "file", "xxh3": checksum_file(path)}


HUB_PROBE_SECONDS = 3.0  # one connection attempt; huggingface_hub itself retries for about a minute


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all: one quick connection, no retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def offline_weights(arch: str, tag: str) -> str | None:
    """Where open_clip's pre-trained `tag` weights of `arch` are, when the hub cannot be reached.

    None: the hub answers, and open_clip downloads (or revalidates) them as usual. Offline, the
    file open_clip would download, from the local hub cache (the files open_clip tries, in its
    order); none there: a UserError at once, instead of a minute of retries before the same end.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if not hub or _hub_reachable():
        return None
    repo, filename = os.path.split(hub)
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    safe_first = getattr(open_clip.pretrained, "_get_safe_alternatives", lambda name: ())  # open_clip's order
    for name in (*safe_first(filename), filename):
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):
            return path
    raise UserError(
        f"could not load the {arch} backbone weights '{tag}': not in the local Hugging Face cache, and "
        f"the hub cannot be reached (offline); pass --backbone-weights PATH to a local open_clip "
        f"checkpoint, or download {repo} once where there is a network"
    )


def load_visual(spec: BackboneSpec, image_size: int, seed: int = 0) -> nn.Module:
    """The image tower of `spec` (a ModifiedResNet or a VisionTransformer), sized for `image_size`."""
    import open_clip

    _register_configs()
    if spec.arch not in open_clip.list_models():
        raise UserError(f"unknown backbone '{spec.arch}' (try RN50, RN101, ViT-L-14, or {TINY} for tests)")
    pretrained = None if spec.weights == "random" else spec.weights
    if pretrained is not None and not Path(pretrained).is_file():
        # offline: the cached file itself (open_clip's tag settings, e.g. quick_gelu, concern the text
        # tower only, which neither method uses)
        pretrained = offline_weights(spec.arch, pretrained) or pretrained
    torch.manual_seed(seed)  # random weights (tiny, tests) are a function of the seed
    try:
        model = open_clip.create_model(
            spec.arch, pretrained=pretrained, force_image_size=image_size, weights_only=True
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - offline download, bad file: one line for the user
        hint = "pass --backbone-weights PATH to a local copy" if spec.weights == "openai" else ""
        raise UserError(
            f"could not load the {spec.arch} backbone weights '{spec.weights}' ({first_line(e, 2)}); {hint}"
        ) from None
    return model.visual


def visual_features(visual: ModifiedResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer3 map (B, C3, H/16, W/16), attention-pooled embedding (B, D)) of a ModifiedResNet."""
    x = visual.stem(x)
    x = visual.layer1(x)
    x = visual.layer2(x)
    f3 = visual.layer3(x)
    return f3, visual.attnpool(visual.layer4(f3))


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, (x / 255 - mean) / std per channel."""
    mean_ = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_ = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean_) / std_


def embedding(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image embedding (B, D), open_clip's own forward of the tower: a ResNet's attention pool (the
    same layers as visual_features), a ViT's projected class token."""
    return visual(x)


def embedding_width(visual: nn.Module) -> int:
    """D of `embedding`: both open_clip towers record it as `output_dim`."""
    width: int = getattr(visual, "output_dim")  # noqa: B009 - an attribute nn.Module's stubs do not name
    return width


def dims(visual: ModifiedResNet) -> tuple[int, int]:
    """(layer3 channels, embedding width) of a CLIP ResNet; another tower is one line for the user."""
    if not hasattr(visual, "layer3"):
        raise UserError(
            f"backbone {type(visual).__name__} is not a CLIP ResNet: egre reads its layer3 feature map "
            "(lol takes a ViT as well)"
        )
    c3 = visual.layer3[-1].conv3.out_channels
    return c3, visual.attnpool.c_proj.out_features
