"""What the trainer optimizes: a differentiable scene with parameters theta and a render function."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lods.cameras import Cameras


@dataclass
class RenderOutput:
    """Renders of a batch of cameras; the same conventions on every backend (CPU or CUDA)."""

    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1], composited over the background
    alpha: torch.Tensor  # (B, 1, H, W) accumulated opacity
    depth: torch.Tensor  # (B, 1, H, W) expected camera-space z, 0 where alpha is 0 (not normalized by alpha)
    extras: dict | None = None  # backend-specific (e.g. gsplat's meta for densification)


class Scene(torch.nn.Module):
    """Base class. Subclasses implement ``render``, ``param_groups`` and optionally ``post_step``."""

    backend: str = "torch"

    def render(self, cameras: Cameras, background: torch.Tensor | None = None) -> RenderOutput:
        raise NotImplementedError

    def param_groups(self, lr: dict[str, float]) -> list[dict]:
        """Optimizer parameter groups, each with a ``name`` and an ``lr``; ``lr`` maps names to rates."""
        raise NotImplementedError

    def post_step(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> dict:
        """Called after each optimizer step (densify / prune / grid update); returns stats to log."""
        return {}

    def health(self) -> str | None:
        """What is wrong with finite but blown-up parameters (the trainer's guard stops the run before they
        reach a checkpoint), or None. NaN and infinities are checked by the trainer for every scene."""
        return None
