"""The Python entry points: ``from lods import generate, edit, load_prior, make_estimator``.

They take the same config keys as the command line and the YAML files (``RunConfig`` in
``lods.config``), run the same :class:`~lods.trainer.Trainer`, and write the same files::

    from lods import generate
    result = generate("a red cube", steps=300, out="runs/cube")   # toy prior, Gaussian splats, LODS-embed
    result.views          # (8, H, W, 3) uint8 turntable views, as in views.png
    result.files["scene"] # "scene.ply" inside result.out_dir

Bad input raises :class:`lods.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods.config import BACKBONES, RunConfig
from lods.errors import UserError
from lods.guidance import METHODS, Estimator, make_estimator
from lods.priors.base import DiffusionPrior
from lods.trainer import Trainer, shared_prior

__all__ = [
    "BACKBONES", "METHODS", "Result", "edit", "estimator", "generate", "load_prior", "make_estimator", "run_config",
]


@dataclass
class Result:
    """A finished run: its folder, the files written there, the final metrics and the live trainer."""

    out_dir: Path
    status: str  # "done" or "stopped"
    config: dict[str, Any]  # the resolved config (config.yaml)
    summary: dict[str, Any]  # summary.json: steps, seconds, it/s, final metrics
    trainer: Trainer = field(repr=False)

    @property
    def files(self) -> dict[str, str]:
        """Result file names by kind (``image``, ``views``, ``video``, ``scene``, ``splat``, ``mesh``)."""
        return dict(self.summary.get("files", {}))

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.summary.get("final_metrics", {}))

    @property
    def scene(self) -> Any:
        """The optimized scene (``GaussianScene``, ``NerfScene`` or ``ImageScene``)."""
        return self.trainer.scene

    @property
    def views(self) -> np.ndarray:
        """The result as (N, H, W, 3) uint8: the turntable views of ``views.png`` (3D), or the image (2D)."""
        import imageio.v3 as iio

        from lods.export import read_views

        if "image" in self.files:
            return np.asarray(iio.imread(self.out_dir / self.files["image"]))[None, ..., :3]
        return read_views(self.out_dir / self.files["views"])

    def history(self, key: str) -> list[float]:
        """One logged statistic per step (e.g. ``"loss"``, ``"cfg"``, ``"embedding_distance"``)."""
        return [h[key] for h in self.trainer.history if key in h]


def load_prior(name: str = "toy", device: str | None = None) -> DiffusionPrior:
    """A diffusion prior: ``"toy"`` (embedded, CPU), ``"sd21"``, a Hugging Face id or a local folder.

    The last one loaded is kept and reused by :func:`generate` and :func:`edit` (one model in memory)."""
    return shared_prior(name, device)


def run_config(config: dict[str, Any] | str | Path | None = None, **keys: Any) -> RunConfig:
    """A validated :class:`RunConfig` as the command line builds it: the YAML file or mapping ``config``,
    then ``keys`` (any ``RunConfig`` field; nested ones as dicts, e.g. ``gaussians={"max_points": 2000}``),
    then the backbone's presets for whatever is still unset."""
    from lods.runs.generation import read_config_file, with_preset

    cfg: dict[str, Any] = {}
    if isinstance(config, (str, Path)):
        config = read_config_file(config)
    if config is not None and not isinstance(config, dict):
        raise UserError("config must be a mapping of config keys or a YAML file")
    cfg.update(config or {})
    cfg.update({k: v for k, v in keys.items() if v is not None})
    run = RunConfig.from_dict(with_preset(cfg))
    run.validate()
    return run


def _run(run: RunConfig, out: str | Path | None, progress: bool, video: bool, init_image: Any = None) -> Result:
    from lods.runs import prepare_out, run_and_export

    out_dir = prepare_out(out) if out is not None else Path(tempfile.mkdtemp(prefix="lods-run-"))
    prior = load_prior(run.prior, run.device)
    image = None
    if init_image is not None:
        image = _image_tensor(init_image, prior.image_size)
    trainer = Trainer(run, prior=prior, out_dir=out_dir, init_image=image)
    summary = run_and_export(trainer, out_dir, show_progress=progress, video=video)
    return Result(out_dir=out_dir, status=summary["status"], config=trainer.resolved_config().to_dict(),
                  summary=summary, trainer=trainer)


def _image_tensor(image: Any, size: int) -> torch.Tensor:
    """A path, a PIL image or an (H, W, 3) uint8 array as a (1, 3, size, size) tensor in [0, 1]."""
    from PIL import Image

    from lods.runs import load_image

    if isinstance(image, (str, Path)):
        return load_image(image, size)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, np.uint8)[..., :3])
    if not isinstance(image, Image.Image):
        raise UserError("the image must be a path, a PIL image or an (H, W, 3) uint8 array")
    img = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def generate(
    prompt: str,
    *,
    prior: str = "toy",
    backbone: str = "gs",
    method: str = "lods-embed",
    cfg: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | Path | None = None,
    config: dict[str, Any] | str | Path | None = None,
    progress: bool = False,
    video: bool = True,
    **keys: Any,
) -> Result:
    """Text to 3D (``backbone="gs"`` or ``"nerf"``) or to an image (``"image"``), as ``python -m lods generate``.

    ``config`` is a YAML file or mapping of config keys; ``keys`` are more of them (``batch=2``,
    ``learned_lr=3e-3``, ``gaussians={"max_points": 2000}``, ...), winning over ``config``. The files go to
    ``out`` (a new temporary folder when None). ``video=False`` skips the turntable video."""
    run = run_config(config, prompt=prompt, prior=prior, backbone=backbone, method=method, cfg=cfg, steps=steps,
                     seed=seed, device=device, **keys)
    return _run(run, out, progress, video)


def edit(
    image: str | Path | Any,
    source_prompt: str,
    prompt: str,
    *,
    prior: str = "toy",
    method: str = "dds",
    cfg: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    out: str | Path | None = None,
    config: dict[str, Any] | str | Path | None = None,
    progress: bool = False,
    **keys: Any,
) -> Result:
    """Text-guided editing of ``image`` (a path, a PIL image or an (H, W, 3) uint8 array) from what
    ``source_prompt`` describes to ``prompt``, as ``python -m lods edit``: DDS by default, or LODS-embed /
    LODS-LoRA with the learned null condition starting at the source caption."""
    run = run_config(config, prompt=prompt, source_prompt=source_prompt, prior=prior, backbone="image",
                     method=method, cfg=cfg, steps=steps, seed=seed, device=device, **keys)
    return _run(run, out, progress, video=False, init_image=image)


def estimator(method: str, prior: DiffusionPrior | str = "toy", **guidance: Any) -> Estimator:
    """A score estimator (one of ``METHODS``) on ``prior``; ``guidance`` are ``GuidanceConfig`` fields."""
    if isinstance(prior, str):
        prior = load_prior(prior)
    try:
        return make_estimator(method, prior, guidance)
    except ValueError as err:
        raise UserError(str(err)) from err

