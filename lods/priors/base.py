"""The one interface every score estimator talks to: a text-conditioned epsilon-prediction model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch

from lods.errors import UserError


class PriorError(UserError, RuntimeError):
    """A problem the user can fix (missing weights, a folder that is not a model); one-line message."""


@runtime_checkable
class DiffusionPrior(Protocol):
    """A pretrained text-to-image diffusion model seen as a denoising-score oracle.

    Images are (B, 3, H, W) in [0, 1]; latents ``z`` are what the UNet sees (VAE latents times the
    scaling factor for latent models, images in [-1, 1] for pixel-space models). Text embeddings are
    (B, L, D), the text encoder's last hidden state, exactly what the UNet cross-attends to.
    """

    device: torch.device
    dtype: torch.dtype  # dtype of the UNet's inputs and weights
    num_train_timesteps: int
    image_size: int  # native render resolution in pixels
    latent_shape: tuple[int, int, int]  # (C, h, w) of z at image_size
    negative_prompt: str  # the prompt whose embedding stands in for the null embedding ("" = SD's null)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0 .. T-1, float32 on ``device``."""

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D); the empty string gives the null embedding (as in Stable Diffusion)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> z, differentiable (VAE mean for latent models)."""

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z -> images in [0, 1]."""

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) noise."""

    def predict_noise(
        self, z_t: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """epsilon_phi(z_t; y, t) in float32 for a batch; callers concatenate cond/uncond to share one UNet call.

        ``class_labels`` (B, 16) are flattened camera-to-world matrices; only a camera-conditioned LoRA
        adapter (active inside ``lora_scale``) reads them, zeros meaning "no camera".
        """

    def add_lora(
        self, name: str, rank: int = 4, alpha: float | None = None, camera_conditioning: bool = False
    ) -> list[torch.nn.Parameter]:
        """Attach a LoRA adapter to the UNet's attention projections, off until ``lora_scale`` turns it on.

        A fresh adapter reproduces the base model. Returns its trainable parameters (float32).
        """

    def remove_lora(self, name: str) -> None:
        """Delete adapter ``name``."""

    @contextmanager
    def lora_scale(self, name: str | None, scale: float = 1.0) -> Iterator[None]:
        """Inside the block the UNet runs with adapter ``name`` at ``scale`` (None or 0: base model only)."""
