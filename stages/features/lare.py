"""The Latent Reconstruction Error (LaRE^2, CVPR 2024), as plain functions of tensors.

An image is VAE-encoded once; its latent is noised at one timestep with each of `ensemble` noises
and denoised by ONE UNet step; the map is the per-element squared error between the added and the
predicted noise, averaged over the ensemble.

Every random number an image needs (the VAE posterior sample and the ensemble's noises) comes from
a CPU generator seeded by (seed, image id): a map depends on the image's content only, never on the
batch it shares, the order, the device or where a run was resumed.
"""

from __future__ import annotations

import torch
import xxhash

from stages.features import params

CODE_ID = "stages.lare"  # the name its code is hashed under, wherever the file lives

# the torch dtype of each precision params.PRECISIONS names
PRECISIONS = dict(zip(params.PRECISIONS, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def content_seed(seed: int, image_id: str) -> int:
    """A 63-bit generator seed from the stage seed and the image's content id."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{image_id}".encode()) & ((1 << 63) - 1)


def draw_noise(seed: int, image_id: str, ensemble: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """(1 + ensemble, C, h, w): the VAE posterior's standard-normal draw, then the ensemble's noises."""
    g = torch.Generator().manual_seed(content_seed(seed, image_id))
    return torch.randn((1 + ensemble, *latent_shape), generator=g)


def lare_map(noise: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """Squared error between true and predicted noise, averaged over the ensemble axis (dim 1).

    noise, eps_pred: (B, e, C, h, w) -> (B, C, h, w), computed in float32 whatever the inputs.
    """
    return (eps_pred.float() - noise.float()).pow(2).mean(dim=1)


def to_model_input(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> [-1, 1] in the model's dtype: the reference's `(x / 255 - 0.5) * 2`
    in float32 (the same bits as its formula, not merely the same value)."""
    return ((images.to(torch.float32) / 255.0 - 0.5) * 2).to(dtype)


def text_embeddings(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """(P, L, D) text conditions: padded to the tokenizer's max length, truncated, no attention mask,
    `text_encoder(input_ids)[0]`, as the reference conditions its UNet."""
    n = tokenizer.model_max_length
    tok = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    with torch.inference_mode():
        return text_encoder(tok.input_ids.to(device))[0]


class LaRE:
    """One batched LaRE computation on a loaded SD model: encode once, noise e times, one UNet call.

    `prompt_embeds` holds the text embedding of each distinct prompt; a row picks its prompt by index,
    so a class-conditioned run still encodes every prompt only once.
    """

    def __init__(self, model, prompt_embeds: torch.Tensor, timestep: int, dtype: torch.dtype):
        self.vae = model.vae
        self.unet = model.unet
        self.scheduler = model.scheduler
        self.scaling = float(model.vae.config.scaling_factor)
        self.prompt_embeds = prompt_embeds.to(dtype)
        self.timestep = int(timestep)
        self.dtype = dtype
        n = self.scheduler.config.num_train_timesteps
        if not 0 <= self.timestep < n:
            raise ValueError(f"timestep {timestep} outside the scheduler's range [0, {n})")

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, eps_vae: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> scaled latents z0 (B, C, h, w), the posterior sampled with eps_vae."""
        device = self.prompt_embeds.device
        x = to_model_input(images.to(device, non_blocking=True), self.dtype)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.vae.encode(x).latent_dist
        eps_vae = eps_vae.to(device, non_blocking=True).to(posterior.mean.dtype)
        return (posterior.mean + posterior.std * eps_vae) * self.scaling

    @torch.inference_mode()
    def error(self, z0: torch.Tensor, eps: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        """Noise z0 with each of the ensemble's noises eps (B, e, C, h, w), one UNet call, float32 maps."""
        device = z0.device
        eps = eps.to(device, non_blocking=True)
        b, e = eps.shape[:2]
        z0 = z0.repeat_interleave(e, dim=0)  # (B*e, C, h, w): one encoding shared by the ensemble
        flat_eps = eps.reshape(b * e, *eps.shape[2:]).to(z0.dtype)
        t = torch.full((b * e,), self.timestep, device=device, dtype=torch.long)
        zt = self.scheduler.add_noise(z0, flat_eps, t)
        cond = self.prompt_embeds[prompt_idx.to(device)].repeat_interleave(e, dim=0)
        eps_pred = self.unet(zt, t, encoder_hidden_states=cond).sample
        return lare_map(eps, eps_pred.reshape(eps.shape))

    def __call__(self, images: torch.Tensor, noise: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        """images uint8 (B, 3, H, W); noise (B, 1 + e, C, h, w) from `draw_noise`; prompt_idx (B,).

        Returns the float32 maps (B, C, h, w).
        """
        return self.error(self.encode(images, noise[:, 0]), noise[:, 1:], prompt_idx)
