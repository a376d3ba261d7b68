"""Sampling from the embedded prior with diffusers' own pipeline and DDIM scheduler."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from lods.export import image_grid, to_uint8_frames
from lods.priors.toy.train import WEIGHTS_DIR


def load_pipeline(path: str | Path = WEIGHTS_DIR, device: str = "cpu") -> StableDiffusionPipeline:
    """The shipped toy prior as a ``StableDiffusionPipeline`` (float32, offline, safetensors only)."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no toy prior at {path}; train one with `python -m lods toy-prior train`")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=torch.float32, local_files_only=True, use_safetensors=True, safety_checker=None
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seed: int = 0,
    steps: int = 50,
    cfg: float = 5.0,
    negative_prompt: str = "",
    batch: int = 64,
) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [0, 1]; image i depends only on (seed, i, prompt), not on the batching."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        images = pipe(
            chunk,
            negative_prompt=[negative_prompt] * len(chunk),
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=size,
            width=size,
            generator=gens,
            output_type="pt",
        ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def save_samples(images: torch.Tensor, out: str | Path) -> list[Path]:
    """``out/sample_00.png`` ... and ``out/grid.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8_frames(images)):
        p = out / f"sample_{i:02d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    Image.fromarray(image_grid(images)).save(out / "grid.png")
    return paths
