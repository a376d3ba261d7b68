"""Differentiable rasterization of 3D Gaussians (3DGS), one entry point for every device.

``rasterize_gaussians`` renders a batch of cameras. On CUDA it calls ``gsplat.rasterization``; on
any other device it runs the project's own PyTorch rasterizer, which follows gsplat's conventions
exactly so that it is also the reference the CUDA path is tested against:

* projection: EWA splatting, ``Sigma2D = J W Sigma W^T J^T + eps2d * I`` with the Jacobian's
  view-space x/y clamped to 1.3x the half field of view, pixel centres at ``(i + 0.5, j + 0.5)``;
* culling: a Gaussian is dropped when its camera-space z lies outside ``[near, far]``, when its
  projected covariance is degenerate, or when its opacity is below ``ALPHA_THRESHOLD``;
* compositing: ``alpha = min(ALPHA_MAX, opacity * exp(-0.5 d^T Sigma2D^-1 d))``; pairs with
  ``alpha < ALPHA_THRESHOLD`` are skipped; front-to-back in camera-space z; a pixel stops at the
  Gaussian that would bring its transmittance to ``T_MIN`` or below (that one is excluded);
* colours: either per-Gaussian values or spherical-harmonic coefficients evaluated with the view
  direction from the camera centre to the Gaussian (``sh_to_rgb``: 3DGS's basis, +0.5, clamped at 0).

The CPU rasterizer is sparse. Each Gaussian is paired only with the pixels whose centres lie in
the ellipse where its alpha can reach ``ALPHA_THRESHOLD`` (``sqrt(2 ln(opacity / ALPHA_THRESHOLD))``
standard deviations, 3.33 at opacity 1), enumerated row by row of its bounding box; the pairs are
sorted by pixel, then front to back; the transmittance is an exclusive cumulative sum of
``log(1 - alpha)`` within each pixel (in float64); and the per-pixel sums, like the gradients of the
per-pair gathers, are products with 0/1 sparse CSR matrices. The dense compositor (every Gaussian
at every pixel, ``backend="dense"``) gives the same results and is the reference in tests.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

ALPHA_THRESHOLD = 1.0 / 255.0  # smallest alpha a pair contributes with (gsplat and 3DGS)
ALPHA_MAX = 0.999  # alpha of one Gaussian at one pixel is clamped to this (gsplat's value)
T_MIN = 1e-4  # a pixel is saturated once its transmittance would reach this
SH_C0 = 0.28209479177387814  # degree-0 real spherical harmonic, 1 / (2 sqrt(pi))

Backend = Literal["auto", "gsplat", "sparse", "dense"]


# ---------------------------------------------------------------------------------------------
# Spherical harmonics (3DGS convention)
# ---------------------------------------------------------------------------------------------


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per channel up to ``degree``: (degree + 1)^2."""
    return (degree + 1) ** 2


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Real spherical-harmonic basis up to ``degree`` (0..3) at unit directions ``dirs`` (..., 3).

    Returns (..., (degree + 1)^2) in 3DGS's order and sign convention (the same as gsplat's).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh degree must be in 0..3, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        c1 = 0.4886025119029199
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.31539156525252005 * (2.0 * zz - xx - yy),
            -1.0925484305920792 * x * z,
            0.5462742152960395 * (xx - yy),
        ]
    if degree >= 3:
        out += [
            -0.5900435899266435 * y * (3.0 * xx - yy),
            2.890611442640554 * x * y * z,
            -0.4570457994644658 * y * (4.0 * zz - xx - yy),
            0.3731763325901154 * z * (2.0 * zz - 3.0 * xx - 3.0 * yy),
            -0.4570457994644658 * x * (4.0 * zz - xx - yy),
            1.445305721320277 * z * (xx - yy),
            -0.5900435899266435 * x * (xx - 3.0 * yy),
        ]
    return torch.stack(out, dim=-1)


def sh_to_rgb(coeffs: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Colours from SH coefficients ``coeffs`` (..., K, D) seen along ``dirs`` (..., 3).

    ``rgb = max(sum_k basis_k(dir) * coeffs_k + 0.5, 0)`` with bases up to ``degree`` (K may hold
    more bands than are used). ``dirs`` need not be normalized.
    """
    n = num_sh_bases(degree)
    if coeffs.shape[-2] < n:
        raise ValueError(f"sh degree {degree} needs {n} coefficients per channel, got {coeffs.shape[-2]}")
    unit = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    basis = sh_basis(degree, unit)
    return ((basis.unsqueeze(-1) * coeffs[..., :n, :]).sum(-2) + 0.5).clamp_min(0.0)


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """The degree-0 coefficient that ``sh_to_rgb`` maps to ``rgb`` (inverse of the 0.5 offset)."""
    return (rgb - 0.5) / SH_C0


# ---------------------------------------------------------------------------------------------
# Projection (EWA splatting)
# ---------------------------------------------------------------------------------------------


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from quaternions (..., 4) in wxyz order (normalized here)."""
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def quat_scale_to_covar(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """3D covariances R diag(scales^2) R^T (..., 3, 3) from wxyz quaternions and (linear) scales."""
    m = quat_to_rotmat(quats) * scales.unsqueeze(-2)
    return m @ m.transpose(-1, -2)


def _project(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    near: float,
    far: float,
    eps2d: float,
) -> dict[str, torch.Tensor]:
    """Project N Gaussians into B cameras.

    Returns (all with leading (B, N)): ``means2d`` (2) in pixels, ``depths`` camera-space z,
    ``conics`` (3) the upper triangle (a, b, c) of Sigma2D^-1, ``cov_diag`` (2) the diagonal of
    Sigma2D, ``opacities`` and ``valid`` (bool).
    """
    R, t = viewmats[:, None, :3, :3], viewmats[:, None, :3, 3]  # (B, 1, 3, 3), (B, 1, 3)
    p = (R @ means[None, :, :, None]).squeeze(-1) + t  # (B, N, 3)
    x, y, z = p.unbind(-1)
    valid = (z >= near) & (z <= far)
    z_safe = torch.where(valid, z, torch.ones_like(z))  # keeps culled entries finite in backward
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]

    lim_x_pos = (width - cx) / fx + 0.15 * width / fx
    lim_x_neg = cx / fx + 0.15 * width / fx
    lim_y_pos = (height - cy) / fy + 0.15 * height / fy
    lim_y_neg = cy / fy + 0.15 * height / fy
    u = torch.maximum(torch.minimum(x / z_safe, lim_x_pos), -lim_x_neg)
    v = torch.maximum(torch.minimum(y / z_safe, lim_y_pos), -lim_y_neg)
    zero = torch.zeros_like(z)
    J = torch.stack(
        [fx / z_safe, zero, -fx * u / z_safe, zero, fy / z_safe, -fy * v / z_safe], dim=-1
    ).unflatten(-1, (2, 3))  # (B, N, 2, 3)
    M = quat_to_rotmat(quats) * scales.unsqueeze(-2)  # (N, 3, 3): Sigma = M M^T
    A = J @ R @ M  # (B, N, 2, 3): Sigma2D = A A^T
    a = (A[..., 0, :] ** 2).sum(-1) + eps2d
    b = (A[..., 0, :] * A[..., 1, :]).sum(-1)
    c = (A[..., 1, :] ** 2).sum(-1) + eps2d
    det = a * c - b * b
    valid = valid & (det > 0) & (opacities[None] >= ALPHA_THRESHOLD)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c, -b, a], dim=-1) / det_safe[..., None]
    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)
    return {
        "means2d": means2d,
        "depths": z,
        "conics": conics,
        "cov_diag": torch.stack([a, c], dim=-1),
        "opacities": opacities[None].expand_as(z),
        "valid": valid,
    }


def _extent(opacities: torch.Tensor) -> torch.Tensor:
    """Standard deviations within which ``opacity * exp(-0.5 q) >= ALPHA_THRESHOLD`` (opacity-aware box)."""
    return torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))


def _radii(proj: dict[str, torch.Tensor], width: int, height: int) -> torch.Tensor:
    """Integer pixel radius (B, N) of each projected Gaussian's box; 0 when culled or off-screen."""
    with torch.no_grad():
        ext = _extent(proj["opacities"])
        r = torch.ceil(ext[..., None] * proj["cov_diag"].sqrt())  # (B, N, 2)
        m = proj["means2d"]
        on = (
            proj["valid"]
            & (m[..., 0] + r[..., 0] > 0) & (m[..., 0] - r[..., 0] < width)
            & (m[..., 1] + r[..., 1] > 0) & (m[..., 1] - r[..., 1] < height)
        )
        return torch.where(on, r.amax(-1), torch.zeros_like(r[..., 0])).long()


# ---------------------------------------------------------------------------------------------
# Compositing: sparse (the CPU backend) and dense (the reference)
# ---------------------------------------------------------------------------------------------


def _pair_alpha(
    mx: torch.Tensor, my: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, o: torch.Tensor,
    px: torch.Tensor, py: torch.Tensor,
) -> torch.Tensor:
    """Unclamped alpha ``o * exp(-0.5 d^T [[a, b], [b, c]] d)`` with ``d = (px - mx, py - my)``.

    The one formula used by both compositors and the pair binning, so that they agree bit for bit
    on which pairs pass ``ALPHA_THRESHOLD``.
    """
    dx, dy = px - mx, py - my
    return o * torch.exp(-0.5 * (a * dx * dx + 2.0 * b * dx * dy + c * dy * dy))


def _csr(row_counts: torch.Tensor, cols: torch.Tensor, num_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 sparse CSR matrix with ``row_counts[i]`` ones in row i, at columns ``cols`` (row-major order)."""
    crow = torch.cat([row_counts.new_zeros(1), torch.cumsum(row_counts, 0)]).to(cols.dtype)
    ones = torch.ones(len(cols), dtype=dtype, device=cols.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, ones, (len(row_counts), num_cols), check_invariants=False)


class _GatherRows(torch.autograd.Function):
    """``x[index]``; the backward sums gradient rows with a precomputed CSR matrix ``scatter``
    (``scatter[i, j] = 1`` where ``index[j] == i``), far faster on CPU than ``index_add``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        ctx.scatter = scatter
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.scatter @ grad.contiguous(), None, None


class _SegmentSum(torch.autograd.Function):
    """Row sums of ``x`` per segment with the CSR matrix ``segments`` (one row per segment);
    ``segment[j]`` is the segment of row j, used by the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, segments: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        ctx.segment = segment
        return segments @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.index_select(0, ctx.segment), None, None


@dataclass
class _Pairs:
    """(gaussian, pixel) pairs sorted by pixel, then front to back; all index tensors, no grad."""

    order: torch.Tensor  # (B*N,) flat (camera, gaussian) ids sorted front to back within each camera
    src: torch.Tensor  # (P,) position of each pair's Gaussian in ``order``
    pix: torch.Tensor  # (P,) flat pixel id in (B*H*W)
    xy: torch.Tensor  # (P, 2) pixel centre
    start: torch.Tensor  # (P,) index of the first pair of the same pixel
    gather_t: torch.Tensor  # CSR (B*N, P): ones at (src[j], j)
    segments: torch.Tensor  # CSR (B*H*W, P): ones at (pix[j], j)


def _bin_pairs(proj: dict[str, torch.Tensor], width: int, height: int) -> _Pairs:
    """Pairs of each Gaussian with the pixels whose centres lie inside its ellipse ``alpha >= ALPHA_THRESHOLD``.

    Per Gaussian the box rows are enumerated, and per row only the chord of the ellipse (widened
    by a thousandth of a pixel against rounding; the compositor applies the exact threshold).
    """
    B, N = proj["depths"].shape
    dev, f64 = proj["depths"].device, torch.float64
    eps = 1e-3
    with torch.no_grad():
        order = (torch.argsort(proj["depths"], dim=1) + torch.arange(B, device=dev)[:, None] * N).flatten()
        m = proj["means2d"].flatten(0, 1).index_select(0, order).to(f64)
        conic = proj["conics"].flatten(0, 1).index_select(0, order).to(f64)
        k2 = (2.0 * torch.log(proj["opacities"].flatten().index_select(0, order) / ALPHA_THRESHOLD)).to(f64)
        cov_yy = proj["cov_diag"][..., 1].flatten().index_select(0, order).to(f64)
        valid = proj["valid"].flatten().index_select(0, order)

        # rows of each Gaussian's box, front to back
        half_h = torch.sqrt(k2.clamp_min(0) * cov_yy)
        y0 = torch.ceil(m[:, 1] - half_h - 0.5 - eps).clamp_min(0)
        y1 = torch.floor(m[:, 1] + half_h - 0.5 + eps).clamp_max(height - 1)
        rows_ok = valid & torch.isfinite(y0) & torch.isfinite(y1)  # NaN would turn into a negative count
        ny = torch.where(rows_ok, (y1 - y0 + 1).clamp_min(0), torch.zeros_like(y0)).long()
        row_g = torch.repeat_interleave(ny)
        first_row = (torch.cumsum(ny, 0) - ny).index_select(0, row_g)
        mx, my, a, b, c, kk, top = (
            torch.stack([m[:, 0], m[:, 1], *conic.unbind(-1), k2, y0], dim=-1).index_select(0, row_g).unbind(-1)
        )
        row_y = top + (torch.arange(len(row_g), device=dev) - first_row)

        # the chord of the ellipse q(dx, dy) <= k2 on each row
        dy = row_y + 0.5 - my
        disc = (b * dy) ** 2 - a * (c * dy * dy - kk)
        root = torch.sqrt(disc.clamp_min(0))
        x0 = torch.ceil(mx + (-b * dy - root) / a - 0.5 - eps).clamp_min(0)
        x1 = torch.floor(mx + (-b * dy + root) / a - 0.5 + eps).clamp_max(width - 1)
        chord_ok = (disc >= 0) & torch.isfinite(x0) & torch.isfinite(x1)
        nx = torch.where(chord_ok, (x1 - x0 + 1).clamp_min(0), torch.zeros_like(x0)).long()

        # pixels of each row: row attributes minus the row's first pair index, plus the pair index
        pair_row = torch.repeat_interleave(nx)
        num_pairs, num_pix = len(pair_row), B * height * width
        index_dtype = torch.int32 if max(num_pairs, num_pix, B * N) < 2**31 else torch.int64
        row_start = torch.cumsum(nx, 0) - nx
        cam = torch.div(row_g, N, rounding_mode="floor")
        y, x0 = row_y.long(), x0.long()
        rows = torch.stack([row_g, cam * (height * width) + y * width + x0 - row_start, x0 - row_start, y], dim=-1)
        src, pix, x, y = rows.to(index_dtype).index_select(0, pair_row).unbind(-1)
        ar = torch.arange(num_pairs, device=dev, dtype=index_dtype)
        pix, perm = torch.sort(pix + ar, stable=True)
        src, x, y = torch.stack([src, x + ar, y], dim=-1).index_select(0, perm).unbind(-1)
        inverse = torch.empty_like(ar).scatter_(0, perm, ar)
        per_gaussian = torch.zeros(B * N, dtype=torch.int64, device=dev).index_add_(0, row_g, nx)
        counts = torch.bincount(pix, minlength=num_pix)
        dtype = proj["means2d"].dtype
        return _Pairs(
            order=order,
            src=src,
            pix=pix,
            xy=torch.stack([x, y], dim=-1).to(dtype) + 0.5,
            start=(torch.cumsum(counts, 0) - counts).index_select(0, pix),
            gather_t=_csr(per_gaussian, inverse, len(perm), dtype),
            segments=_csr(counts, ar, len(pix), dtype),
        )


def _composite_sparse(
    proj: dict[str, torch.Tensor], colors: torch.Tensor, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sparse compositor. ``colors`` (B, N, D). Returns colour (B, H, W, D), alpha and depth (B, H, W, 1), pairs."""
    B, N = proj["depths"].shape
    D = colors.shape[-1]
    pairs = _bin_pairs(proj, width, height)

    packed = torch.cat(
        [proj["means2d"], proj["conics"], proj["opacities"][..., None], proj["depths"][..., None], colors], dim=-1
    ).flatten(0, 1)  # (B*N, 7 + D)
    g = _GatherRows.apply(packed.index_select(0, pairs.order), pairs.src, pairs.gather_t)
    *gauss, feats = g.split([1] * 7 + [D], dim=1)
    mx, my, a, b, c, o, z = (t.squeeze(1) for t in gauss)
    raw = _pair_alpha(mx, my, a, b, c, o, pairs.xy[:, 0], pairs.xy[:, 1])
    hit = raw >= ALPHA_THRESHOLD
    alpha = torch.where(hit, raw.clamp_max(ALPHA_MAX), torch.zeros_like(raw))

    # transmittance before each pair: exclusive cumulative sum of log(1 - alpha) within its pixel
    log_t = torch.log1p(-alpha).double()
    incl = torch.cumsum(log_t, 0)
    excl = incl - log_t
    base = excl.index_select(0, pairs.start)
    with torch.no_grad():
        alive = (incl - base) > math.log(T_MIN)
    weight = alpha * torch.exp(excl - base).to(alpha.dtype) * alive

    vals = torch.cat([feats, torch.ones_like(z)[:, None], z[:, None]], dim=-1) * weight[:, None]
    out = _SegmentSum.apply(vals, pairs.segments, pairs.pix).view(B, height, width, D + 2)
    return out[..., :D], out[..., D : D + 1], out[..., D + 1 :], int(hit.sum())


def _composite_dense(
    proj: dict[str, torch.Tensor], colors: torch.Tensor, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Dense reference compositor: every Gaussian at every pixel, (B, H*W, N) tensors. Same outputs as sparse."""
    B, N = proj["depths"].shape
    order = torch.argsort(proj["depths"].detach(), dim=1)

    def take(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 1, order.view(B, N, *[1] * (x.dim() - 2)).expand_as(x))

    m, con, op, z, col, valid = (
        take(proj["means2d"]), take(proj["conics"]), take(proj["opacities"]),
        take(proj["depths"]), take(colors), take(proj["valid"]),
    )
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=m.dtype, device=m.device) + 0.5,
        torch.arange(width, dtype=m.dtype, device=m.device) + 0.5,
        indexing="ij",
    )
    raw = _pair_alpha(
        m[:, None, :, 0], m[:, None, :, 1], con[:, None, :, 0], con[:, None, :, 1], con[:, None, :, 2],
        op[:, None, :], xs.reshape(1, -1, 1), ys.reshape(1, -1, 1),
    )  # (B, HW, N)
    hit = (raw >= ALPHA_THRESHOLD) & valid[:, None, :]
    alpha = torch.where(hit, raw.clamp_max(ALPHA_MAX), torch.zeros_like(raw))
    log_t = torch.log1p(-alpha).double()
    incl = torch.cumsum(log_t, dim=-1)
    with torch.no_grad():
        alive = incl > math.log(T_MIN)
    weight = alpha * torch.exp(incl - log_t).to(alpha.dtype) * alive  # (B, HW, N)
    rgb = weight @ col
    acc = weight.sum(-1, keepdim=True)
    depth = weight @ z[..., None]
    shape = (B, height, width, -1)
    return rgb.view(shape), acc.view(shape), depth.view(shape), int(hit.sum())


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


GSPLAT_DEVICES = ("cuda",)  # where gsplat's kernels run (a stand-in gsplat in the tests adds "cpu")


@functools.cache
def _gsplat_installed() -> bool:
    return importlib.util.find_spec("gsplat") is not None


def default_backend(device: torch.device | str) -> str:
    """The backend "auto" picks for tensors on ``device``: "gsplat" on CUDA when installed, else "sparse"."""
    return "gsplat" if torch.device(device).type == "cuda" and _gsplat_installed() else "sparse"


def rasterize_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None = None,
    near: float = 0.01,
    far: float = 1e10,
    sh_degree: int | None = None,
    eps2d: float = 0.3,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Render N 3D Gaussians into B pinhole cameras (front-to-back alpha compositing, 3DGS).

    Conventions follow ``lods.cameras``: OpenCV camera axes (x right, y down, z forward), ``viewmats``
    world-to-camera, intrinsics in pixels, pixel (i, j) centred at (i + 0.5, j + 0.5).

    Every output is differentiable with respect to ``means``, ``quats``, ``scales``, ``opacities``
    and ``colors`` (not the cameras' intrinsics). Culling, thresholds and clamps are gsplat's (see
    the module docstring), so the backends agree up to float rounding.

    Args:
        means: Gaussian centres in world space, (N, 3).
        quats: Rotations as quaternions in wxyz order, (N, 4); normalized here, need not be unit.
        scales: Standard deviations along the Gaussian's local axes (linear, not log), (N, 3).
        opacities: Peak opacities in [0, 1] (after the sigmoid), (N,).
        colors: Without ``sh_degree``: per-Gaussian features (N, D), or per camera (B, N, D);
            with ``sh_degree``: SH coefficients (N, K, D), K >= (sh_degree + 1)^2, evaluated per
            camera with the direction from the camera centre to the Gaussian (``sh_to_rgb``).
        viewmats: World-to-camera matrices, (B, 4, 4).
        Ks: Intrinsics, (B, 3, 3).
        width: Image width in pixels.
        height: Image height in pixels.
        background: Colour (B, D) composited behind the Gaussians, ``rgb + (1 - alpha) * background``;
            None leaves the colour premultiplied (black background).
        near: Gaussians with camera-space z below this are culled.
        far: Gaussians with camera-space z above this are culled.
        sh_degree: Degree 0..3 of the spherical harmonics in ``colors``, or None for plain colours.
        eps2d: Added to the diagonal of each projected 2D covariance (3DGS's 0.3 pixel^2 low-pass
            dilation, so that no splat is thinner than about a pixel).
        backend: "auto" (``default_backend``: gsplat for CUDA tensors when it is installed, else
            "sparse"), "gsplat" (CUDA only), "sparse" (this module's PyTorch rasterizer, any
            device) or "dense" (the reference compositor: every Gaussian at every pixel; memory
            grows as B * H * W * N).

    Returns:
        rgb: (B, H, W, D) colours, composited over ``background`` if given.
        alpha: (B, H, W, 1) accumulated opacity, in [0, 1].
        depth: (B, H, W, 1) accumulated camera-space z, ``sum_i w_i z_i`` (not divided by alpha;
            divide by alpha for the expected depth of the visible surface).
        meta: dict with ``means2d`` (B, N, 2) projected centres in pixels (``retain_grad`` is
            called on it when it requires grad, so its ``.grad`` after backward gives the
            view-space positional gradient used by 3DGS densification), ``radii`` (B, N) integer
            box radius in pixels (0: culled or off-screen), ``depths`` (B, N) camera-space z,
            ``width``, ``height``, ``n_cameras``, ``backend`` (the one used) and ``num_pairs``
            (Gaussian-pixel pairs composited; gsplat: number of tile intersections).
    """
    if backend == "auto":
        backend = default_backend(means.device)
    if backend not in ("gsplat", "sparse", "dense"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'gsplat', 'sparse' or 'dense'")
    N, B = means.shape[0], viewmats.shape[0]
    expected = {
        "means": (means, (N, 3)), "quats": (quats, (N, 4)), "scales": (scales, (N, 3)),
        "opacities": (opacities, (N,)), "viewmats": (viewmats, (B, 4, 4)), "Ks": (Ks, (B, 3, 3)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if sh_degree is not None:
        colors_ok = colors.dim() == 3 and colors.shape[0] == N
    else:
        colors_ok = (colors.dim() == 2 and colors.shape[0] == N) or (colors.dim() == 3 and colors.shape[:2] == (B, N))
    if not colors_ok:
        raise ValueError(f"colors must be (N, D), (B, N, D) or, with sh_degree, (N, K, D); got {tuple(colors.shape)}")
    if background is not None and background.shape != (B, colors.shape[-1]):
        raise ValueError(f"background must be (B, D) = ({B}, {colors.shape[-1]}), got {tuple(background.shape)}")

    if backend == "gsplat":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            background, near, far, sh_degree, eps2d,
        )

    proj = _project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d)
    if sh_degree is not None:
        campos = -(viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:]).squeeze(-1)  # (B, 3)
        feats = sh_to_rgb(colors[None], means[None] - campos[:, None], sh_degree)  # (B, N, D)
    else:
        feats = colors.expand(B, N, colors.shape[-1])
    if proj["means2d"].requires_grad:
        proj["means2d"].retain_grad()
    composite = _composite_sparse if backend == "sparse" else _composite_dense
    rgb, alpha, depth, num_pairs = composite(proj, feats, width, height)
    if background is not None:
        rgb = rgb + (1.0 - alpha) * background[:, None, None, :]
    meta = {
        "means2d": proj["means2d"],
        "radii": _radii(proj, width, height),
        "depths": proj["depths"],
        "width": width,
        "height": height,
        "n_cameras": B,
        "backend": backend,
        "num_pairs": num_pairs,
    }
    return rgb, alpha, depth, meta


def _rasterize_gsplat(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    background: torch.Tensor | None,
    near: float,
    far: float,
    sh_degree: int | None,
    eps2d: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The CUDA backend: ``gsplat.rasterization`` with accumulated depth ("RGB+D"), unpacked meta."""
    if means.device.type not in GSPLAT_DEVICES:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='sparse' on this device")
    import gsplat

    out, alpha, info = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near, far_plane=far, eps2d=eps2d, sh_degree=sh_degree,
        packed=False, render_mode="RGB+D", rasterize_mode="classic",
    )
    rgb, depth = out[..., :-1], out[..., -1:]
    if background is not None:
        rgb = rgb + (1.0 - alpha) * background[:, None, None, :]
    radii = info["radii"]
    if radii.dim() == 3:  # gsplat >= 1.5 gives (B, N, 2)
        radii = radii.amax(-1)
    meta = {
        "means2d": info["means2d"],
        "radii": radii.long(),
        "depths": info["depths"],
        "width": width,
        "height": height,
        "n_cameras": viewmats.shape[0],
        "backend": "gsplat",
        "num_pairs": int(info["flatten_ids"].numel()) if "flatten_ids" in info else 0,
    }
    if meta["means2d"].requires_grad:
        meta["means2d"].retain_grad()
    return rgb, alpha, depth, meta
