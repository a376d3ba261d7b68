"""3D Gaussian splats as the optimized scene theta (3DGS), with its adaptive density control.

Parameters are stored unconstrained, as in 3DGS: centres, log-scales, quaternions (wxyz, normalized
when rendering), opacity logits and spherical-harmonic colour coefficients (degree-0 term apart from
the rest, so that the rest can learn 20x slower). Rendering goes through ``rasterize_gaussians``:
gsplat on CUDA, the project's sparse PyTorch rasterizer elsewhere.

Densification follows 3DGS: the norm of the view-space (NDC) gradient of each Gaussian's projected
centre is averaged over the views that saw it; Gaussians above ``grad_threshold`` are cloned when
small and split in two when large; nearly transparent and oversized Gaussians are pruned; opacities
can be reset on a schedule. Every change of the parameter tensors is mirrored in the optimizer's
param groups and Adam moments, so training continues seamlessly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lods.cameras import CameraRange, Cameras
from lods.scenes.base import RenderOutput, Scene
from lods.scenes.rasterize import (
    default_backend,
    num_sh_bases,
    quat_scale_to_covar,
    quat_to_rotmat,
    rasterize_gaussians,
    rgb_to_sh_dc,
    sh_to_rgb,
)

_PARAMS = {  # param group name -> attribute
    "means": "means",
    "scales": "log_scales",
    "quats": "quats",
    "opacities": "opacity_logits",
    "colors": "sh_dc",
    "colors_rest": "sh_rest",
}


@dataclass
class GaussianConfig:
    """Initialization, densification and learning rates of a ``GaussianScene``.

    Defaults are sized for CPU runs at 64-128 px (a few thousand Gaussians); DreamGaussian uses
    5,000 initial points in a ball of radius 0.5, GaussianDreamer densifies from step 300 to 900.
    """

    num_points: int = 2000  # initial Gaussians when no point cloud is given
    init_radius: float = 0.5  # radius of the ball of random initial centres (world units)
    init_opacity: float = 0.1
    sh_degree: int = 0  # 0..3; view-dependent colour above 0
    background: str = "white"  # "white", "random" (per view, while training) or "learned"

    densify_from: int = 100  # first step of adaptive density control
    densify_until: int = 1000  # no densification, pruning or opacity reset from this step on
    densify_every: int = 100
    grad_threshold: float = 0.0002  # mean NDC-space gradient norm of the projected centre (3DGS)
    # Instead of grad_threshold: densify the Gaussians whose mean gradient lies above this quantile of the seen
    # ones. Scale-free: Eq. 7's gradients are about 1/w of SDS's, so one absolute threshold cannot suit both.
    grad_quantile: float | None = None
    clone_max_scale: float = 0.03  # high-gradient Gaussians this small (largest axis) are cloned, larger are split
    prune_opacity: float = 0.005  # prune below this opacity
    prune_scale: float = 0.3  # prune when the largest axis exceeds this (world units)
    max_screen_size: float = 0.3  # prune when the splat's radius exceeds this fraction of the image side
    opacity_reset_every: int = 0  # reset every opacity to <= 0.01 this often (3DGS: 3000); 0 disables
    max_points: int | None = None  # densification stops adding Gaussians at this count; None: the prior's cap
    max_abs_mean: float = 100.0  # divergence guard: a centre this far from the origin (world units) is a blow-up
    max_scale: float = 10.0  # divergence guard: a Gaussian this large (largest axis, world units) is a blow-up

    lr_means: float = 1e-3
    lr_scales: float = 5e-3
    lr_quats: float = 5e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 1e-2  # the degree-0 colour; higher SH degrees use a twentieth of it (3DGS)
    lr_background: float = 1e-2  # only with background = "learned"

    def __post_init__(self) -> None:
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {self.sh_degree}")
        if self.background not in ("white", "random", "learned"):
            raise ValueError(f"background must be 'white', 'random' or 'learned', got {self.background!r}")
        if self.grad_quantile is not None and not 0 < self.grad_quantile < 1:
            raise ValueError(f"grad_quantile must be between 0 and 1 (or null), got {self.grad_quantile}")


def knn_scales(points: torch.Tensor, k: int = 3, chunk_elems: int = 2**24) -> torch.Tensor:
    """Root-mean-square distance of each point to its ``k`` nearest neighbours (3DGS's initial scale), (N,)."""
    n = len(points)
    if n <= 1:
        return torch.full((n,), 0.01, dtype=points.dtype, device=points.device)
    k = min(k, n - 1)
    rows = max(1, chunk_elems // n)
    out = []
    for i in range(0, n, rows):
        d2 = torch.cdist(points[i : i + rows], points).square()
        out.append(d2.topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1))  # drop the point itself
    return torch.cat(out).clamp_min(1e-10).sqrt()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float32 CPU copy."""
    return t.detach().float().cpu().numpy().astype(np.float32)


def ball_points(n: int, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points uniformly distributed in a ball of ``radius`` around the origin, (n, 3)."""
    d = torch.randn(n, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return d * radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)


DEFAULT_MAX_POINTS = 20000  # the cap of a scene built without a prior's (PriorDefaults.max_gaussians)
_STATS = ("grad2d_sum", "grad2d_count", "max_radius")


class GaussianScene(Scene):
    """A set of 3D Gaussians; ``render`` gives RGB, alpha and depth for a batch of cameras."""

    backbone = "gs"
    live_view = "splats"

    @classmethod
    def build(cls, config, prior, device, generator, init=None) -> GaussianScene:
        return cls(config.gaussians, generator=generator).to(device)

    def __init__(
        self,
        config: GaussianConfig | None = None,
        points: torch.Tensor | None = None,
        colors: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Random centres in a ball with grey-ish colours, or ``points`` (N, 3) with ``colors`` (N, 3) in [0, 1]."""
        super().__init__()
        self.config = cfg = config or GaussianConfig()
        if points is None:
            points = ball_points(cfg.num_points, cfg.init_radius, generator)
            colors = 0.5 + 0.1 * (torch.rand(len(points), 3, generator=generator) - 0.5)
        elif colors is None:
            colors = torch.full_like(points, 0.5)
        points, colors = points.detach().float().cpu(), colors.detach().float().cpu()  # built on CPU; move with .to()
        n = len(points)
        self.means = nn.Parameter(points.clone())
        self.log_scales = nn.Parameter(knn_scales(points).log()[:, None].repeat(1, 3))
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        self.opacity_logits = nn.Parameter(torch.full((n,), cfg.init_opacity).logit())
        self.sh_dc = nn.Parameter(rgb_to_sh_dc(colors)[:, None, :])
        self.sh_rest = nn.Parameter(torch.zeros(n, num_sh_bases(cfg.sh_degree) - 1, 3))
        if cfg.background == "learned":
            self.background_logit = nn.Parameter(torch.full((3,), 3.0))  # sigmoid(3) ~ 0.95, near white
        self._reset_stats()

    # -- properties -------------------------------------------------------------------------------

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def backend(self) -> str:
        """Which rasterizer ``render`` uses, decided by the parameters' device: "gsplat" or "torch"."""
        return "gsplat" if default_backend(self.means.device) == "gsplat" else "torch"

    @property
    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def sh(self) -> torch.Tensor:
        """All SH coefficients (N, (sh_degree + 1)^2, 3)."""
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    # -- rendering --------------------------------------------------------------------------------

    def background_color(self, batch: int) -> torch.Tensor:
        """The configured background for ``batch`` views, (batch, 3): random ones only while training."""
        dev = self.means.device
        if self.config.background == "learned":
            return torch.sigmoid(self.background_logit).expand(batch, 3)
        if self.config.background == "random" and self.training:
            return torch.rand(batch, 3, device=dev)
        return torch.ones(batch, 3, device=dev)

    def render(self, cameras: Cameras, background: torch.Tensor | None = None) -> RenderOutput:
        """Render ``cameras``; ``background`` (3,) or (B, 3) overrides the configured one."""
        cams = cameras.to(self.means.device)
        B = len(cams)
        bg = self.background_color(B) if background is None else background.to(self.means).reshape(-1, 3).expand(B, 3)
        rgb, alpha, depth, meta = rasterize_gaussians(
            self.means, self.quats, self.scales, self.opacities, self.sh,
            cams.viewmat, cams.K, cams.width, cams.height,
            background=bg, sh_degree=self.config.sh_degree,
        )
        return RenderOutput(
            rgb=rgb.permute(0, 3, 1, 2), alpha=alpha.permute(0, 3, 1, 2), depth=depth.permute(0, 3, 1, 2), extras=meta
        )

    def param_groups(self, lr: dict[str, float] | None = None) -> list[dict]:
        """Groups means, scales, quats, opacities, colors, colors_rest (and background); ``lr`` overrides defaults."""
        cfg = self.config
        rates = {
            "means": cfg.lr_means,
            "scales": cfg.lr_scales,
            "quats": cfg.lr_quats,
            "opacities": cfg.lr_opacities,
            "colors": cfg.lr_colors,
            "colors_rest": cfg.lr_colors / 20.0,
            "background": cfg.lr_background,
        }
        rates.update(lr or {})
        groups = [{"name": name, "params": [getattr(self, attr)], "lr": rates[name]} for name, attr in _PARAMS.items()]
        if cfg.background == "learned":
            groups.append({"name": "background", "params": [self.background_logit], "lr": rates["background"]})
        return groups

    # -- adaptive density control -----------------------------------------------------------------

    def post_step(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> dict:
        """Accumulate screen-space gradients of ``out``'s render, then densify / prune / reset on schedule."""
        cfg = self.config
        stats: dict = {}
        if step < cfg.densify_until:
            self._accumulate(out.extras or {})
            if step >= cfg.densify_from and step % cfg.densify_every == 0:
                stats.update(self.densify_and_prune(optimizer))
            if cfg.opacity_reset_every > 0 and step > 0 and step % cfg.opacity_reset_every == 0:
                self.reset_opacity(optimizer)
                stats["opacity_reset"] = 1
        stats["num_gaussians"] = self.num_gaussians
        return stats

    def _reset_stats(self) -> None:
        n, dev = self.num_gaussians, self.means.device
        # Persistent: they decide the next densification, so a checkpoint must carry them (exact resume).
        self.register_buffer("grad2d_sum", torch.zeros(n, device=dev))
        self.register_buffer("grad2d_count", torch.zeros(n, device=dev))
        # largest splat radius seen, as a fraction of the image's larger side
        self.register_buffer("max_radius", torch.zeros(n, device=dev))

    def _accumulate(self, meta: dict) -> None:
        means2d = meta.get("means2d")
        if means2d is None or means2d.grad is None or means2d.shape[1] != self.num_gaussians:
            return
        B, W, H = meta["n_cameras"], meta["width"], meta["height"]
        g = means2d.grad.detach() * torch.tensor([W / 2.0 * B, H / 2.0 * B], device=means2d.device)  # pixels -> NDC
        visible = meta["radii"] > 0
        self.grad2d_sum += (g.norm(dim=-1) * visible).sum(0)
        self.grad2d_count += visible.sum(0)
        self.max_radius = torch.maximum(self.max_radius, (meta["radii"] / max(W, H)).amax(0).float())

    def densify_threshold(self, grads: torch.Tensor) -> float:
        """``grad_threshold``, or with ``grad_quantile`` that quantile of the mean gradients of the Gaussians seen
        since the last round (never below the smallest positive float: an unseen Gaussian is not densified)."""
        q = self.config.grad_quantile
        if q is None:
            return self.config.grad_threshold
        seen = grads[self.grad2d_count > 0]
        if not len(seen):
            return math.inf
        return max(float(torch.quantile(seen.float(), q)), torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def densify_and_prune(self, optimizer: torch.optim.Optimizer | None) -> dict:
        """One round of 3DGS density control from the accumulated gradients; returns counts."""
        cfg = self.config
        n_old = self.num_gaussians
        grads = self.grad2d_sum / self.grad2d_count.clamp_min(1)
        high = grads >= self.densify_threshold(grads)
        budget = max((cfg.max_points if cfg.max_points is not None else DEFAULT_MAX_POINTS) - n_old, 0)
        if int(high.sum()) > budget:
            top = torch.zeros_like(high)
            top[torch.topk(torch.where(high, grads, -1.0), budget).indices] = True
            high &= top
        scales = self.scales
        clone = high & (scales.amax(-1) <= cfg.clone_max_scale)
        split = high & ~clone
        n_clone, n_split = int(clone.sum()), int(split.sum())
        max_radius = self.max_radius

        # clones are exact copies; each split Gaussian gives two samples of itself, 1.6x smaller
        rows = {attr: [getattr(self, attr)[clone]] for attr in _PARAMS.values()}
        rot = quat_to_rotmat(self.quats[split])
        for _ in range(2):
            offset = rot @ (torch.randn(n_split, 3, 1, device=scales.device) * scales[split][..., None])
            for attr in _PARAMS.values():
                value = getattr(self, attr)[split]
                if attr == "means":
                    value = value + offset.squeeze(-1)
                elif attr == "log_scales":
                    value = value - math.log(1.6)
                rows[attr].append(value)
        self._append({attr: torch.cat(values) for attr, values in rows.items()}, optimizer)

        n_new = self.num_gaussians - n_old
        pad = torch.zeros(n_new, dtype=torch.bool, device=split.device)
        prune = (
            torch.cat([split, pad])
            | (self.opacities < cfg.prune_opacity)
            | (self.scales.amax(-1) > cfg.prune_scale)
            | torch.cat([max_radius > cfg.max_screen_size, pad])
        )
        n_pruned = int(prune.sum()) - n_split
        self.keep(~prune, optimizer)
        return {"cloned": n_clone, "split": n_split, "pruned": n_pruned}

    @torch.no_grad()
    def keep(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only the Gaussians where ``mask`` (N,) is true, with their optimizer moments."""
        for attr in _PARAMS.values():
            self._swap(optimizer, attr, getattr(self, attr)[mask], lambda s: s[mask])
        self._reset_stats()

    @torch.no_grad()
    def _append(self, rows: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        """Append Gaussians (``rows`` maps attribute to new rows); their optimizer moments start at zero."""
        for attr, new in rows.items():
            def grow(s: torch.Tensor, new: torch.Tensor = new) -> torch.Tensor:
                return torch.cat([s, s.new_zeros(new.shape)])

            self._swap(optimizer, attr, torch.cat([getattr(self, attr), new]), grow)
        self._reset_stats()

    @torch.no_grad()
    def reset_opacity(self, optimizer: torch.optim.Optimizer | None = None, value: float = 0.01) -> None:
        """Clamp every opacity to at most ``value`` and zero its optimizer moments (3DGS)."""
        capped = self.opacity_logits.clamp_max(math.log(value / (1.0 - value)))
        self._swap(optimizer, "opacity_logits", capped, torch.zeros_like)

    def _swap(
        self, optimizer: torch.optim.Optimizer | None, attr: str, value: torch.Tensor,
        state_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """Replace parameter ``attr`` by ``value``, in the module and in ``optimizer`` (moments via ``state_fn``)."""
        old = getattr(self, attr)
        new = nn.Parameter(value.detach().contiguous())
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            state = optimizer.state.pop(old, None)
            if state is not None:
                optimizer.state[new] = {
                    k: state_fn(v) if torch.is_tensor(v) and v.shape == old.shape else v for k, v in state.items()
                }
        setattr(self, attr, new)

    # -- persistence and export -------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, resizing the per-Gaussian parameters to the saved count first.

        An optimizer built before loading still holds the old tensors: build it afterwards.
        """
        for attr in _PARAMS.values():
            if attr in state_dict and state_dict[attr].shape != getattr(self, attr).shape:
                setattr(self, attr, nn.Parameter(torch.empty_like(state_dict[attr], device=self.means.device)))
        self._reset_stats()
        if _STATS[0] not in state_dict:  # a state saved without the densification statistics: start them afresh
            state_dict = {**state_dict, **{k: getattr(self, k) for k in _STATS}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def health(self) -> str | None:
        """Finite blow-ups: a centre beyond ``max_abs_mean`` or a Gaussian larger than ``max_scale``."""
        far = float(self.means.abs().max()) if self.num_gaussians else 0.0
        if far > self.config.max_abs_mean:
            return f"a Gaussian's centre moved {far:.3g} units from the origin (limit {self.config.max_abs_mean:g})"
        big = float(self.log_scales.max().exp()) if self.num_gaussians else 0.0
        if big > self.config.max_scale:
            return f"a Gaussian grew to {big:.3g} units across (limit {self.config.max_scale:g})"
        return None

    @torch.no_grad()
    def viewer_gaussians(self) -> dict[str, np.ndarray]:
        """float32 CPU copies for a live splat viewer (viser): ``means`` (N, 3), ``covariances`` (N, 3, 3)
        ``R diag(s^2) R^T``, ``rgbs`` (N, 3) the view-independent (degree-0) colour in [0, 1], ``opacities`` (N, 1)."""
        rgb = sh_to_rgb(self.sh_dc, torch.ones_like(self.means), 0).clamp_max(1.0)
        return {
            "means": _numpy(self.means),
            "covariances": _numpy(quat_scale_to_covar(self.quats, self.scales)),
            "rgbs": _numpy(rgb),
            "opacities": _numpy(self.opacities[:, None]),
        }

    def export_geometry(self, out: Path, size: int, camera: CameraRange) -> dict[str, str]:
        """``scene.ply`` in the reference 3DGS layout and ``scene.splat`` (the web format, with the training
        pixel's footprint added to each splat so that viewers show what the renders showed)."""
        from lods.export import run_pixel_variance, write_gaussians_ply, write_splat

        attrs = self.to_ply_attributes()
        write_gaussians_ply(out / "scene.ply", **attrs)
        write_splat(out / "scene.splat", **attrs, pixel_variance=run_pixel_variance(size, camera))
        return {"scene": "scene.ply", "splat": "scene.splat"}

    @torch.no_grad()
    def to_ply_attributes(self, sh_degree: int = 3) -> dict[str, np.ndarray]:
        """float32 arrays in the 3DGS .ply layout; concatenated in this order, the reference vertex columns.

        ``xyz`` (N, 3); ``normals`` (N, 3) zeros; ``f_dc`` (N, 3) degree-0 SH; ``f_rest`` (N, 3 * (K - 1))
        the other SH coefficients up to ``sh_degree`` (3 by default: 45 values, as the reference 3DGS
        code writes and most importers expect; coefficients above the scene's own degree are zeros),
        channel-major (all of red, then green, then blue); ``opacity`` (N, 1) logit; ``scale`` (N, 3)
        log; ``rotation`` (N, 4) unit quaternion wxyz.
        """
        n = self.num_gaussians
        rest = self.sh_rest.detach()
        k_rest = num_sh_bases(max(sh_degree, self.config.sh_degree)) - 1
        rest = torch.cat([rest, rest.new_zeros(n, k_rest - rest.shape[1], 3)], dim=1)
        return {
            "xyz": _numpy(self.means),
            "normals": np.zeros((n, 3), dtype=np.float32),
            "f_dc": _numpy(self.sh_dc.reshape(n, 3)),
            "f_rest": _numpy(rest.transpose(1, 2).reshape(n, -1)),
            "opacity": _numpy(self.opacity_logits[:, None]),
            "scale": _numpy(self.log_scales),
            "rotation": _numpy(self.quats / self.quats.norm(dim=-1, keepdim=True)),
        }

    @classmethod
    def from_ply_attributes(cls, attrs: dict[str, np.ndarray], config: GaussianConfig | None = None) -> GaussianScene:
        """The scene whose ``to_ply_attributes`` are ``attrs`` (e.g. ``lods.export.read_gaussians_ply``).

        The SH degree is the one the ``f_rest`` columns hold (``config.sh_degree`` is set to it)."""
        n = len(attrs["xyz"])
        k_rest = np.asarray(attrs["f_rest"]).reshape(n, -1).shape[1] // 3
        degree = {0: 0, 3: 1, 8: 2, 15: 3}.get(k_rest)
        if degree is None:
            raise ValueError(f"{k_rest * 3} f_rest values per Gaussian is not an SH degree of 0 to 3")
        base = config or GaussianConfig()
        cfg = GaussianConfig(**{**base.__dict__, "sh_degree": degree})
        scene = cls(cfg, points=torch.zeros(max(n, 1), 3))

        def t(name: str) -> torch.Tensor:
            return torch.as_tensor(np.asarray(attrs[name], np.float32)).reshape(n, -1)

        scene.load_state_dict({
            "means": t("xyz"),
            "log_scales": t("scale"),
            "quats": t("rotation"),
            "opacity_logits": t("opacity").reshape(n),
            "sh_dc": t("f_dc")[:, None, :],
            "sh_rest": t("f_rest").reshape(n, 3, k_rest).transpose(1, 2).contiguous(),
            **({"background_logit": scene.background_logit.detach()} if cfg.background == "learned" else {}),
        })
        return scene
