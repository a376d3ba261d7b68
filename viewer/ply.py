"""Read a 3D Gaussian Splatting ``.ply`` into the arrays the viewer streams.

The file layout is the one written by the original 3DGS code and by ``lods.export``: per vertex
``x, y, z``, ``f_dc_0..2`` (degree-0 spherical-harmonic colour), ``opacity`` (a logit),
``scale_0..2`` (log scales) and ``rot_0..3`` (a quaternion, w first). Higher SH degrees
(``f_rest_*``) are ignored: the viewer draws one colour per Gaussian.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))

REQUIRED_FIELDS = (
    "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)


def quats_to_rotmats(quats_wxyz: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) from quaternions (N, 4), w first; normalised here."""
    q = np.asarray(quats_wxyz, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True).clip(min=1e-12)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    ).reshape(-1, 3, 3)


def covariances_from_scales_quats(scales: np.ndarray, quats_wxyz: np.ndarray) -> np.ndarray:
    """Covariances ``R diag(s^2) R^T`` (N, 3, 3) from linear scales (N, 3) and wxyz quaternions (N, 4)."""
    m = quats_to_rotmats(quats_wxyz) * np.asarray(scales, dtype=np.float64)[:, None, :]
    return (m @ m.transpose(0, 2, 1)).astype(np.float32)


def with_pixel_filter(gaussians: dict[str, np.ndarray], pixel_variance: float) -> dict[str, np.ndarray]:
    """``gaussians`` with ``pixel_variance`` (world units^2) added to every covariance's diagonal.

    A scene trained at low resolution was seen through its rasterizer's 0.3 px^2 filter at that
    resolution; drawn larger, its sub-pixel splats shrink and the object turns paler and more
    transparent. ``lods.export.run_pixel_variance`` gives the variance that restores the trained
    footprint (Mip-Splatting's 3D filter); ``ViewerServer`` applies it to everything it shows."""
    if not pixel_variance:
        return gaussians
    covs = np.asarray(gaussians["covariances"], dtype=np.float32)
    return {**gaussians, "covariances": covs + np.float32(pixel_variance) * np.eye(3, dtype=np.float32)}


def read_gaussians_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Gaussians from a 3DGS ``.ply`` as ``means`` (N, 3), ``covariances`` (N, 3, 3),
    ``rgbs`` (N, 3) in [0, 1] and ``opacities`` (N, 1) in [0, 1], all float32.

    Activations follow 3DGS: ``scales = exp(scale_i)``, ``opacity = sigmoid(logit)``,
    ``rgb = clip(0.5 + SH_C0 * f_dc, 0, 1)``.
    """
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    if "vertex" not in ply:
        raise ValueError(f"{path}: no 'vertex' element, not a Gaussian splat .ply")
    vertex = ply["vertex"].data
    missing = [f for f in REQUIRED_FIELDS if f not in vertex.dtype.names]
    if missing:
        raise ValueError(f"{path}: not a 3DGS .ply, missing vertex properties {', '.join(missing)}")

    def cols(*names: str) -> np.ndarray:
        return np.stack([np.asarray(vertex[n], dtype=np.float64) for n in names], axis=-1)

    means = cols("x", "y", "z")
    f_dc = cols("f_dc_0", "f_dc_1", "f_dc_2")
    logits = cols("opacity")
    scales = np.exp(cols("scale_0", "scale_1", "scale_2"))
    quats = cols("rot_0", "rot_1", "rot_2", "rot_3")
    return {
        "means": means.astype(np.float32),
        "covariances": covariances_from_scales_quats(scales, quats),
        "rgbs": np.clip(0.5 + SH_C0 * f_dc, 0.0, 1.0).astype(np.float32),
        "opacities": (1.0 / (1.0 + np.exp(-logits))).astype(np.float32),
    }
