"""Differentiable scenes: Gaussian splats, NeRF, and the 2D image. ``SCENES`` maps each ``--backbone`` name
to its class (a new scene: one subclass of ``Scene``, one entry here)."""

from lods.scenes.base import RenderOutput, Scene
from lods.scenes.gaussians import GaussianScene
from lods.scenes.image import ImageScene
from lods.scenes.nerf import NerfScene

SCENES: dict[str, type[Scene]] = {cls.backbone: cls for cls in (GaussianScene, NerfScene, ImageScene)}

__all__ = ["SCENES", "GaussianScene", "ImageScene", "NerfScene", "RenderOutput", "Scene"]
