"""Speed of the CPU Gaussian rasterizer: sparse against the dense reference, forward + backward.

``python -m lods.bench.raster`` prints the figures as JSON.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from lods.cameras import orbit
from lods.scenes.rasterize import rasterize_gaussians


def random_gaussians(n: int, seed: int, sh_degree: int | None = None, radius: float = 0.7, scale: float = 0.06,
                     spread: float = 0.5) -> dict[str, torch.Tensor]:
    """A random object-like cloud of ``n`` Gaussians: centres in a ball of ``radius``, scales around ``scale``
    (log-normal, ``spread``), random rotations, opacities in [0.05, 0.95], random colours (or spherical
    harmonics of ``sh_degree``)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    k = 3 if sh_degree is None else (sh_degree + 1) ** 2
    return {
        "means": d / d.norm(dim=-1, keepdim=True) * radius * torch.rand(n, 1, generator=g) ** (1 / 3),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.exp(math.log(scale) + spread * torch.randn(n, 3, generator=g)),
        "opacities": 0.05 + 0.9 * torch.rand(n, generator=g),
        "colors": torch.rand(n, 3, generator=g) if sh_degree is None else 0.5 * torch.randn(n, k, 3, generator=g),
    }


def benchmark_scene(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The benchmark's cloud: centres in a ball of radius 0.6, scales around 0.03."""
    return random_gaussians(n, seed, radius=0.6, scale=0.03, spread=0.3)


def _time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def benchmark_rasterizer(
    n: int = 2000, size: int = 64, repeats: int = 20, dense_repeats: int = 3, batch: int = 1, seed: int = 0
) -> dict:
    """Median wall-clock milliseconds of one forward + backward pass of the sparse and the dense CPU
    compositors on ``benchmark_scene(n)``, ``batch`` cameras at ``size`` x ``size`` (after one warm-up
    each), the pairs composited and the ratio dense / sparse."""
    params = {k: v.requires_grad_() for k, v in benchmark_scene(n, seed).items()}
    cams = orbit(
        torch.linspace(0.0, 300.0, batch), torch.full((batch,), 20.0), torch.full((batch,), 2.85),
        torch.full((batch,), 42.5), size, size,
    )
    viewmats, Ks, background = cams.viewmat, cams.K, torch.ones(batch, 3)
    pairs = {}

    def step(backend: str) -> None:
        for p in params.values():
            p.grad = None
        rgb, alpha, depth, meta = rasterize_gaussians(
            **params, viewmats=viewmats, Ks=Ks, width=size, height=size, background=background, backend=backend
        )
        (rgb.sum() + alpha.sum() + depth.sum()).backward()
        pairs[backend] = meta["num_pairs"]

    ms = {}
    for backend, reps in (("sparse", repeats), ("dense", dense_repeats)):
        if reps > 0:
            step(backend)
            ms[backend] = _time_ms(lambda b=backend: step(b), reps)
    result = {"n": n, "size": size, "batch": batch, "threads": torch.get_num_threads(), "pairs": pairs["sparse"]}
    result.update({f"{backend}_ms": round(t, 2) for backend, t in ms.items()})
    if "dense" in ms:
        result["dense_over_sparse"] = round(ms["dense"] / ms["sparse"], 2)
    return result


if __name__ == "__main__":
    print(json.dumps(benchmark_rasterizer()))
