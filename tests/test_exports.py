"""Exports other tools open: scene.ply in the reference 3DGS layout (degree-3 SH), scene.splat for web
viewers, a resolved config.yaml, and the viewer showing the colours and opacity of the trainer's renders."""

import math

import numpy as np
import pytest
import torch
import yaml

from lods import export
from lods.cameras import turntable
from lods.scenes.gaussians import GaussianConfig, GaussianScene
from lods.scenes.rasterize import rasterize_gaussians

# The vertex properties of the reference 3DGS code (GaussianModel.construct_list_of_attributes, SH degree 3).
REFERENCE_3DGS = [
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *[f"f_rest_{i}" for i in range(45)],
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
]


@pytest.fixture(scope="module")
def gs_run(tiny_sd_dir, tmp_path_factory):
    from lods.__main__ import main

    out = tmp_path_factory.mktemp("gs-run")
    code = main(["generate", "--prompt", "a red cube", "--backbone", "gs", "--prior", str(tiny_sd_dir), "--steps", "4",
                 "--device", "cpu", "--set", "gaussians.num_points=300", "--set", "batch=1", "--out", str(out)])
    assert code == 0
    return out


def random_scene(n: int = 200, sh_degree: int = 0, seed: int = 0) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    scene = GaussianScene(GaussianConfig(num_points=n, sh_degree=sh_degree), generator=g)
    with torch.no_grad():
        scene.quats.copy_(torch.randn(n, 4, generator=g))
        scene.log_scales.add_(0.3 * torch.randn(n, 3, generator=g))
        scene.opacity_logits.copy_(torch.randn(n, generator=g))
        scene.sh_dc.add_(torch.randn(n, 1, 3, generator=g))
        scene.sh_rest.copy_(0.3 * torch.randn(scene.sh_rest.shape, generator=g))
    return scene


def test_generated_ply_has_the_reference_layout_and_renders_to_the_trained_views(gs_run):
    from plyfile import PlyData

    ply = PlyData.read(str(gs_run / "scene.ply"))
    assert [p.name for p in ply["vertex"].properties] == REFERENCE_3DGS
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    vertex = ply["vertex"].data
    assert all(np.all(vertex[f"f_rest_{i}"] == 0) for i in range(45))  # a degree-0 run, zero-padded

    config = yaml.safe_load((gs_run / "config.yaml").read_text())
    scene = GaussianScene.from_ply_attributes(export.read_gaussians_ply(gs_run / "scene.ply"))
    assert scene.config.sh_degree == 3 and scene.num_gaussians == ply["vertex"].count
    with torch.no_grad():
        rgb = scene.eval().render(turntable(8, config["resolution"])).rgb
    ours = export.image_grid(rgb, cols=8)
    import imageio.v3 as iio

    trained = iio.imread(gs_run / "views.png")[..., :3]
    assert ours.shape == trained.shape
    assert np.abs(ours.astype(int) - trained.astype(int)).max() <= 1
    assert (ours == trained).mean() > 0.999


def test_config_yaml_holds_the_values_that_ran(gs_run):
    config = yaml.safe_load((gs_run / "config.yaml").read_text())
    assert config["device"] == "cpu"
    assert isinstance(config["threads"], int) and config["threads"] >= 1
    assert config["resolution"] == 16  # the tiny prior's native size
    assert config["learned_lr"] > 0  # lods-embed's default, written out
    assert config["view_prompts"] is True  # on for priors other than the toy one
    assert None not in (config["device"], config["threads"], config["resolution"], config["learned_lr"])
    from dataclasses import fields

    from lods.cameras import CameraRange
    from lods.guidance import GuidanceConfig

    assert set(config["gaussians"]) == {f.name for f in fields(GaussianConfig)}  # every scene setting
    assert config["gaussians"]["num_points"] == 300 and config["gaussians"]["sh_degree"] == 0
    assert set(config["guidance"]) == {f.name for f in fields(GuidanceConfig)}
    assert config["guidance"]["lr"] == config["learned_lr"] and config["guidance"]["schedule"]["max_frac"] == 0.98
    assert config["camera"] == {k: list(v) for k, v in CameraRange().__dict__.items()}


@pytest.mark.parametrize("sh_degree", [0, 2, 3])
def test_ply_round_trip_renders_the_same_pixels(tmp_path, sh_degree):
    scene = random_scene(sh_degree=sh_degree)
    path = export.write_gaussians_ply(tmp_path / "scene.ply", **scene.to_ply_attributes())
    back = GaussianScene.from_ply_attributes(export.read_gaussians_ply(path))
    cams = turntable(3, 48)
    with torch.no_grad():
        a, b = scene.eval().render(cams), back.eval().render(cams)
    torch.testing.assert_close(b.rgb, a.rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.alpha, a.alpha, atol=1e-5, rtol=0)
    # the reference ordering: f_rest_i is coefficient i % 15 + 1 of colour channel i // 15
    attrs = export.read_gaussians_ply(path)
    k = scene.sh_rest.shape[1]
    for i in (0, 7, 15, 31, 44):
        coeff, channel = i % 15, i // 15
        want = scene.sh_rest[:, coeff, channel].detach().numpy() if coeff < k else np.zeros(scene.num_gaussians)
        np.testing.assert_array_equal(attrs["f_rest"][:, i], want.astype(np.float32))


def test_splat_file_decodes_to_the_scene(tmp_path):
    scene = random_scene(n=150)
    attrs = scene.to_ply_attributes()
    path = export.write_splat(tmp_path / "scene.splat", **attrs)
    raw = path.read_bytes()
    assert len(raw) == 32 * scene.num_gaussians
    d = export.read_splat(path)
    # Web viewers read the file in this order: the largest, most opaque splats first.
    opacity = 1 / (1 + np.exp(-attrs["opacity"][:, 0]))
    order = np.argsort(-np.exp(attrs["scale"].sum(1)) * opacity, kind="stable")
    np.testing.assert_array_equal(d["position"], attrs["xyz"][order])
    np.testing.assert_allclose(d["scale"], np.exp(attrs["scale"][order]), rtol=1e-6)
    rgb = np.clip(0.5 + export.SH_C0 * attrs["f_dc"][order], 0, 1)
    np.testing.assert_allclose(d["rgba"][:, :3], rgb, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(d["rgba"][:, 3], opacity[order], atol=0.5 / 255 + 1e-6)
    # 8-bit quaternions: the same rotation up to quantization (q and -q are one rotation)
    q = attrs["rotation"][order]
    assert np.abs((d["rotation"] * q).sum(1)).min() > 0.99
    # The first splat, read by hand as a web viewer does (little-endian floats, then bytes).
    first = np.frombuffer(raw[:24], "<f4")
    np.testing.assert_array_equal(first[:3], attrs["xyz"][order[0]])
    assert tuple(raw[24:28]) == tuple(np.round(np.concatenate([rgb[0], [opacity[order[0]]]]) * 255).astype(int))


def test_splat_carries_the_training_pixel_filter(tmp_path):
    scene = random_scene(n=20)
    attrs = scene.to_ply_attributes()
    var = export.run_pixel_variance(64)
    d = export.read_splat(export.write_splat(tmp_path / "s.splat", **attrs, pixel_variance=var))
    want = np.sort(np.exp(2 * attrs["scale"]) + var, axis=None)
    np.testing.assert_allclose(np.sort(d["scale"] ** 2, axis=None), want, rtol=1e-5)
    # 0.3 px^2 at 64 px, 42.5 degrees, distance 2.85: about (0.55 * 0.035)^2
    focal = 32 / math.tan(math.radians(42.5) / 2)
    assert var == pytest.approx(0.3 * (2.85 / focal) ** 2)


def test_generate_writes_a_splat_beside_the_ply(gs_run):
    from plyfile import PlyData

    n = PlyData.read(str(gs_run / "scene.ply"))["vertex"].count
    d = export.read_splat(gs_run / "scene.splat")
    assert len(d["position"]) == n
    attrs = export.read_gaussians_ply(gs_run / "scene.ply")
    np.testing.assert_array_equal(np.sort(d["position"], axis=0), np.sort(attrs["xyz"], axis=0))


# ------------------------------------------------------------------ the viewer shows what the trainer rendered


def covariance_to_quat_scale(cov: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """wxyz quaternions and scales with R diag(s^2) R^T == cov (for rasterizing what the viewer receives)."""
    from scipy.spatial.transform import Rotation

    w, v = np.linalg.eigh(cov.astype(np.float64))
    v = v * np.sign(np.linalg.det(v))[:, None, None]  # proper rotations
    xyzw = Rotation.from_matrix(v).as_quat()
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    return torch.tensor(wxyz, dtype=torch.float32), torch.tensor(np.sqrt(w.clip(min=0)), dtype=torch.float32)


def viewer_render(gaussians: dict, size: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a splat viewer draws from ``gaussians`` at ``size`` px: 3DGS rasterization with the same
    0.3 px^2 filter at its own pixels (viser's shader adds 0.3 too), degree-0 colour and opacity as given."""
    quats, scales = covariance_to_quat_scale(gaussians["covariances"])
    cams = turntable(views, size)
    colors = torch.tensor(gaussians["rgbs"])[:, None, :]
    sh = (colors - 0.5) / export.SH_C0
    rgb, alpha, _, _ = rasterize_gaussians(
        torch.tensor(gaussians["means"]), quats, scales, torch.tensor(gaussians["opacities"][:, 0]), sh,
        cams.viewmat, cams.K, size, size, background=torch.ones(views, 3), sh_degree=0,
    )
    return rgb.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)


def small_splat_object(n: int = 2500) -> GaussianScene:
    """What the toy prior's runs make: a red cube of many Gaussians smaller than a 64 px training pixel."""
    g = torch.Generator().manual_seed(0)
    points = (torch.rand(n, 3, generator=g) - 0.5) * 0.6
    colors = torch.tensor([0.8, 0.15, 0.1]).expand(n, 3)
    scene = GaussianScene(GaussianConfig(), points=points, colors=colors)
    with torch.no_grad():
        scene.log_scales.fill_(math.log(0.006))
        scene.opacity_logits.fill_(math.log(0.5 / 0.5))
    return scene


def test_viewer_shows_the_colours_and_opacity_of_the_trainers_renders(tmp_path):
    from viewer.__main__ import pixel_variance_of
    from viewer.ply import read_gaussians_ply, with_pixel_filter

    scene = small_splat_object()
    res, views, scale = 64, 2, 4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"prior": "toy", "resolution": res, "camera": {}}))
    export.write_gaussians_ply(tmp_path / "scene.ply", **scene.to_ply_attributes())
    with torch.no_grad():
        trained = scene.eval().render(turntable(views, res))  # what views.png shows

    def shown(pixel_variance: float) -> tuple[torch.Tensor, torch.Tensor]:
        g = with_pixel_filter(read_gaussians_ply(tmp_path / "scene.ply"), pixel_variance)
        rgb, alpha = viewer_render(g, res * scale, views)
        return torch.nn.functional.avg_pool2d(rgb, scale), torch.nn.functional.avg_pool2d(alpha, scale)

    var = pixel_variance_of(tmp_path / "scene.ply")
    assert var == pytest.approx(export.run_pixel_variance(res))
    rgb_raw, alpha_raw = shown(0.0)
    rgb_fix, alpha_fix = shown(var)
    obj = trained.alpha[:, 0] > 0.05
    a_train = trained.alpha[:, 0][obj].mean()
    # Without the training views' pixel filter the splats shrink at the viewer's resolution: the object
    # is more transparent, and paler on the white page.
    assert alpha_raw[:, 0][obj].mean() < 0.8 * a_train
    assert abs(alpha_fix[:, 0][obj].mean() - a_train) < 0.05 * a_train
    err_raw = (rgb_raw - trained.rgb).abs().mean()
    err_fix = (rgb_fix - trained.rgb).abs().mean()
    assert err_fix < 0.5 * err_raw
    red = trained.rgb[:, 0][obj].mean() - trained.rgb[:, 1][obj].mean()
    red_fix = rgb_fix[:, 0][obj].mean() - rgb_fix[:, 1][obj].mean()
    assert abs(red_fix - red) < 0.05
