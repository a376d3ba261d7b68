"""The 2D "scene" of section 4.4: x = theta, optimized directly in latent or in pixel space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lods.cameras import Cameras
from lods.scenes.base import RenderOutput, Scene


@dataclass
class ImageConfig:
    """``space``: "latent" (theta = z, what the UNet sees) or "pixel" (theta = RGB, encoded every step)."""

    space: str = "latent"
    init_std: float = 1.0  # latent init: N(0, init_std^2) scaled latents; pixel init: grey + noise
    lr: float = 3e-2  # the paper's 2D image learning rate

    def __post_init__(self) -> None:
        if self.space not in ("latent", "pixel"):
            raise ValueError(f"image space must be 'latent' or 'pixel', not {self.space!r}")


class ImageScene(Scene):
    """One image. ``latents`` gives z without rendering; ``render`` decodes it for display."""

    backbone = "image"
    live_view = None  # nothing for the 3D viewer

    @classmethod
    def build(cls, config, prior, device, generator, init=None) -> ImageScene:
        """``init``: the input image's latents (or pixels) when editing."""
        return cls(config.image, prior.latent_shape, prior.image_size, init=init, generator=generator).to(device)

    def __init__(
        self,
        config: ImageConfig,
        latent_shape: tuple[int, int, int],
        image_size: int,
        init: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_size = image_size
        if config.space == "latent":
            value = init if init is not None else torch.randn(1, *latent_shape, generator=generator) * config.init_std
        else:
            value = (
                init if init is not None else 0.5 + 0.1 * torch.randn(1, 3, image_size, image_size, generator=generator)
            )
        self.theta = torch.nn.Parameter(value.float().clone())

    @property
    def is_latent(self) -> bool:
        return self.config.space == "latent"

    def z(self, prior, n: int = 1) -> torch.Tensor:
        """z for ``n`` copies of the image (differentiable w.r.t. theta)."""
        z = self.theta if self.is_latent else prior.encode_images(self.theta.clamp(0, 1))
        return z.expand(n, *z.shape[1:])

    def latents(self, prior, cameras: Cameras, background=None, timer=None) -> tuple[torch.Tensor, None]:
        """z for as many copies of the image as there are cameras; no render (cameras play no part)."""
        if timer is None:
            return self.z(prior, len(cameras)), None
        with timer.phase("render"):
            return self.z(prior, len(cameras)), None

    @torch.no_grad()
    def previews(self, prior, cameras: Cameras | None = None, background=None) -> RenderOutput:
        """The image itself (decoded), whatever the cameras."""
        return self.render(prior=prior)

    def preview_metrics(self, out: RenderOutput) -> dict[str, float]:
        """Saturation, value and clipped share on the non-white pixels (no alpha: the image has no geometry)."""
        from lods import metrics

        rgb = out.rgb.float().cpu()
        stats = metrics.color_stats(rgb, metrics.foreground_mask(rgb))
        return {k: stats[k] for k in ("saturation", "value", "clipped")}

    @torch.no_grad()
    def export(self, out: Path, prior, size: int, background=None, camera=None, views: int = 8,
               video_frames: int = 60) -> tuple[dict[str, str], dict[str, float], torch.Tensor]:
        """``image.png``; returns its file name, the final metrics and the image (1, 3, H, W)."""
        from lods import export

        image = self.image(prior).cpu()
        export.write_png(out / "image.png", export.to_uint8_frames(image)[0])
        return {"image": "image.png"}, self.preview_metrics(self.render(prior=prior)), image

    @torch.no_grad()
    def image(self, prior) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1]."""
        return prior.decode_latents(self.theta).float().clamp(0, 1) if self.is_latent else self.theta.clamp(0, 1)

    def render(
        self, cameras: Cameras | None = None, background: torch.Tensor | None = None, prior=None
    ) -> RenderOutput:
        if self.is_latent and prior is None:
            raise ValueError("decoding a latent image needs the prior")
        rgb = self.image(prior) if self.is_latent else self.theta.clamp(0, 1)
        ones = torch.ones_like(rgb[:, :1])
        return RenderOutput(rgb=rgb, alpha=ones, depth=torch.zeros_like(ones))

    def param_groups(self, lr: dict[str, float]) -> list[dict]:
        return [{"params": [self.theta], "name": "image", "lr": lr.get("image", self.config.lr)}]

    def post_step(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> dict:
        if not self.is_latent:
            with torch.no_grad():
                self.theta.clamp_(0, 1)
        return {}
