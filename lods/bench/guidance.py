"""``python -m lods bench guidance``: UNet passes and time per step for every estimator (the paper's Fig. 3)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lods.guidance import METHODS, make_estimator


def bench_guidance(prior, steps: int = 5, batch: int = 1, cfg: float = 100.0, seed: int = 0) -> list[dict]:
    """Per estimator: UNet forward and backward passes per view and step, and seconds per step.

    Each step is a full Algorithm 1 iteration on a 2D latent theta: the theta step (line 5) with its
    backward into theta, then the learned parameters' step (line 6). Passes are counted per view.
    """
    rows = []
    null = prior.encode_text([""])
    text = prior.encode_text(["a red cube"])
    for method in METHODS:
        torch.manual_seed(seed)
        est = make_estimator(method, prior, {})
        z = torch.randn(batch, *prior.latent_shape, device=prior.device, requires_grad=True)
        if est.edit_only:
            est.set_source(torch.randn(1, *prior.latent_shape, device=prior.device), prior.encode_text(["a blue cube"]))
        times, fwd, bwd = [], 0.0, 0.0
        try:
            for i in range(steps + 1):
                t0 = time.perf_counter()
                out = est.step(z, text, null, cfg if method not in ("vsd", "dds") else 7.5, i)
                out.loss.backward()
                upd = est.update(z.detach(), text, null) or {}
                if i > 0:  # the first step warms up caches and allocators
                    times.append(time.perf_counter() - t0)
                fwd = out.stats["unet_forward"] + upd.get("unet_forward", 0.0)
                bwd = out.stats["unet_backward"] + upd.get("unet_backward", 0.0)
        finally:
            est.close()
        rows.append(
            {
                "method": method,
                "unet_forward": fwd,
                "unet_backward": bwd,
                "seconds_per_step": sum(times) / len(times),
                "batch": batch,
            }
        )
    return rows


@torch.no_grad()
def bench_unet_forward(prior, repeats: int = 50) -> float:
    """Median milliseconds of one batch-1 UNet forward at the prior's native size."""
    z = torch.randn(1, *prior.latent_shape, device=prior.device)
    t = torch.tensor([500], device=prior.device)
    emb = prior.encode_text(["a red cube"])
    for _ in range(5):
        prior.predict_noise(z, t, emb)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prior.predict_noise(z, t, emb)
        if prior.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def format_table(rows: list[dict]) -> str:
    lines = ["| method | UNet forward / step | UNet backward / step | ms / step |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['unet_forward']:g} | {r['unet_backward']:g} | {1000 * r['seconds_per_step']:.1f} |"
        )
    return "\n".join(lines)


def run_guidance_bench(prior_name: str, steps: int = 5, out: str | Path | None = None) -> list[dict]:
    """``bench_guidance`` and ``bench_unet_forward`` on ``prior_name``; prints the table, writes JSON to ``out``."""
    from lods.trainer import load_prior, resolve_device

    prior = load_prior(prior_name, resolve_device(None))
    if prior.device.type == "cpu" and prior.defaults.cpu_threads:
        torch.set_num_threads(prior.defaults.cpu_threads)  # as the trainer does
    rows = bench_guidance(prior, steps=steps)
    unet_ms = bench_unet_forward(prior)
    print(format_table(rows))
    print(f"batch-1 UNet forward at {prior.image_size}x{prior.image_size}: {unet_ms:.1f} ms (median)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        report = {"device": str(prior.device), "torch_threads": torch.get_num_threads(), "rows": rows,
                  "unet_forward_ms_batch1": unet_ms}
        Path(out).write_text(json.dumps(report, indent=2))
    return rows
