"""Gaussian splats: the sparse CPU rasterizer against the dense reference, camera conventions,
compositing, density control with a live optimizer, persistence, export layout and a small fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lods.bench.raster import benchmark_rasterizer, random_gaussians
from lods.cameras import look_at, orbit
from lods.scenes.gaussians import GaussianConfig, GaussianScene
from lods.scenes.rasterize import SH_C0, rasterize_gaussians, sh_basis, sh_to_rgb


@pytest.fixture(autouse=True)
def single_thread():
    """Run single-threaded: these tensors are small, and on a shared 2-core machine idle OpenMP
    workers spinning against other processes slow every parallel op down by orders of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def three_cameras(width: int, height: int):
    return orbit(
        torch.tensor([20.0, 140.0, -100.0]), torch.tensor([15.0, 35.0, 5.0]), torch.tensor([2.6, 3.0, 2.8]),
        torch.tensor([40.0, 45.0, 42.0]), width, height,
    )


def render_and_grad(params: dict, cams, backend: str, sh_degree: int | None, near: float, weights: list):
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    rgb, alpha, depth, meta = rasterize_gaussians(
        **params, viewmats=cams.viewmat, Ks=cams.K, width=cams.width, height=cams.height,
        background=torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.5, 0.9], [0.0, 0.0, 0.0]], device=cams.c2w.device),
        near=near, sh_degree=sh_degree, backend=backend,
    )
    ((rgb * weights[0]).sum() + (alpha * weights[1]).sum() + (depth * weights[2]).sum()).backward()
    return (rgb, alpha, depth), {k: v.grad for k, v in params.items()}, meta


@pytest.mark.parametrize("sh_degree", [None, 3])
def test_sparse_matches_dense_values_and_gradients(sh_degree):
    W, H = 24, 20
    cams = three_cameras(W, H)
    params = random_gaussians(150, seed=1, sh_degree=sh_degree)
    # Gaussians around camera 0: behind it, in front of the near plane, just past it (huge splats),
    # and off to the side (centres off-screen, footprints partly on it)
    c2w = cams.c2w[0]
    eye, right, forward = c2w[:3, 3], c2w[:3, 0], c2w[:3, 2]
    extra = torch.stack([
        eye - 0.5 * forward, eye + 0.05 * forward, eye + 0.3 * forward, eye + 0.6 * forward + 0.1 * right,
        eye + 1.5 * forward + 0.75 * right, eye + 1.5 * forward - 0.8 * right,
    ])
    params["means"] = torch.cat([params["means"], extra])
    params["quats"] = torch.cat([params["quats"], torch.randn(6, 4, generator=torch.Generator().manual_seed(3))])
    params["scales"] = torch.cat([params["scales"], torch.full((6, 3), 0.08)])
    params["opacities"] = torch.cat([params["opacities"], torch.full((6,), 0.6)])
    params["colors"] = torch.cat([params["colors"], params["colors"][:6]])
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(3, H, W, 3, generator=g), torch.randn(3, H, W, 1, generator=g),
               torch.randn(3, H, W, 1, generator=g)]

    out_s, grad_s, meta = render_and_grad(params, cams, "sparse", sh_degree, 0.1, weights)
    out_d, grad_d, meta_d = render_and_grad(params, cams, "dense", sh_degree, 0.1, weights)

    assert meta["num_pairs"] == meta_d["num_pairs"] > 1000
    radii0, m0 = meta["radii"][0], meta["means2d"][0].detach()
    assert (radii0[150:152] == 0).all()  # behind the camera and inside the near plane: culled
    assert (radii0[152:] > 0).all()
    assert (radii0 > 0).sum() < 156 and (radii0 > 0).sum() > 100
    off = (m0[:, 0] < 0) | (m0[:, 0] >= W)
    assert (off & (radii0 > 0)).sum() >= 2  # centre off-screen, splat partly on it
    for s, d in zip(out_s, out_d):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5)
    for name in params:
        scale = grad_d[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad_s[name], grad_d[name], atol=1e-5 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_gaussian_at_origin_lands_at_image_centre_and_up_is_up():
    W = H = 33
    cams = orbit(torch.tensor([35.0]), torch.tensor([25.0]), torch.tensor([3.0]), torch.tensor([40.0]), W, H)
    means = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    for i, expected_row in ((0, "centre"), (1, "above")):
        rgb, alpha, depth, meta = rasterize_gaussians(
            means[i : i + 1], torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), 0.02), torch.tensor([0.9]),
            torch.ones(1, 3), cams.viewmat, cams.K, W, H,
        )
        a = alpha[0, ..., 0]
        ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        centroid = torch.stack([(a * xs).sum(), (a * ys).sum()]) / a.sum()
        torch.testing.assert_close(centroid, meta["means2d"][0, 0], atol=1e-3, rtol=0)
        # and it is where the camera's own ray through that pixel points
        o, d = cams.rays()
        pix = int(centroid[1]) * W + int(centroid[0])
        ray_o, ray_d = o[0, pix], d[0, pix]
        closest = ray_o + ((means[i] - ray_o) @ ray_d) * ray_d
        assert (closest - means[i]).norm() < 3.0 * 1.0 / (cams.focal[0] / 3.0)  # within ~a pixel
        if expected_row == "centre":
            torch.testing.assert_close(centroid, torch.tensor([W / 2, H / 2]), atol=1e-3, rtol=0)
            assert a[H // 2, W // 2] == a.max()
            expected_depth = depth[0, H // 2, W // 2, 0] / a[H // 2, W // 2]
            torch.testing.assert_close(expected_depth, torch.tensor(3.0), atol=1e-4, rtol=0)
        else:
            assert centroid[1] < H / 2 - 3  # world up is image up (OpenCV y points down)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_front_to_back_compositing_in_closed_form(backend):
    W = H = 33  # the origin projects onto the centre of pixel (16, 16): there alpha = opacity
    cams = orbit(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([40.0]), W, H)
    red, green, blue = torch.eye(3)

    def centre(z: list[float], opacity: list[float], colors: list[torch.Tensor]):
        n = len(z)
        rgb, alpha, depth, _ = rasterize_gaussians(
            torch.tensor([[0.0, 0.0, zi] for zi in z]), torch.tensor([[1.0, 0, 0, 0]] * n), torch.full((n, 3), 0.05),
            torch.tensor(opacity), torch.stack(colors), cams.viewmat, cams.K, W, H, backend=backend,
        )
        return rgb[0, 16, 16], alpha[0, 16, 16, 0], depth[0, 16, 16, 0]

    # the camera sits on +z looking at the origin: larger z is nearer, whatever the input order
    rgb, alpha, depth = centre([-0.5, 0.5], [0.6, 0.7], [blue, red])
    torch.testing.assert_close(rgb, 0.7 * red + 0.3 * 0.6 * blue)
    torch.testing.assert_close(alpha, torch.tensor(0.7 + 0.3 * 0.6))
    torch.testing.assert_close(depth, torch.tensor(0.7 * 2.5 + 0.3 * 0.6 * 3.5))
    # alpha is clamped at 0.999, and a pixel stops before a Gaussian that would leave T <= 1e-4
    rgb, alpha, _ = centre([0.5, 0.0, -0.5], [1.0, 1.0, 1.0], [red, green, blue])
    torch.testing.assert_close(rgb, 0.999 * red)
    torch.testing.assert_close(alpha, torch.tensor(0.999))
    rgb, _, _ = centre([0.5, 0.0], [0.99, 0.995], [red, green])  # T would be 5e-5
    torch.testing.assert_close(rgb, 0.99 * red)
    rgb, _, _ = centre([0.5, 0.0], [0.99, 0.98], [red, green])  # T would be 2e-4
    torch.testing.assert_close(rgb, 0.99 * red + 0.01 * 0.98 * green)


def test_alpha_range_and_background_compositing():
    cams = three_cameras(20, 16)
    params = random_gaussians(300, seed=3)
    params["opacities"] = torch.full((300,), 0.999)  # saturating: exercises the clamp and early stop
    plain, alpha, depth, _ = rasterize_gaussians(**params, viewmats=cams.viewmat, Ks=cams.K, width=20, height=16)
    white, alpha_w, _, _ = rasterize_gaussians(
        **params, viewmats=cams.viewmat, Ks=cams.K, width=20, height=16, background=torch.ones(3, 3)
    )
    assert alpha.min() >= 0 and alpha.max() <= 1 and alpha.max() > 0.99 and alpha.min() < 0.01
    torch.testing.assert_close(alpha_w, alpha)
    torch.testing.assert_close(white, plain + (1 - alpha))
    assert plain.min() >= 0 and (plain <= alpha + 1e-6).all()  # premultiplied colours in [0, 1]
    assert (depth >= 0).all()

    scene = GaussianScene(GaussianConfig(num_points=50, init_radius=0.3)).eval()
    assert scene.backend == "torch"
    out = scene.render(orbit(torch.zeros(1), torch.zeros(1), torch.ones(1) * 3, torch.ones(1) * 40, 24, 24))
    empty = out.alpha[:, 0] < 1e-8
    assert empty.any() and (out.rgb.permute(0, 2, 3, 1)[empty] == 1.0).all()
    assert out.rgb.shape == (1, 3, 24, 24) and out.alpha.shape == out.depth.shape == (1, 1, 24, 24)


def test_nothing_visible_gives_background_and_zero_gradients():
    params = {k: v.requires_grad_() for k, v in random_gaussians(40, seed=4).items()}
    c2w = look_at(torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, 6.0]]))  # looking away
    K = torch.tensor([[[30.0, 0, 8], [0, 30.0, 8], [0, 0, 1]]])
    rgb, alpha, _, meta = rasterize_gaussians(
        **params, viewmats=torch.linalg.inv(c2w), Ks=K, width=16, height=16, background=torch.tensor([[0.3, 0.6, 0.9]])
    )
    rgb.sum().backward()
    assert meta["num_pairs"] == 0 and (alpha == 0).all()
    torch.testing.assert_close(rgb, torch.tensor([0.3, 0.6, 0.9]).expand(1, 16, 16, 3))
    assert all((p.grad == 0).all() for p in params.values())


def test_bad_input_is_a_concise_error():
    p = random_gaussians(10, seed=7)
    cams = three_cameras(8, 8)
    args = {"viewmats": cams.viewmat, "Ks": cams.K, "width": 8, "height": 8}
    with pytest.raises(ValueError, match="quats must have shape"):
        rasterize_gaussians(**{**p, "quats": p["quats"][:, :3]}, **args)
    with pytest.raises(ValueError, match="colors must be"):
        rasterize_gaussians(**{**p, "colors": torch.rand(10, 4, 3)}, **args)
    with pytest.raises(ValueError, match="background must be"):
        rasterize_gaussians(**p, **args, background=torch.ones(3))
    with pytest.raises(ValueError, match="CUDA"):
        rasterize_gaussians(**p, **args, backend="gsplat")


def test_spherical_harmonics_convention():
    n = 20000  # Fibonacci sphere: near-uniform directions
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    dirs = torch.stack([(1 - z * z).sqrt() * torch.cos(phi), (1 - z * z).sqrt() * torch.sin(phi), z], dim=-1)
    basis = sh_basis(3, dirs)
    gram = basis.T @ basis * (4 * math.pi / n)  # orthonormal on the sphere
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=2e-3, rtol=0)
    dc = torch.randn(5, 1, 3)
    torch.testing.assert_close(sh_to_rgb(dc, torch.randn(5, 3), 0), (SH_C0 * dc[:, 0] + 0.5).clamp_min(0))


def test_densify_prune_and_reset_keep_the_optimizer_working():
    torch.manual_seed(0)
    cfg = GaussianConfig(num_points=200, densify_from=2, densify_every=2, densify_until=100, grad_threshold=1e-5,
                         opacity_reset_every=6, sh_degree=1, background="learned")
    scene = GaussianScene(cfg)
    opt = torch.optim.Adam(scene.param_groups({"means": 1e-3}), eps=1e-15)
    cams = three_cameras(24, 24)
    target = torch.rand(3, 3, 24, 24)
    counts, log = [], []
    for step in range(1, 9):
        out = scene.render(cams)
        opt.zero_grad()
        ((out.rgb - target) ** 2).mean().backward()
        opt.step()
        log.append(scene.post_step(step, out, opt))
        counts.append(scene.num_gaussians)
        # the optimizer holds exactly the scene's current tensors, with moments of matching shape
        held = [p for g in opt.param_groups for p in g["params"]]
        current = list(scene.parameters())
        assert len(held) == len(current) and all(any(p is q for q in current) for p in held)
        assert all(opt.state[p]["exp_avg"].shape == p.shape for p in held if p in opt.state)
        if step == 6:
            assert log[-1]["opacity_reset"] == 1 and scene.opacities.max() <= 0.01 + 1e-6
            assert (opt.state[scene.opacity_logits]["exp_avg_sq"] == 0).all()
    assert counts[0] == 200 and counts[-1] > 200 and log[1]["split"] + log[1]["cloned"] > 0

    # pruning keeps the surviving rows and their moments
    before = scene.means.detach().clone()
    moments = opt.state[scene.means]["exp_avg"].clone()
    mask = torch.arange(scene.num_gaussians) % 3 != 0
    scene.keep(mask, opt)
    torch.testing.assert_close(scene.means.detach(), before[mask])
    torch.testing.assert_close(opt.state[scene.means]["exp_avg"], moments[mask])
    means = scene.means.detach().clone()
    out = scene.render(cams)
    opt.zero_grad()
    out.rgb.mean().backward()
    opt.step()
    assert not torch.equal(scene.means.detach(), means)


def test_state_dict_roundtrip_with_a_different_count():
    scene = GaussianScene(GaussianConfig(num_points=120, sh_degree=2))
    scene.keep(torch.arange(120) % 4 != 0)
    state = scene.state_dict()
    fresh = GaussianScene(GaussianConfig(num_points=10, sh_degree=2))
    fresh.load_state_dict(state)
    assert fresh.num_gaussians == 90
    cams = three_cameras(16, 16)
    torch.testing.assert_close(fresh.render(cams).rgb, scene.render(cams).rgb)


def test_ply_attributes_layout():
    points = torch.randn(30, 3)
    colors = torch.rand(30, 3)
    scene = GaussianScene(GaussianConfig(sh_degree=3), points=points, colors=colors)
    with torch.no_grad():
        scene.sh_rest.copy_(torch.arange(30 * 15 * 3, dtype=torch.float32).view(30, 15, 3))
    attrs = scene.to_ply_attributes()
    assert list(attrs) == ["xyz", "normals", "f_dc", "f_rest", "opacity", "scale", "rotation"]
    table = np.concatenate(list(attrs.values()), axis=1)
    assert table.shape == (30, 3 + 3 + 3 + 45 + 1 + 3 + 4) and table.dtype == np.float32  # 3DGS's 62 columns
    np.testing.assert_allclose(attrs["xyz"], points.numpy())
    np.testing.assert_allclose(attrs["f_dc"] * SH_C0 + 0.5, colors.numpy(), atol=1e-6)
    # f_rest is channel-major: the 15 red coefficients, then green, then blue
    np.testing.assert_array_equal(attrs["f_rest"][1, :3], [45.0, 48.0, 51.0])
    np.testing.assert_array_equal(attrs["f_rest"][1, 15], 46.0)
    np.testing.assert_allclose(np.linalg.norm(attrs["rotation"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(1 / (1 + np.exp(-attrs["opacity"])), 0.1, rtol=1e-5)

    view = scene.viewer_gaussians()  # what the live viewer gets: full covariances, degree-0 colours
    s = scene.scales.detach().numpy()
    np.testing.assert_allclose(view["covariances"], np.stack([np.diag(v) for v in s**2]), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(view["rgbs"], colors.numpy(), atol=1e-6)
    assert view["means"].shape == (30, 3) and view["opacities"].shape == (30, 1)
    view["means"][0] = 100.0
    assert scene.means[0, 0] != 100.0  # a copy, not the live tensor


def test_fit_a_target_image():
    torch.manual_seed(0)
    cams = three_cameras(32, 32)
    target = {k: v for k, v in random_gaussians(60, seed=5).items()}
    with torch.no_grad():
        goal, *_ = rasterize_gaussians(**target, viewmats=cams.viewmat, Ks=cams.K, width=32, height=32,
                                       background=torch.ones(3, 3))
    scene = GaussianScene(GaussianConfig(num_points=150, init_radius=0.7, init_opacity=0.3))
    opt = torch.optim.Adam(scene.param_groups({"means": 3e-3, "colors": 5e-2}), eps=1e-15)
    losses = []
    for _ in range(100):
        out = scene.render(cams)
        loss = ((out.rgb.permute(0, 2, 3, 1) - goal) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_benchmark_reports_both_compositors():
    result = benchmark_rasterizer(n=100, size=16, repeats=1, dense_repeats=1)
    assert result["pairs"] > 0 and result["sparse_ms"] > 0 and result["dense_ms"] > 0
    assert result["dense_over_sparse"] == pytest.approx(result["dense_ms"] / result["sparse_ms"], rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_matches_the_cpu_rasterizer():
    pytest.importorskip("gsplat")
    cams = three_cameras(48, 40)
    for sh_degree in (None, 2):
        params = random_gaussians(500, seed=6, sh_degree=sh_degree)
        weights = [torch.randn(3, 40, 48, 3), torch.randn(3, 40, 48, 1), torch.randn(3, 40, 48, 1)]
        out_c, grad_c, _ = render_and_grad(params, cams, "sparse", sh_degree, 0.01, weights)
        cuda = {k: v.cuda() for k, v in params.items()}
        out_g, grad_g, meta = render_and_grad(
            cuda, cams.to("cuda"), "auto", sh_degree, 0.01, [w.cuda() for w in weights]
        )
        assert meta["backend"] == "gsplat"
        for c, g in zip(out_c, out_g):
            torch.testing.assert_close(g.cpu(), c, atol=2e-3, rtol=1e-3)
        for name in params:
            scale = grad_c[name].abs().max().item()
            torch.testing.assert_close(grad_g[name].cpu(), grad_c[name], atol=1e-2 * scale, rtol=1e-2, msg=name)


def test_the_quantile_threshold_densifies_the_same_gaussians_at_any_gradient_scale():
    """Eq. 7's gradients are about 1/w of SDS's: an absolute threshold densifies fewer Gaussians when the gradients
    shrink, the quantile threshold picks the same ones."""
    torch.manual_seed(0)
    base = torch.rand(200) * 1e-3
    chosen = {}
    for mode in ("absolute", "quantile"):
        for scale in (1.0, 0.01):
            cfg = GaussianConfig(num_points=200, grad_threshold=1e-4,
                                 grad_quantile=0.8 if mode == "quantile" else None)
            scene = GaussianScene(cfg)
            grads = base * scale
            scene.grad2d_sum.copy_(grads)
            scene.grad2d_count.fill_(1)
            scene.grad2d_count[:10] = 0  # never seen: never densified
            scene.grad2d_sum[:10] = 0
            chosen[mode, scale] = scene.grad2d_sum / scene.grad2d_count.clamp_min(1) >= scene.densify_threshold(
                scene.grad2d_sum / scene.grad2d_count.clamp_min(1))
    assert chosen["absolute", 1.0].sum() > 100 and chosen["absolute", 0.01].sum() == 0
    assert torch.equal(chosen["quantile", 1.0], chosen["quantile", 0.01])
    assert 30 <= int(chosen["quantile", 1.0].sum()) <= 45 and not chosen["quantile", 1.0][:10].any()
    with pytest.raises(ValueError, match="grad_quantile"):
        GaussianConfig(grad_quantile=1.5)
