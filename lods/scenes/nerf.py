"""A NeRF scene: hash-grid field, density blob, volume rendering, occupancy grid, mesh export.

The field (Instant-NGP style, as in the LODS NeRF runs) maps a point to a density and an albedo:
a hash-grid encoding, then one small MLP for the density and one for the colour. A density "blob"
(DreamFusion, Magic3D) is added before the activation so optimization starts from a ball.

Volume rendering (Max 1995, NeRF Eq. 3): with ``delta_i`` the length of sample ``i``'s interval,
``alpha_i = 1 - exp(-sigma_i * delta_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``, ``w_i = T_i alpha_i``;
a pixel's colour is ``sum_i w_i c_i + (1 - sum_i w_i) * background``.

Backends, chosen once at construction from the device:

* ``"dense"`` (CPU, and CUDA without nerfacc's kernels): every ray that meets the scene's bounding
  sphere gets samples at a fixed step (jittered in training, mid-interval in eval), laid out as a
  dense (rays x samples) array. Samples outside the sphere or in empty cells of the occupancy grid
  are skipped (zero density, no network evaluation), and so are the samples behind a
  transmittance below ``early_stop_eps``, found by a density pass without gradient. The weights
  come from nerfacc's dense functions, or from the plain-PyTorch :func:`render_weights` when
  nerfacc is not installed.
* ``"nerfacc"`` (CUDA): nerfacc's ``OccGridEstimator`` marches the rays through the occupied
  cells (empty-space skipping, early stop) and the weights are computed on packed samples.

Both backends keep the occupancy in the same nerfacc estimator, updated in :meth:`NerfScene.post_step`.
The dense backend is the reference for the CUDA one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lods.cameras import CameraRange, Cameras
from lods.scenes.base import RenderOutput, Scene
from lods.scenes.hashgrid import HashGridConfig, make_encoding, tinycudann_available

try:
    import nerfacc
except ImportError:
    nerfacc = None


@dataclass
class NerfConfig:
    """Field, rendering and optimization settings of a :class:`NerfScene`."""

    grid: HashGridConfig = field(default_factory=HashGridConfig)
    radius: float = 1.0  # bounding sphere of the scene; the hash grid covers its cube
    samples_per_ray: int = 64  # samples along a diameter; the step is 2 * radius / samples_per_ray
    density_activation: str = "trunc_exp"  # "trunc_exp" or "softplus"
    blob: str = "magic3d"  # density bias at the centre: "magic3d", "dreamfusion" or "none"
    blob_scale: float = 10.0
    blob_std: float = 0.5
    hidden_dim: int = 64  # width of the density and colour MLPs
    n_hidden_layers: int = 1
    background: str = "white"  # "white", "random" (per view, while training) or "learned" (MLP on the direction)
    lr_grid: float = 1e-2
    lr_mlp: float = 1e-3
    lr_background: float = 1e-3
    occupancy_resolution: int = 32  # cells per side of the occupancy grid (128 is common on CUDA)
    occupancy_every: int = 16  # update the occupancy grid every this many steps
    occupancy_threshold: float = 0.01  # a cell is occupied when sigma * step exceeds this (or the mean)
    occupancy_decay: float = 0.95  # EMA decay of the cells' occupancy values
    occupancy_warmup: int = 256  # before this step every cell is re-evaluated at each update
    early_stop_eps: float = 1e-4  # samples behind a transmittance below this are skipped (0: never)
    chunk_points: int = 2**18  # rays are rendered in chunks of about this many dense samples

    def __post_init__(self) -> None:
        if self.density_activation not in ("trunc_exp", "softplus"):
            raise ValueError(f"density_activation must be 'trunc_exp' or 'softplus', not {self.density_activation!r}")
        if self.blob not in ("magic3d", "dreamfusion", "none"):
            raise ValueError(f"blob must be 'magic3d', 'dreamfusion' or 'none', not {self.blob!r}")
        if self.background not in ("white", "random", "learned"):
            raise ValueError(f"background must be 'white', 'random' or 'learned', not {self.background!r}")

    @property
    def step_size(self) -> float:
        return 2.0 * self.radius / self.samples_per_ray


class _TruncExp(torch.autograd.Function):
    """exp(x) with the backward's exp clamped at x = 15, so a large density cannot blow up its gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-15.0, 15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def density_blob(x: torch.Tensor, kind: str, scale: float, std: float) -> torch.Tensor:
    """Pre-activation density bias (N,) at points x (N, 3).

    ``"magic3d"``: ``scale * (1 - |x| / std)``, positive inside radius ``std``, negative outside;
    ``"dreamfusion"``: ``scale * exp(-|x|^2 / (2 std^2))``; ``"none"``: zero.
    """
    if kind == "none":
        return x.new_zeros(x.shape[0])
    r2 = x.square().sum(-1)
    if kind == "magic3d":
        return scale * (1.0 - r2.sqrt() / std)
    return scale * torch.exp(-0.5 * r2 / std**2)


def _mlp(n_in: int, hidden: int, n_hidden_layers: int, n_out: int) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i in range(n_hidden_layers):
        layers += [torch.nn.Linear(n_in if i == 0 else hidden, hidden), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(hidden if n_hidden_layers else n_in, n_out))
    return torch.nn.Sequential(*layers)


class NerfField(torch.nn.Module):
    """Density and albedo at world points inside the bounding cube ``[-radius, radius]^3``."""

    def __init__(self, config: NerfConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.encoding = make_encoding(config.grid, device)
        n_enc = config.grid.n_output_dims
        self.density_mlp = _mlp(n_enc, config.hidden_dim, config.n_hidden_layers, 1).to(device)
        self.color_mlp = _mlp(n_enc, config.hidden_dim, config.n_hidden_layers, 3).to(device)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x / (2.0 * self.config.radius) + 0.5)

    def _sigma(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        raw = self.density_mlp(features).squeeze(-1) + density_blob(x, c.blob, c.blob_scale, c.blob_std)
        return trunc_exp(raw) if c.density_activation == "trunc_exp" else F.softplus(raw)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """sigma (N,) at points (N, 3)."""
        return self._sigma(x, self._encode(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sigma (N,) and albedo (N, 3) in [0, 1] at points (N, 3)."""
        features = self._encode(x)
        return self._sigma(x, features), torch.sigmoid(self.color_mlp(features))


class DirectionBackground(torch.nn.Module):
    """A learned environment colour: ray direction -> sine/cosine features -> MLP -> sigmoid RGB."""

    def __init__(self, n_frequencies: int = 4, hidden: int = 32):
        super().__init__()
        self.register_buffer("frequencies", 2.0 ** torch.arange(n_frequencies) * math.pi, persistent=False)
        self.mlp = _mlp(3 + 6 * n_frequencies, hidden, 1, 3)
        torch.nn.init.constant_(self.mlp[-1].bias, 3.0)  # sigmoid(3) ~ 0.95: starts near white

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        angles = (dirs[..., None] * self.frequencies).flatten(-2)
        return torch.sigmoid(self.mlp(torch.cat([dirs, angles.sin(), angles.cos()], -1)))


def ray_sphere(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances (N,) of unit-direction rays through the sphere at the origin, and a hit mask.

    A camera inside the sphere enters at 0.
    """
    b = (origins * dirs).sum(-1)
    c = origins.square().sum(-1) - radius**2
    disc = b.square() - c
    root = disc.clamp_min(0.0).sqrt()
    near = (-b - root).clamp_min(0.0)
    far = -b + root
    return near, far, (disc > 0) & (far > 0)


def render_weights(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Volume-rendering weights (R, S) of dense (rays x samples) intervals: ``w_i = T_i (1 - exp(-sigma_i delta_i))``.

    nerfacc's ``render_weight_from_density`` when nerfacc is installed; the same formula in PyTorch otherwise.
    """
    if nerfacc is not None:
        return nerfacc.render_weight_from_density(t_starts, t_ends, sigmas)[0]
    tau = sigmas * (t_ends - t_starts)
    trans = torch.exp(-(torch.cumsum(tau, -1) - tau))
    return trans * (1.0 - torch.exp(-tau))


@functools.cache
def nerfacc_cuda_available() -> bool:
    """True when nerfacc's CUDA kernels load (prebuilt, or compiled on first use with nvcc)."""
    if nerfacc is None or not torch.cuda.is_available():
        return False
    try:
        from nerfacc.cuda._backend import _C
    except Exception:
        return False
    return _C is not None


class NerfScene(Scene):
    """A NeRF optimized by score distillation; see the module docstring for the backends.

    ``render`` follows the conventions of :class:`~lods.scenes.base.RenderOutput`: rgb composited
    over the background, alpha the accumulated opacity, depth the expected camera-space z (the
    weights' sum of z, not divided by alpha). The backend is fixed at construction; build the
    scene on the device it will run on rather than moving it later.
    """

    backbone = "nerf"
    live_view = "render"  # the viewer asks the trainer to render each browser's camera

    @property
    def video_scale(self) -> int:
        """The turntable at the training size on the CPU, where ray marching costs per pixel (twice it on CUDA)."""
        return 2 if next(self.parameters()).device.type == "cuda" else 1

    @classmethod
    def build(cls, config, prior, device, generator, init=None) -> NerfScene:
        return cls(config.nerf, device=device)


    def __init__(self, config: NerfConfig | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config or NerfConfig()
        device = torch.device(device)
        c = self.config
        self.field = NerfField(c, device)
        self.background_net = DirectionBackground().to(device) if c.background == "learned" else None
        self.estimator = None
        if nerfacc is not None:
            aabb = torch.tensor([-c.radius] * 3 + [c.radius] * 3)
            self.estimator = nerfacc.OccGridEstimator(aabb, resolution=c.occupancy_resolution).to(device)
            self.update_occupancy(step=0)
        use_nerfacc = device.type == "cuda" and nerfacc_cuda_available()
        self.sampler = "nerfacc" if use_nerfacc else "dense"
        encoding = "tcnn" if device.type == "cuda" and tinycudann_available() else "torch"
        self.backend = f"{self.sampler}+{encoding}"

    # ----------------------------------------------------------------- optimization

    def param_groups(self, lr: dict[str, float] | None = None) -> list[dict]:
        """Groups ``grid``, ``mlp`` (density and colour heads) and, when learned, ``background``; ``lr`` overrides."""
        c = self.config
        rates = {"grid": c.lr_grid, "mlp": c.lr_mlp, "background": c.lr_background}
        rates.update(lr or {})
        groups = [
            {"name": "grid", "params": list(self.field.encoding.parameters()), "lr": rates["grid"]},
            {
                "name": "mlp",
                "params": [*self.field.density_mlp.parameters(), *self.field.color_mlp.parameters()],
                "lr": rates["mlp"],
            },
        ]
        if self.background_net is not None:
            params = list(self.background_net.parameters())
            groups.append({"name": "background", "params": params, "lr": rates["background"]})
        return groups

    def export_geometry(self, out: Path, size: int, camera: CameraRange) -> dict[str, str]:
        """``mesh.glb``: marching cubes of the density, coloured by the field."""
        from lods.export import write_mesh_glb

        write_mesh_glb(out / "mesh.glb", *extract_mesh(self))
        return {"mesh": "mesh.glb"}

    def post_step(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> dict:
        """Refresh the occupancy grid every ``occupancy_every`` steps; returns the occupied fraction."""
        if self.estimator is None:
            return {}
        self.update_occupancy(step, every=self.config.occupancy_every)
        return {"occupied": self.estimator.binaries.float().mean().item()}

    @torch.no_grad()
    def update_occupancy(self, step: int, every: int = 1) -> None:
        """EMA update of the occupancy grid from the field's density when ``step % every == 0`` (training mode).

        nerfacc's rule (Instant-NGP's grid): a cell's value is max(decay * value, sigma * step_size) at a
        random point of the cell; before ``occupancy_warmup`` every cell is evaluated, later a sample.
        """
        c = self.config

        def occupancy(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.field.density(part) for part in x.split(c.chunk_points)]) * c.step_size

        self.estimator.update_every_n_steps(
            step,
            occ_eval_fn=occupancy,
            occ_thre=c.occupancy_threshold,
            ema_decay=c.occupancy_decay,
            warmup_steps=c.occupancy_warmup,
            n=every,
        )

    # ----------------------------------------------------------------- rendering

    def render(self, cameras: Cameras, background: torch.Tensor | None = None) -> RenderOutput:
        """Render ``cameras``; ``background`` (3,), (B, 3) or (B, 3, H, W) overrides the configured one."""
        cameras = cameras.to(next(self.field.parameters()).device)
        B, H, W = len(cameras), cameras.height, cameras.width
        origins, dirs = (t.reshape(-1, 3) for t in cameras.rays())
        rays_per_chunk = max(1, self.config.chunk_points // self.config.samples_per_ray)
        parts = [self.render_rays(o, d) for o, d in zip(origins.split(rays_per_chunk), dirs.split(rays_per_chunk))]
        color, opacity, distance = (torch.cat(p) for p in zip(*parts))
        cos = (dirs.view(B, H * W, 3) * cameras.c2w[:, None, :3, 2]).sum(-1)  # ray . camera z axis
        depth = (distance.view(B, H * W) * cos).view(B, 1, H, W)
        color = color.view(B, H, W, 3).permute(0, 3, 1, 2)
        alpha = opacity.clamp(0.0, 1.0).view(B, 1, H, W)
        if background is None:
            background = self.background_color(dirs.view(B, H, W, 3))
        elif background.dim() <= 2:
            background = background.to(color).reshape(-1, 3)[:, :, None, None]
        rgb = color + (1.0 - alpha) * background.to(color)
        return RenderOutput(rgb=rgb, alpha=alpha, depth=depth)

    def background_color(self, dirs: torch.Tensor) -> torch.Tensor:
        """The configured background for ray directions (B, H, W, 3): (B, 3, H, W) or broadcastable (B, 3, 1, 1)."""
        B = dirs.shape[0]
        if self.background_net is not None:
            return self.background_net(dirs).permute(0, 3, 1, 2)
        if self.config.background == "random" and self.training:
            return torch.rand(B, 3, 1, 1, device=dirs.device)
        return torch.ones(B, 3, 1, 1, device=dirs.device)

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Premultiplied colour (N, 3), opacity (N,) and weighted distance along the ray (N,) of N rays."""
        near, far, hit = ray_sphere(origins, dirs, self.config.radius)
        idx = hit.nonzero().squeeze(1)
        n = origins.shape[0]
        if idx.numel() == 0:
            return origins.new_zeros(n, 3), origins.new_zeros(n), origins.new_zeros(n)
        render = self._render_packed if self.sampler == "nerfacc" else self._render_dense
        color_h, opacity_h, distance_h = render(origins[idx], dirs[idx], near[idx], far[idx])
        color = origins.new_zeros(n, 3).index_copy(0, idx, color_h)
        opacity = origins.new_zeros(n).index_copy(0, idx, opacity_h)
        distance = origins.new_zeros(n).index_copy(0, idx, distance_h)
        return color, opacity, distance

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """Whether points (..., 3) lie in occupied cells of the occupancy grid (all True without nerfacc)."""
        if self.estimator is None:
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        res = self.estimator.resolution
        cell = ((x / (2.0 * self.config.radius) + 0.5) * res).long()
        cell = torch.minimum(cell.clamp_min(0), res - 1)
        return self.estimator.binaries[0, cell[..., 0], cell[..., 1], cell[..., 2]]

    def _render_dense(
        self, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        n_rays = origins.shape[0]
        k = torch.arange(c.samples_per_ray, device=origins.device, dtype=origins.dtype)
        t_starts = near[:, None] + c.step_size * k
        t_ends = t_starts + c.step_size
        if self.training:
            u = torch.rand(n_rays, c.samples_per_ray, device=origins.device, dtype=origins.dtype)
        else:
            u = torch.full((n_rays, c.samples_per_ray), 0.5, device=origins.device, dtype=origins.dtype)
        t = t_starts + u * c.step_size
        points = origins[:, None] + t[..., None] * dirs[:, None]
        keep = (t < far[:, None]) & self.occupied(points)
        n = n_rays * c.samples_per_ray
        if c.early_stop_eps > 0:
            keep &= self._transmitting(points, keep)
        lin = keep.view(-1).nonzero().squeeze(1)
        sigma_k, rgb_k = self.field(points.view(-1, 3)[lin])
        sigma = sigma_k.new_zeros(n).index_copy(0, lin, sigma_k).view(n_rays, c.samples_per_ray)
        rgb = rgb_k.new_zeros(n, 3).index_copy(0, lin, rgb_k).view(n_rays, c.samples_per_ray, 3)
        weights = render_weights(t_starts, t_ends, sigma)
        color = (weights[..., None] * rgb).sum(1)
        return color, weights.sum(1), (weights * t).sum(1)

    @torch.no_grad()
    def _transmitting(self, points: torch.Tensor, keep: torch.Tensor, block: int = 8) -> torch.Tensor:
        """Early stop: whether the transmittance in front of each sample (R, S) is above ``early_stop_eps``.

        A density-only pass without gradient, marching the rays ``block`` samples at a time and dropping
        the rays already opaque, so that the inside of a solid object is never evaluated.
        """
        c = self.config
        tau = torch.zeros(keep.shape, device=points.device, dtype=points.dtype)
        depth = torch.zeros(keep.shape[0], device=points.device, dtype=points.dtype)  # optical depth so far
        for start in range(0, keep.shape[1], block):
            part = slice(start, start + block)
            todo = keep[:, part] & (depth < -math.log(c.early_stop_eps))[:, None]
            if todo.any():
                tau[:, part][todo] = self.field.density(points[:, part][todo]) * c.step_size
                depth += tau[:, part].sum(1)
        return torch.exp(tau - torch.cumsum(tau, -1)) > c.early_stop_eps

    def _render_packed(
        self, origins: torch.Tensor, dirs: torch.Tensor, near: torch.Tensor, far: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        n_rays = origins.shape[0]

        def sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor) -> torch.Tensor:
            t = 0.5 * (t_starts + t_ends)
            return self.field.density(origins[ray_indices] + t[:, None] * dirs[ray_indices])

        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins,
            dirs,
            sigma_fn=sigma_fn,
            t_min=near,
            t_max=far,
            render_step_size=c.step_size,
            stratified=self.training,
            early_stop_eps=c.early_stop_eps,
        )
        t = 0.5 * (t_starts + t_ends)
        sigma, rgb = self.field(origins[ray_indices] + t[:, None] * dirs[ray_indices])
        weights = nerfacc.render_weight_from_density(t_starts, t_ends, sigma, ray_indices=ray_indices, n_rays=n_rays)[0]
        color = nerfacc.accumulate_along_rays(weights, rgb, ray_indices, n_rays)
        opacity = nerfacc.accumulate_along_rays(weights, None, ray_indices, n_rays).squeeze(-1)
        distance = nerfacc.accumulate_along_rays(weights, t[:, None], ray_indices, n_rays).squeeze(-1)
        return color, opacity, distance


@torch.no_grad()
def extract_mesh(
    scene: NerfScene, resolution: int = 128, threshold: float = 10.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marching cubes on the density sampled over the bounding cube, vertex colours from the field.

    Returns vertices (V, 3) float32 in world units, faces (F, 3) int64 (counter-clockwise seen from
    outside) and vertex colours (V, 3) uint8. ``threshold`` is in density units (sigma).
    """
    from skimage.measure import marching_cubes

    r = scene.config.radius
    device = next(scene.parameters()).device
    axis = torch.linspace(-r, r, resolution, device=device)
    sigma = torch.zeros(resolution, resolution * resolution, device=device)
    plane = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).view(-1, 2)
    for i, x in enumerate(axis):  # one plane at a time: the memory of a plane, not of the cube
        grid = torch.cat([x.expand(len(plane), 1), plane], dim=1)
        # Only where the renderer would look: inside the sphere and in occupied cells of the occupancy grid (the
        # rest renders as empty space); a fraction of the points, so a fraction of the time.
        keep = (grid.norm(dim=-1) <= r) & scene.occupied(grid)
        points = grid[keep]
        if len(points):
            sigma[i, keep] = torch.cat([scene.field.density(p) for p in points.split(scene.config.chunk_points)])
    sigma = sigma.view(resolution, resolution, resolution)
    volume = sigma.cpu().numpy()
    if not volume.min() < threshold < volume.max():
        raise ValueError(
            f"no surface at density {threshold}: the density ranges from {volume.min():.3g} to {volume.max():.3g}"
        )
    verts, faces, _, _ = marching_cubes(volume, level=threshold, spacing=(2 * r / (resolution - 1),) * 3)
    verts = (verts - r).astype(np.float32)
    # For a field that is larger inside, skimage's triangles wind inwards: reverse them to face outwards.
    faces = faces[:, ::-1].astype(np.int64)
    points = torch.from_numpy(verts).to(device)
    rgb = torch.cat([scene.field(x)[1] for x in points.split(scene.config.chunk_points)])
    colors = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return verts, faces, colors
