"""NeRF scene: hash-grid encoding, volume rendering, optimization, mesh export, CUDA against CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lods.cameras import orbit, turntable
from lods.scenes import nerf
from lods.scenes.hashgrid import HashGrid, HashGridConfig, make_encoding
from lods.scenes.nerf import NerfConfig, NerfScene, extract_mesh, ray_sphere, render_weights

SMALL_GRID = HashGridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8, per_level_scale=2.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These workloads are small: one thread avoids OpenMP overhead (and stalls on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def center_camera(distance: float):
    """A 1x1-pixel camera on +z looking at the origin: its only ray goes through the centre."""
    one = torch.ones(1)
    return orbit(0 * one, 0 * one, distance * one, 40.0 * one, 1, 1)


def constant_scene(sigma: float, radius: float = 1.0) -> NerfScene:
    """Constant density ``sigma`` and grey albedo 0.5 inside the bounding sphere."""
    config = NerfConfig(radius=radius, blob="none", density_activation="softplus")
    scene = NerfScene(config)
    with torch.no_grad():
        for mlp in (scene.field.density_mlp, scene.field.color_mlp):
            mlp[-1].weight.zero_()
            mlp[-1].bias.zero_()
        scene.field.density_mlp[-1].bias.fill_(math.log(math.expm1(sigma)))  # softplus^-1
    scene.update_occupancy(step=0)
    return scene.eval()


# ----------------------------------------------------------------------------- hash grid


def test_hashgrid_output_shape_and_layout():
    config = HashGridConfig(n_levels=6, log2_hashmap_size=12)
    grid = HashGrid(config)
    assert grid(torch.rand(100, 3)).shape == (100, 12)
    assert grid(torch.rand(0, 3)).shape == (0, 12)
    res = config.resolutions()
    assert res[0] == 16 and res == sorted(res)
    assert grid.n_dense == sum((r + 1) ** 3 <= 2**12 for r in res)


def test_hashgrid_indices_match_instant_ngp_hash():
    config = HashGridConfig(n_levels=5, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0)
    grid = HashGrid(config)
    x = torch.rand(50, 3)
    idx, w = grid.corners(x)
    size = 2**10
    dense_start, hashed_start = 0, None
    for level, r in enumerate(config.resolutions()):
        vertex = torch.minimum((x * r).floor(), torch.tensor(r - 1.0)).long()
        for c in range(8):
            v = vertex + torch.tensor([(c >> d) & 1 for d in range(3)])
            if (r + 1) ** 3 <= size:
                expected = dense_start + v[:, 0] + (r + 1) * v[:, 1] + (r + 1) ** 2 * v[:, 2]
            else:
                if hashed_start is None:
                    hashed_start = level
                    first = -(-dense_start // size) * size
                h = [(int(a) * 1) ^ (int(b) * 2654435761) ^ (int(z) * 805459861) for a, b, z in v.tolist()]
                expected = first + (level - hashed_start) * size + torch.tensor([(k % 2**32) & (size - 1) for k in h])
            assert torch.equal(idx[level, c], expected), (level, c)
        if (r + 1) ** 3 <= size:
            dense_start += (r + 1) ** 3
    assert torch.allclose(w.sum(1), torch.ones(5, 50), atol=1e-6)
    assert int(idx.max()) < grid.table.shape[1]


def test_hashgrid_interpolation_is_trilinear():
    """Features equal to a linear function of the vertex position are interpolated exactly."""
    config = HashGridConfig(n_levels=1, log2_hashmap_size=12, base_resolution=10)
    grid = HashGrid(config)
    r = 10
    v = torch.stack(torch.meshgrid(*[torch.arange(r + 1.0)] * 3, indexing="ij"), -1)
    flat = v.permute(2, 1, 0, 3).reshape(-1, 3) / r  # x fastest, as in the dense index
    with torch.no_grad():
        grid.table[0] = 0.3 * flat[:, 0] - 0.7 * flat[:, 1] + flat[:, 2]
        grid.table[1] = flat[:, 1]
    x = torch.rand(200, 3)
    out = grid(x)
    assert torch.allclose(out[:, 0], 0.3 * x[:, 0] - 0.7 * x[:, 1] + x[:, 2], atol=1e-5)
    assert torch.allclose(out[:, 1], x[:, 1], atol=1e-5)


def test_hashgrid_continuity_and_table_gradients():
    grid = HashGrid(SMALL_GRID)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    x = torch.rand(300, 3) * 0.98 + 0.01
    near = grid(x + 1e-5) - grid(x)
    far = grid(torch.rand(300, 3)) - grid(x)
    assert near.abs().max() < 1e-2 < far.abs().mean()

    out = grid(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    idx, w = grid.corners(x)
    reference = torch.zeros_like(grid.table)
    g = weights.view(300, SMALL_GRID.n_levels, 2).permute(2, 1, 0)  # (F, L, N)
    for f in range(2):
        reference[f].index_put_((idx.reshape(-1),), (g[f][:, None] * w).reshape(-1), accumulate=True)
    assert torch.allclose(grid.table.grad, reference, atol=1e-5)
    assert grid.table.grad.abs().sum() > 0


def test_make_encoding_on_cpu_is_the_torch_grid():
    encoding = make_encoding(SMALL_GRID, "cpu")
    assert isinstance(encoding, HashGrid) and encoding.n_output_dims == SMALL_GRID.n_output_dims


# ----------------------------------------------------------------------------- volume rendering


def test_render_weights_fallback_matches_nerfacc(monkeypatch):
    pytest.importorskip("nerfacc")
    t = torch.sort(torch.rand(7, 33) * 4, dim=-1).values
    sigmas = torch.rand(7, 32) * 3
    reference = render_weights(t[:, :-1], t[:, 1:], sigmas)
    monkeypatch.setattr(nerf, "nerfacc", None)
    ours = render_weights(t[:, :-1], t[:, 1:], sigmas)
    assert torch.allclose(ours, reference, atol=1e-6)
    tau = (sigmas * (t[:, 1:] - t[:, :-1])).sum(-1)
    assert torch.allclose(ours.sum(-1), 1 - torch.exp(-tau), atol=1e-6)


def test_density_blob_and_trunc_exp():
    x = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assert torch.allclose(nerf.density_blob(x, "magic3d", 10.0, 0.5), torch.tensor([10.0, 0.0]))
    assert torch.allclose(nerf.density_blob(x, "dreamfusion", 10.0, 0.5), torch.tensor([10.0, 10.0 * math.exp(-0.5)]))
    assert torch.equal(nerf.density_blob(x, "none", 10.0, 0.5), torch.zeros(2))
    z = torch.tensor([1.0, 20.0], requires_grad=True)
    nerf.trunc_exp(z).sum().backward()
    assert torch.allclose(z.grad, torch.tensor([math.e, math.exp(15.0)]))


def test_scene_without_nerfacc_renders_densely(monkeypatch):
    scene = NerfScene(NerfConfig()).eval()
    monkeypatch.setattr(nerf, "nerfacc", None)
    plain = NerfScene(NerfConfig()).eval()
    assert plain.estimator is None and plain.post_step(0, None, None) == {}
    plain.load_state_dict({k: v for k, v in scene.state_dict().items() if not k.startswith("estimator.")})
    cams = turntable(1, 24)
    with torch.no_grad():
        scene.estimator.binaries.fill_(True)  # no empty-space skipping: the same samples on both
        a, b = scene.render(cams), plain.render(cams)
    assert torch.allclose(a.alpha, b.alpha, atol=1e-5) and torch.allclose(a.rgb, b.rgb, atol=1e-5)


def test_ray_sphere_intersection():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_sphere(o, d, 1.0)
    assert hit.tolist() == [True, False, True]
    assert torch.allclose(near[[0, 2]], torch.tensor([2.0, 0.0]))
    assert torch.allclose(far[[0, 2]], torch.tensor([4.0, 1.0]))


def test_constant_density_slab_matches_closed_form():
    sigma, radius, distance = 0.8, 1.0, 3.0
    scene = constant_scene(sigma, radius)
    with torch.no_grad():
        out = scene.render(center_camera(distance))
    length = 2 * radius
    alpha = 1 - math.exp(-sigma * length)
    assert out.alpha.item() == pytest.approx(alpha, abs=1e-5)
    # Expected depth: integral of t * sigma * exp(-sigma (t - near)) over [near, far].
    near = distance - radius
    depth = near * alpha + (alpha - sigma * length * math.exp(-sigma * length)) / sigma
    assert out.depth.item() == pytest.approx(depth, rel=1e-3)
    assert torch.allclose(out.rgb.flatten(), torch.full((3,), 0.5 * alpha + (1 - alpha)), atol=1e-5)


def test_alpha_range_and_background_compositing():
    scene = NerfScene(NerfConfig()).eval()
    cams = turntable(2, 16)
    with torch.no_grad():
        white = scene.render(cams)
        black = scene.render(cams, background=torch.zeros(3))
        blue = scene.render(cams, background=torch.tensor([0.0, 0.0, 1.0]))
    assert white.rgb.shape == (2, 3, 16, 16) and white.alpha.shape == white.depth.shape == (2, 1, 16, 16)
    assert white.alpha.min() >= 0 and white.alpha.max() <= 1
    assert white.alpha.max() > 0.99 and white.alpha.min() < 1e-3  # an opaque blob, empty corners
    assert torch.allclose(white.rgb - black.rgb, (1 - white.alpha).expand_as(white.rgb), atol=1e-5)
    empty = (white.alpha < 1e-6).expand_as(white.rgb)
    assert torch.allclose(white.rgb[empty], torch.ones(1), atol=1e-5) and white.depth[white.alpha < 1e-6].max() < 1e-5
    assert torch.allclose(blue.rgb[:, 2:][empty[:, 2:]], torch.ones(1), atol=1e-5)
    assert torch.allclose(blue.rgb[:, :2][empty[:, :2]], torch.zeros(1), atol=1e-5)
    solid = white.alpha > 0.99
    z = white.depth[solid] / white.alpha[solid]
    assert (z > 2.85 - 0.6).all() and (z < 2.85).all()  # the blob's front half, camera 2.85 from the centre


def test_learned_and_random_backgrounds():
    scene = NerfScene(NerfConfig(background="learned"))
    out = scene.render(turntable(1, 8))
    assert "background" in [g["name"] for g in scene.param_groups()]
    out.rgb.mean().backward()
    assert scene.background_net.mlp[-1].weight.grad.abs().sum() > 0
    assert out.rgb[0, :, 0, 0].min() > 0.8  # starts near white

    scene = NerfScene(NerfConfig(background="random"))
    a, b = (scene.render(turntable(1, 8)).rgb[0, :, 0, 0] for _ in range(2))
    assert not torch.allclose(a, b)
    with torch.no_grad():
        assert torch.allclose(scene.eval().render(turntable(1, 8)).rgb[0, :, 0, 0], torch.ones(3))


def test_chunked_render_equals_single_chunk():
    scene = NerfScene(NerfConfig()).eval()
    small = NerfScene(NerfConfig(chunk_points=64 * 7)).eval()
    small.load_state_dict(scene.state_dict())
    cams = turntable(1, 24)
    with torch.no_grad():
        a, b = scene.render(cams), small.render(cams)
    assert torch.allclose(a.rgb, b.rgb, atol=1e-6) and torch.allclose(a.depth, b.depth, atol=1e-5)


def test_early_stop_skips_hidden_samples_only():
    scene = NerfScene(NerfConfig()).eval()
    cams = turntable(1, 24)
    counts = []
    forward = scene.field.forward
    scene.field.forward = lambda x: (counts.append(len(x)), forward(x))[1]
    with torch.no_grad():
        stopped = scene.render(cams)
        scene.config.early_stop_eps = 0.0
        full = scene.render(cams)
    assert counts[0] < 0.8 * counts[1]
    assert (stopped.alpha - full.alpha).abs().max() < 1e-3 and (stopped.rgb - full.rgb).abs().max() < 1e-3


def test_training_jitters_samples_and_eval_is_deterministic():
    scene = NerfScene(NerfConfig())
    cams = turntable(1, 16)
    with torch.no_grad():
        a, b = scene.render(cams).alpha, scene.render(cams).alpha
        scene.eval()
        c, d = scene.render(cams).alpha, scene.render(cams).alpha
    assert not torch.equal(a, b) and torch.equal(c, d)
    assert (a - c).abs().max() < 0.2


# ----------------------------------------------------------------------------- optimization


def test_param_groups_and_occupancy_updates():
    scene = NerfScene(NerfConfig(occupancy_every=4, blob="none"))
    groups = {g["name"]: g for g in scene.param_groups({"grid": 0.5})}
    assert set(groups) == {"grid", "mlp"} and groups["grid"]["lr"] == 0.5 and groups["mlp"]["lr"] == 1e-3
    n_params = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_params == sum(p.numel() for p in scene.parameters())
    start = scene.estimator.occs.clone()
    with torch.no_grad():
        scene.field.density_mlp[-1].bias.fill_(5.0)  # dense everywhere
    scene.post_step(3, None, None)
    assert torch.equal(scene.estimator.occs, start)
    stats = scene.post_step(4, None, None)
    assert stats["occupied"] > 0.9 and not torch.equal(scene.estimator.occs, start)


def test_fit_colored_sphere_from_three_views():
    torch.manual_seed(0)
    cams = turntable(3, 32)
    origins, dirs = cams.rays()
    _, _, hit = ray_sphere(origins, dirs, 0.55)
    color = torch.tensor([0.9, 0.3, 0.2])
    target = torch.where(hit[..., None], color, torch.ones(3)).view(3, 32, 32, 3).permute(0, 3, 1, 2)
    scene = NerfScene(NerfConfig())
    optimizer = torch.optim.Adam(scene.param_groups({"grid": 3e-2, "mlp": 1e-2}), eps=1e-15)
    losses = []
    for step in range(30):
        out = scene.render(cams)
        loss = (out.rgb - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scene.post_step(step, out, optimizer)
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        final = scene.eval().render(cams)
    inside = final.rgb.permute(0, 2, 3, 1)[hit.view(3, 32, 32)]  # (pixels, 3)
    assert (inside.mean(0) - color).abs().max() < 0.05


# ----------------------------------------------------------------------------- mesh export


def test_extract_mesh_of_the_initial_blob():
    trimesh = pytest.importorskip("trimesh")
    config = NerfConfig()
    scene = NerfScene(config)
    threshold = 10.0
    vertices, faces, colors = extract_mesh(scene, resolution=48, threshold=threshold)
    assert vertices.dtype == np.float32 and faces.shape[1] == 3 and colors.shape == vertices.shape
    assert colors.dtype == np.uint8
    # magic3d blob: sigma = exp(scale * (1 - r / std)) (the MLP adds little at initialization)
    radius = config.blob_std * (1 - math.log(threshold) / config.blob_scale)
    r = np.linalg.norm(vertices, axis=1)
    assert abs(r.mean() - radius) < 0.02 and r.std() < 0.02
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.1)
    with pytest.raises(ValueError, match="no surface"):
        extract_mesh(scene, resolution=16, threshold=1e9)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_agree_with_cpu_reference():
    torch.manual_seed(0)
    grid = HashGrid(SMALL_GRID)
    with torch.no_grad():
        grid.table.uniform_(-1, 1)
    x = torch.rand(1000, 3)
    cpu = grid(x)
    assert torch.allclose(grid.to("cuda")(x.cuda()).cpu(), cpu, atol=1e-5)
    assert make_encoding(SMALL_GRID, "cuda")(x.cuda()).shape == cpu.shape

    config = NerfConfig(samples_per_ray=256)
    cams = turntable(2, 32)
    gpu_scene = NerfScene(config, device="cuda").eval()
    with torch.no_grad():
        fast = gpu_scene.render(cams)
        gpu_scene.sampler = "dense"
        references = [gpu_scene.render(cams)]
        if isinstance(gpu_scene.field.encoding, HashGrid):  # same parameters on both devices: compare with CPU
            cpu_scene = NerfScene(config).eval()
            cpu_scene.load_state_dict({k: v.cpu() for k, v in gpu_scene.state_dict().items()})
            references.append(cpu_scene.render(cams))
    for ref in references:
        assert (fast.alpha.cpu() - ref.alpha.cpu()).abs().mean() < 1e-2
        assert (fast.rgb.cpu() - ref.rgb.cpu()).abs().mean() < 1e-2
        assert (fast.depth.cpu() - ref.depth.cpu()).abs().mean() < 2e-2
