"""The one interface every score estimator talks to: a text-conditioned epsilon-prediction model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch

from lods.errors import UserError


class PriorError(UserError, RuntimeError):
    """A problem the user can fix (missing weights, a folder that is not a model); one-line message."""


@dataclass(frozen=True)
class PriorDefaults:
    """Settings whose best value depends on the prior, declared by the prior itself (a model folder's
    ``lods_prior.json``; the defaults below for any other model). A run's config leaves them ``None``
    unless the user sets them, and ``config.yaml`` records what ran."""

    learned_lr: dict[str, float] = field(default_factory=dict)  # per method; others: guidance.DEFAULT_LR
    view_prompts: bool = True  # DreamFusion's "front view" suffixes (a model trained on captions without them: off)
    max_gaussians: int = 20000  # densification cap of a Gaussian-splat run
    cpu_threads: int | None = None  # torch threads on CPU (None: torch's default)
    # "sample": a render's latent is a sample of the VAE's posterior (the official release); "mean": its mean (a
    # model whose UNet learned on posterior means, and whose posterior is wide: the toy prior's)
    vae_latents: str = "sample"

    FILE: ClassVar[str] = "lods_prior.json"

    @classmethod
    def read(cls, folder: str | Path) -> PriorDefaults:
        """From ``folder/lods_prior.json`` (keys starting with "_" are comments); the defaults without one."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            return cls()
        try:
            data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
            made = cls(**data)
            if made.vae_latents not in ("sample", "mean"):
                raise ValueError(f"vae_latents must be sample or mean, not {made.vae_latents!r}")
            return made
        except (ValueError, TypeError) as err:
            raise PriorError(f"{path} is not a valid prior settings file: {err}") from err

    def learned_rate(self, method: str) -> float | None:
        """The learned-parameter rate a run of ``method`` starts with on this prior; None if it learns nothing."""
        from lods.guidance import default_lr

        fallback = default_lr(method)
        return None if fallback is None else self.learned_lr.get(method, fallback)


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
    defaults: PriorDefaults  # the run settings this prior prefers (learned rates, view prompts, splat cap, threads)

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
