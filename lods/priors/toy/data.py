"""A resumable on-disk cache of toy-world renders, for training the prior and the judge."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from lods.cameras import sample_cameras
from lods.priors.toy.world import random_scene, render_scenes


def render_cache(
    out: str | Path, n: int, chunk: int = 512, seed: int = 0, size: int = 64, shard: tuple[int, int] = (0, 1)
) -> list[Path]:
    """Render ``n`` random scenes (held-out combinations included, and flagged) into chunk files.

    Chunks already on disk are kept, so an interrupted run resumes where it stopped.
    ``shard=(k, m)`` renders only chunks i with i % m == k, so that several processes can share the work.
    Each chunk holds ``rgb`` (uint8, N x 3 x size x size), ``captions`` and ``held_out`` (bool).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range((n + chunk - 1) // chunk), desc="rendering toy world", unit="chunk"):
        path = out / f"chunk_{i:04d}.pt"
        paths.append(path)
        if path.exists() or i % shard[1] != shard[0]:
            continue
        rng = random.Random(seed * 100_003 + i)
        scenes = [random_scene(rng, allow_held_out=True) for _ in range(chunk)]
        cams = sample_cameras(chunk, size, generator=torch.Generator().manual_seed(seed * 100_003 + i))
        r = render_scenes(scenes, cams, rng)
        data = {
            "rgb": (r.rgb * 255).round().to(torch.uint8),
            "captions": [s.caption for s in scenes],
            "held_out": torch.tensor([s.held_out for s in scenes]),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(path)
    return paths


def load_cache(paths: list[Path]) -> dict:
    """Concatenate cache chunks into one dict of tensors and captions."""
    parts = [torch.load(p) for p in paths]
    return {
        "rgb": torch.cat([p["rgb"] for p in parts]),
        "captions": [c for p in parts for c in p["captions"]],
        "held_out": torch.cat([p["held_out"] for p in parts]),
    }
