"""Metrics on hand-made cases, and exports that are atomic and open in other tools."""

import numpy as np
import pytest
import torch

from lods import metrics
from lods.export import atomic_path, image_grid, write_mesh_glb, write_png, write_video


def test_floater_score_on_known_masks():
    alpha = torch.zeros(2, 1, 32, 32)
    alpha[:, :, 8:24, 8:24] = 1.0  # one solid object: 256 px
    assert metrics.floater_score(alpha) == 0.0
    alpha[1, :, 0:2, 0:2] = 1.0  # a 4 px floater in the second view
    alpha[1, :, 30, 30] = 0.5  # faint dust (below the threshold) still counts as alpha outside the object
    expected_view2 = (4 + 0.5) / (256 + 4 + 0.5)
    assert metrics.floater_score(alpha) == pytest.approx(expected_view2 / 2)
    assert metrics.floater_score(torch.zeros(1, 1, 8, 8)) == 0.0


def test_color_stats_on_a_known_image():
    img = torch.ones(1, 3, 4, 4)
    img[0, :, :2, :] = torch.tensor([0.8, 0.4, 0.4]).view(3, 1, 1)  # saturation 0.5, value 0.8
    img[0, :, 2, 0] = torch.tensor([1.0, 0.0, 0.0])  # a clipped pure red pixel
    mask = metrics.foreground_mask(img)
    assert mask.sum() == 9
    stats = metrics.color_stats(img, mask)
    assert stats["saturation"] == pytest.approx((8 * 0.5 + 1.0) / 9)
    assert stats["value"] == pytest.approx((8 * 0.8 + 1.0) / 9)
    assert stats["clipped"] == pytest.approx(1 / 9)
    empty = metrics.color_stats(img, torch.zeros(1, 4, 4, dtype=torch.bool))
    assert np.isnan(empty["saturation"]) and empty["coverage"] == 0


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_png_video_and_mesh_open_in_other_tools(tmp_path):
    import imageio.v3 as iio
    import trimesh

    frames = (np.random.default_rng(0).random((5, 3, 17, 17)) * 255).astype(np.uint8)
    grid = image_grid(torch.from_numpy(frames).float() / 255, cols=5)
    assert grid.shape == (2 + 19, 2 + 5 * 19, 3)
    write_png(tmp_path / "g.png", grid)
    assert iio.imread(tmp_path / "g.png").shape == grid.shape
    write_video(tmp_path / "v.mp4", frames.transpose(0, 2, 3, 1), fps=5)
    assert iio.imread(tmp_path / "v.mp4").shape[:3] == (5, 18, 18)  # padded to even sizes for H.264
    box = trimesh.creation.box()
    write_mesh_glb(tmp_path / "m.glb", box.vertices, box.faces, np.full((len(box.vertices), 3), 0.5))
    mesh = trimesh.load(tmp_path / "m.glb", force="mesh")
    assert len(mesh.faces) == 12 and tuple(mesh.visual.vertex_colors[0][:3]) == (128, 128, 128)
