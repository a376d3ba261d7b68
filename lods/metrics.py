"""Image and scene quality measures: colour statistics, clipped pixels, floaters, alignment.

All functions take images (B, 3, H, W) in [0, 1] and, where it matters, an object mask or the
rendered alpha (B, 1, H, W) or (B, H, W). Pure functions; no model state.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask[:, 0] if mask.dim() == 4 else mask).bool()


def foreground_mask(images: torch.Tensor, background: float = 1.0, threshold: float = 0.08) -> torch.Tensor:
    """Pixels that differ from a uniform background by more than ``threshold`` in any channel (B, H, W)."""
    return (images - background).abs().amax(1) > threshold


def hsv_saturation_value(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV saturation and value per pixel, each (B, H, W)."""
    mx, mn = images.amax(1), images.amin(1)
    return (mx - mn) / mx.clamp_min(1e-6), mx


def color_stats(images: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean saturation and value of masked (object) pixels and the share of them that is clipped.

    A pixel is clipped when any channel is at 0 or 1 (within 1/255): what strong guidance does to
    colours shows up here as over-saturation or as washed-out blotches.
    """
    m = _mask(mask)
    if not m.any():
        return {"saturation": float("nan"), "value": float("nan"), "clipped": float("nan"), "coverage": 0.0}
    s, v = hsv_saturation_value(images)
    px = images.permute(0, 2, 3, 1)[m]
    clipped = ((px <= 1 / 255) | (px >= 254 / 255)).any(-1).float().mean()
    return {
        "saturation": float(s[m].mean()),
        "value": float(v[m].mean()),
        "clipped": float(clipped),
        "coverage": float(m.float().mean()),
    }


def floater_score(alpha: torch.Tensor, threshold: float = 0.5, components: int = 1, hard: bool = False) -> float:
    """Share of rendered alpha outside the ``components`` largest 8-connected components of
    ``alpha > threshold`` (one per object of the caption), averaged over views. 0 for solid objects;
    near 1 for dust everywhere. ``hard``: count opaque pixels (alpha > threshold) only, so that the soft
    edge of a solid object is not read as floaters."""
    a = (alpha[:, 0] if alpha.dim() == 4 else alpha).detach().float().cpu().numpy()
    if hard:
        a = (a > threshold).astype(np.float32)
    scores = []
    for view in a:
        total = view.sum()
        if total <= 1e-8:
            scores.append(0.0)
            continue
        labels, n = ndimage.label(view > threshold, structure=np.ones((3, 3)))
        if n == 0:
            scores.append(1.0)
            continue
        sizes = ndimage.sum(view, labels, index=np.arange(1, n + 1))
        main = np.isin(labels, np.argsort(sizes)[::-1][:components] + 1)
        scores.append(float(view[~main].sum() / total))
    return float(np.mean(scores))


def detail_energy(images: torch.Tensor, mask: torch.Tensor) -> float:
    """High-frequency energy of the object: the mean squared 4-neighbour Laplacian (summed over channels)
    of the pixels inside ``mask`` whose four neighbours are inside too, so that the stencil never crosses
    the object's outline. Smooth shading gives little; texture, noise and blotches give more; NaN when no
    pixel qualifies."""
    m = _mask(mask)
    x = images.float()
    inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    if not inner.any():
        return float("nan")
    c = x[..., 1:-1, 1:-1]
    lap = 4 * c - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return float(lap.pow(2).sum(1)[inner].mean())
