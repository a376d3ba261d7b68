"""What the trainer optimizes: a differentiable scene with parameters theta and a render function.

A :class:`Scene` is complete in itself: the trainer asks it for latents (``latents``), previews
(``previews``, ``preview_metrics``), its files (``export``) and what the live viewer shows (``live_view``,
``viewer_gaussians``), never what kind of scene it is. A new scene is one subclass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lods.cameras import CameraRange, Cameras, turntable

VIDEO_CHUNK = 8  # turntable frames rendered at once
PREVIEW_CHUNK = 2  # display views rendered at once (a renderer's memory grows with the views it draws)


@dataclass
class RenderOutput:
    """Renders of a batch of cameras; the same conventions on every backend (CPU or CUDA)."""

    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1], composited over the background
    alpha: torch.Tensor  # (B, 1, H, W) accumulated opacity
    depth: torch.Tensor  # (B, 1, H, W) expected camera-space z, 0 where alpha is 0 (not normalized by alpha)
    extras: dict | None = None  # backend-specific (e.g. gsplat's meta for densification)


class Scene(torch.nn.Module):
    """Base class: a 3D scene rendered from cameras. Subclasses implement ``render`` and ``param_groups``, and
    optionally ``post_step``, ``health`` and ``export_geometry``; a 2D scene overrides the rest too."""

    backend: str = "torch"
    backbone: str = ""  # its name on the command line and in config files (``--backbone``)
    video_scale = 2  # the turntable video's frames are this many times the training renders' size
    # What the live 3D viewer shows: "splats" (it streams ``viewer_gaussians``), "render" (it asks the trainer
    # to render each browser's camera) or None (nothing 3D).
    live_view: str | None = "render"

    @classmethod
    def build(cls, config: Any, prior: Any, device: torch.device, generator: torch.Generator,
              init: torch.Tensor | None = None) -> Scene:
        """The scene of a run's ``config`` (a ``RunConfig``) on ``device``, its backend chosen by the device."""
        raise NotImplementedError

    def render(self, cameras: Cameras, background: torch.Tensor | None = None) -> RenderOutput:
        raise NotImplementedError

    def param_groups(self, lr: dict[str, float]) -> list[dict]:
        """Optimizer parameter groups, each with a ``name`` and an ``lr``; ``lr`` maps names to rates."""
        raise NotImplementedError

    def post_step(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> dict:
        """Called after each optimizer step (densify / prune / grid update); returns stats to log."""
        return {}

    # ------------------------------------------------------------------ what the trainer asks of every scene

    def latents(self, prior: Any, cameras: Cameras, background: torch.Tensor | None,
                timer: Any = None) -> tuple[torch.Tensor, RenderOutput | None]:
        """z of the views (differentiable in theta) for the guidance, and the render they came from."""
        phase = timer.phase if timer is not None else _no_phase
        with phase("render"):
            out = self.render(cameras, background)
        with phase("encode"):
            rgb = out.rgb
            size = getattr(prior, "image_size", None)
            if size and rgb.shape[-1] != size:  # the prior's own image size, as threestudio resizes to 512 for SD
                rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
            return prior.encode_images(rgb), out

    @torch.no_grad()
    def previews(self, prior: Any, cameras: Cameras, background: torch.Tensor | None) -> RenderOutput:
        """Display renders: eval mode (no jitter) and a forked RNG, so that they never change the training run."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                cameras = cameras.to(device)
                if len(cameras) <= PREVIEW_CHUNK:
                    return self.render(cameras, background)
                per_view = background is not None and background.dim() == 2 and len(background) == len(cameras)
                parts = [self.render(cameras[i:i + PREVIEW_CHUNK],
                                     background[i:i + PREVIEW_CHUNK] if per_view else background)
                         for i in range(0, len(cameras), PREVIEW_CHUNK)]
                return RenderOutput(*(torch.cat([getattr(o, k) for o in parts]) for k in ("rgb", "alpha", "depth")))
        finally:
            self.train(was_training)

    def preview_metrics(self, out: RenderOutput) -> dict[str, float]:
        """Saturation, value and clipped share on the object (alpha > 0.5), and the floater score."""
        from lods import metrics

        rgb, alpha = out.rgb.float().cpu(), out.alpha.float().cpu()
        stats = metrics.color_stats(rgb, alpha[:, 0] > 0.5)
        return {"saturation": stats["saturation"], "value": stats["value"], "clipped": stats["clipped"],
                "floater_score": metrics.floater_score(alpha)}

    @torch.no_grad()
    def export(self, out: Path, prior: Any, size: int, background: Callable[[int], torch.Tensor | None],
               camera: CameraRange | None = None, views: int = 8,
               video_frames: int = 60) -> tuple[dict[str, str], dict[str, float], torch.Tensor]:
        """Write ``views.png``, ``turntable.mp4`` (when ``video_frames``) and the scene's own files; returns
        {kind: file name}, the final metrics and the views (V, 3, H, W) on the CPU. ``background(n)`` gives
        the backgrounds of n views (None: the scene's own); ``size`` and ``camera`` are the training renders'
        size and camera ranges."""
        from lods import export

        files: dict[str, str] = {}
        grid = self.previews(prior, turntable(views, size), background(views))
        rgb = grid.rgb.float().cpu()
        export.write_png(out / "views.png", export.image_grid(rgb, cols=views))
        files["views"] = "views.png"
        if video_frames:
            cameras, backgrounds = turntable(video_frames, size * self.video_scale), background(video_frames)

            def frames():  # a few frames at a time: a renderer's memory grows with the views it draws at once
                for i in range(0, video_frames, VIDEO_CHUNK):
                    part = slice(i, i + VIDEO_CHUNK)
                    rgb = self.previews(prior, cameras[part], None if backgrounds is None else backgrounds[part]).rgb
                    yield from export.to_uint8_frames(rgb.float().cpu())

            export.write_video(out / "turntable.mp4", frames(), fps=24)
            files["video"] = "turntable.mp4"
        files.update(self.export_geometry(out, size, camera or CameraRange()))
        return files, self.preview_metrics(grid), rgb

    def export_geometry(self, out: Path, size: int, camera: CameraRange) -> dict[str, str]:
        """The scene's own result files (a 3DGS .ply, a mesh, ...): {kind: file name}. ``size`` and ``camera``:
        the training renders' size and camera ranges (what a display filter needs)."""
        return {}

    def viewer_gaussians(self) -> dict | None:
        """CPU copies of splats for the live viewer when ``live_view == "splats"``; None otherwise."""
        return None

    def health(self) -> str | None:
        """What is wrong with finite but blown-up parameters (the trainer's guard stops the run before they
        reach a checkpoint), or None. NaN and infinities are checked by the trainer for every scene."""
        return None


@contextlib.contextmanager
def _no_phase(name: str):
    yield

