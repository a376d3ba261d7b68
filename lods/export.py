"""Exports that other tools open: 3DGS ``.ply``, ``.glb`` meshes, turntable ``.mp4``, ``.png``.

Every write is atomic (a temporary file in the same folder, then a rename), so a run killed in the
middle of a write never leaves a torn file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
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
    """Write Gaussians in the standard 3DGS layout read by common splat viewers and ``gr.Model3D``.

    ``xyz`` (N, 3); ``f_dc`` (N, 3) degree-0 SH; ``f_rest`` (N, 3 * (K - 1)) the higher SH coefficients,
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


def write_video(path: str | Path, frames: np.ndarray, fps: int = 24) -> Path:
    """(N, H, W, 3) uint8 frames as H.264 ``.mp4`` (sizes padded to even numbers)."""
    import imageio.v2 as imageio

    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with atomic_path(path) as tmp:
        with imageio.get_writer(str(tmp), fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)
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
