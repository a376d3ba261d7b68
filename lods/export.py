"""Exports that other tools open: 3DGS ``.ply``, web ``.splat``, ``.glb`` meshes, turntable ``.mp4``, ``.png``.

Every write is atomic (a temporary file in the same folder, then a rename), so a run killed in the
middle of a write never leaves a torn file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes them private)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_gaussians_ply(
    path: str | Path,
    xyz: np.ndarray,
    f_dc: np.ndarray,
    f_rest: np.ndarray,
    opacity: np.ndarray,
    scale: np.ndarray,
    rotation: np.ndarray,
    normals: np.ndarray | None = None,
) -> Path:
    """Write Gaussians in the reference 3DGS layout read by common splat viewers and ``gr.Model3D``.

    ``xyz`` (N, 3); ``f_dc`` (N, 3) degree-0 SH; ``f_rest`` (N, 3 * (K - 1)) the higher SH coefficients
    (``GaussianScene.to_ply_attributes`` pads them to degree 3, the 45 ``f_rest_*`` of the reference code),
    channel-major (all red, then green, then blue, as 3DGS stores them); ``opacity`` (N,) or (N, 1) logits;
    ``scale`` (N, 3) log scales; ``rotation`` (N, 4) quaternions wxyz. The keyword names match
    ``GaussianScene.to_ply_attributes()``.
    """
    from plyfile import PlyData, PlyElement

    n = len(xyz)
    f_rest = np.asarray(f_rest, np.float32).reshape(n, -1)
    columns = [("x", xyz[:, 0]), ("y", xyz[:, 1]), ("z", xyz[:, 2])]
    normals = np.zeros((n, 3), np.float32) if normals is None else normals
    columns += [(f"n{a}", normals[:, i]) for i, a in enumerate("xyz")]
    columns += [(f"f_dc_{i}", f_dc[:, i]) for i in range(3)]
    columns += [(f"f_rest_{i}", f_rest[:, i]) for i in range(f_rest.shape[1])]
    columns += [("opacity", np.asarray(opacity).reshape(n))]
    columns += [(f"scale_{i}", scale[:, i]) for i in range(3)]
    columns += [(f"rot_{i}", rotation[:, i]) for i in range(4)]
    data = np.empty(n, dtype=[(name, "f4") for name, _ in columns])
    for name, values in columns:
        data[name] = np.asarray(values, np.float32)
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp))
    return Path(path)


PLY_FIELDS = {  # to_ply_attributes key -> .ply vertex properties (f_rest: every f_rest_i there is)
    "xyz": ("x", "y", "z"),
    "normals": ("nx", "ny", "nz"),
    "f_dc": ("f_dc_0", "f_dc_1", "f_dc_2"),
    "opacity": ("opacity",),
    "scale": ("scale_0", "scale_1", "scale_2"),
    "rotation": ("rot_0", "rot_1", "rot_2", "rot_3"),
}


def read_gaussians_ply(path: str | Path) -> dict[str, np.ndarray]:
    """The stored (not activated) values of a 3DGS ``.ply``, keyed as ``GaussianScene.to_ply_attributes``:
    ``xyz``, ``normals``, ``f_dc``, ``f_rest`` (N, 3 * (K - 1), channel-major), ``opacity`` (N, 1) logits,
    ``scale`` (N, 3) log scales, ``rotation`` (N, 4) wxyz. Raises ``ValueError`` when a property is missing."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"].data
    names = vertex.dtype.names
    out: dict[str, np.ndarray] = {}
    for key, props in PLY_FIELDS.items():
        if key == "normals" and "nx" not in names:
            out[key] = np.zeros((len(vertex), 3), np.float32)
            continue
        missing = [p for p in props if p not in names]
        if missing:
            raise ValueError(f"{path}: not a 3DGS .ply, missing vertex properties {', '.join(missing)}")
        out[key] = np.stack([np.asarray(vertex[p], np.float32) for p in props], axis=-1)
    k = sum(1 for name in names if name.startswith("f_rest_"))
    out["f_rest"] = np.stack([np.asarray(vertex[f"f_rest_{i}"], np.float32) for i in range(k)], axis=-1) if k else (
        np.zeros((len(vertex), 0), np.float32))
    return {key: out[key] for key in ("xyz", "normals", "f_dc", "f_rest", "opacity", "scale", "rotation")}


SPLAT_DTYPE = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rotation", "u1", 4)])
SH_C0 = 0.28209479177387814  # degree-0 real spherical harmonic (as in lods.scenes.rasterize)
DILATION_PX2 = 0.3  # the low-pass variance (pixels^2) every 3DGS rasterizer adds to a projected Gaussian


def training_pixel_variance(resolution: int, fovy_deg: float, distance: float) -> float:
    """World-space variance (units^2) of the rasterizer's 0.3 px^2 low-pass filter at the training views.

    A scene trained at low resolution (64 px on the toy prior) relies on that filter: its sub-pixel
    Gaussians were seen dilated to about a pixel. A viewer drawing it at a higher resolution dilates
    them by its own, much smaller, pixels, so they look thinner: the object paler and more transparent.
    Adding this variance to every 3D covariance (Mip-Splatting's 3D smoothing filter) gives a
    display at any resolution the footprint that training saw."""
    focal = 0.5 * resolution / np.tan(np.radians(fovy_deg) / 2)
    return float(DILATION_PX2 * (distance / focal) ** 2)


def run_pixel_variance(resolution: int, camera=None) -> float:
    """:func:`training_pixel_variance` at the middle of a run's camera ranges (``RunConfig.camera``: a
    ``CameraRange`` or its plain values)."""
    from lods.cameras import CameraRange

    cams = camera if isinstance(camera, CameraRange) else CameraRange(**(camera or {}))
    return training_pixel_variance(resolution, float(np.mean(cams.fovy)), float(np.mean(cams.distance)))


def display_log_scales(log_scales: np.ndarray, pixel_variance: float) -> np.ndarray:
    """Log scales with ``pixel_variance`` added to each axis' variance (the rotation is unchanged)."""
    return 0.5 * np.log(np.exp(2 * np.asarray(log_scales, np.float64)) + pixel_variance)


def write_splat(
    path: str | Path,
    xyz: np.ndarray,
    f_dc: np.ndarray,
    opacity: np.ndarray,
    scale: np.ndarray,
    rotation: np.ndarray,
    pixel_variance: float = 0.0,
    **_: np.ndarray,
) -> Path:
    """The compact ``.splat`` web format: 32 bytes per Gaussian, little-endian, no header.

    Per Gaussian: position (3 float32), linear scale (3 float32), colour RGBA (4 uint8: the degree-0
    colour and the sigmoid opacity), rotation (4 uint8: the unit quaternion wxyz mapped by
    ``q * 128 + 128``); sorted by ``exp(sum of log scales) * opacity``, largest first, as web viewers
    expect. View-dependent colour (``f_rest``) is dropped. ``pixel_variance`` (see
    :func:`training_pixel_variance`) is added to each axis' variance, so that a web viewer shows the
    trained footprint. Takes ``to_ply_attributes()`` as keywords."""
    n = len(xyz)
    logit = np.asarray(opacity, np.float64).reshape(n)
    alpha = 1.0 / (1.0 + np.exp(-logit))
    log_s = display_log_scales(scale, pixel_variance) if pixel_variance else np.asarray(scale, np.float64)
    order = np.argsort(-np.exp(log_s.sum(1)) * alpha, kind="stable")
    q = np.asarray(rotation, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12)
    rgb = 0.5 + SH_C0 * np.asarray(f_dc, np.float64)
    data = np.empty(n, SPLAT_DTYPE)
    data["position"] = np.asarray(xyz, np.float32)
    data["scale"] = np.exp(log_s).astype(np.float32)
    data["rgba"] = (np.clip(np.concatenate([rgb, alpha[:, None]], axis=1), 0, 1) * 255).round().astype(np.uint8)
    data["rotation"] = np.clip(np.round(q * 128 + 128), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        data[order].tofile(tmp)
    return Path(path)


def read_splat(path: str | Path) -> dict[str, np.ndarray]:
    """A ``.splat`` file decoded: ``position`` (N, 3), ``scale`` (N, 3) linear, ``rgba`` (N, 4) in [0, 1],
    ``rotation`` (N, 4) unit wxyz quaternions (as quantized)."""
    raw = Path(path).read_bytes()
    if len(raw) % SPLAT_DTYPE.itemsize:
        raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of 32-byte splats")
    data = np.frombuffer(raw, SPLAT_DTYPE)
    q = (data["rotation"].astype(np.float32) - 128) / 128
    return {
        "position": data["position"].copy(),
        "scale": data["scale"].copy(),
        "rgba": data["rgba"].astype(np.float32) / 255,
        "rotation": q / np.linalg.norm(q, axis=1, keepdims=True).clip(min=1e-12),
    }


def write_mesh_glb(path: str | Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """A triangle mesh with per-vertex colours (float in [0, 1] or uint8) as binary glTF."""
    import trimesh

    if colors is not None and np.asarray(colors).dtype != np.uint8:
        colors = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colors, process=False)
    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type="glb")
    return Path(path)


def to_uint8_frames(images) -> np.ndarray:
    """(N, 3, H, W) tensor/array in [0, 1] -> (N, H, W, 3) uint8."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return (np.clip(arr, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def image_grid(images, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """A padded grid (H, W, 3) uint8 on white of (N, 3, h, w) images in [0, 1]."""
    frames = to_uint8_frames(images)
    n, h, w, _ = frames.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(frames):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def read_views(path: str | Path, pad: int = 2) -> np.ndarray:
    """The views (N, h, w, 3) uint8 of a one-row grid written by :func:`image_grid` (e.g. ``views.png``)."""
    import imageio.v2 as imageio

    grid = np.asarray(imageio.imread(path))[..., :3]
    h = grid.shape[0] - 2 * pad
    n = (grid.shape[1] - pad) // (h + pad)
    return np.stack([grid[pad : pad + h, pad + i * (h + pad) : pad + i * (h + pad) + h] for i in range(n)])


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int = 24) -> Path:
    """(H, W, 3) uint8 frames (an (N, H, W, 3) array or any iterable of frames, consumed one at a time) as
    H.264 ``.mp4`` (sizes padded to even numbers)."""
    import imageio.v2 as imageio

    with atomic_path(path) as tmp:
        with imageio.get_writer(str(tmp), fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for f in frames:
                h, w = f.shape[:2]
                writer.append_data(np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge"))
    return Path(path)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """(H, W, 3) uint8 as PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def print_and_save_json(report: dict, out: str | Path | None) -> None:
    """Print a benchmark's report as JSON, and write it to ``out`` when given."""
    import json

    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
