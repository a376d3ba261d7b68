"""Multiresolution hash-grid encoding (Instant-NGP, Mueller et al. 2022) in plain PyTorch.

Level ``l`` has a grid of resolution ``N_l = floor(base_resolution * per_level_scale ** l)`` over
the unit cube. A level whose ``(N_l + 1) ** 3`` vertices fit in its table is indexed densely; a
finer level maps its vertices into a table of ``2 ** log2_hashmap_size`` entries with Instant-NGP's
spatial hash (XOR of the coordinates times three primes, with 32-bit wrap-around). Each level
trilinearly interpolates the features of the 8 vertices around a point; the levels' features are
concatenated, level 0 first, into ``n_levels * n_features_per_level`` channels.

On CUDA, :func:`make_encoding` returns tinycudann's fused ``HashGrid`` when it is importable; this
module is the CPU implementation and the reference. tinycudann places its vertices slightly
differently, so parameters do not transfer between the two. Inputs are points in ``[0, 1]^3``
(clamped); no gradient flows back to the input positions, only to the feature tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Instant-NGP's hash primes (the hash keeps the low log2_hashmap_size bits, as with 32-bit arithmetic).
_PRIMES = (1, 2654435761, 805459861)


@dataclass
class HashGridConfig:
    """Hash-grid hyper-parameters (tinycudann's names).

    The defaults are sized for CPU training at 64-128 px: 8 levels from 16 to 153 cells per side,
    2^17 entries per level, 1.3M parameters. The LODS NeRF runs (threestudio's Instant-NGP field)
    used 16 levels, 2^19 entries and per_level_scale 1.447 (finest 4095).
    """

    n_levels: int = 8
    n_features_per_level: int = 2
    log2_hashmap_size: int = 17
    base_resolution: int = 16
    per_level_scale: float = 1.381912879967776  # 2048 at level 15 (Instant-NGP's default growth)

    @property
    def n_output_dims(self) -> int:
        return self.n_levels * self.n_features_per_level

    def resolutions(self) -> list[int]:
        """Grid resolution of every level, coarse to fine."""
        return [math.floor(self.base_resolution * self.per_level_scale**level) for level in range(self.n_levels)]

    def tcnn_config(self) -> dict:
        """The ``encoding_config`` dictionary tinycudann expects."""
        return {
            "otype": "HashGrid",
            "n_levels": self.n_levels,
            "n_features_per_level": self.n_features_per_level,
            "log2_hashmap_size": self.log2_hashmap_size,
            "base_resolution": self.base_resolution,
            "per_level_scale": self.per_level_scale,
        }


class _InterpolateTable(torch.autograd.Function):
    """``out[f, l, n] = sum_c w[l, c, n] * table[f, idx[l, c, n]]`` with a scatter-add backward for the table."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n_feat = table.shape[0]
        corners = table.index_select(1, idx.view(-1)).view(n_feat, *w.shape)
        ctx.save_for_backward(idx, w)
        ctx.table_size = table.shape[1]
        return (corners * w).sum(2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        idx, w = ctx.saved_tensors
        src = (grad_out.unsqueeze(2) * w).reshape(grad_out.shape[0], -1)
        grad_table = torch.zeros(grad_out.shape[0], ctx.table_size, dtype=grad_out.dtype, device=grad_out.device)
        grad_table.index_add_(1, idx.view(-1), src)
        return grad_table, None, None


class HashGrid(torch.nn.Module):
    """The PyTorch hash-grid encoding: ``forward(x (N, 3) in [0, 1]) -> (N, n_levels * n_features_per_level)``.

    Tensors are laid out with the points last, ``(levels, corners, points)``, so that every
    elementwise step runs over contiguous memory; that layout is what makes it usable on CPU.
    All levels share one table: the dense levels first, then the hashed ones, each hashed level
    starting at a multiple of its size so that adding its offset is a bitwise OR.
    """

    def __init__(self, config: HashGridConfig, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.n_output_dims = config.n_output_dims
        hashmap_size = 2**config.log2_hashmap_size
        res = config.resolutions()
        if any(b < a for a, b in zip(res, res[1:])):
            raise ValueError("per_level_scale must be at least 1")
        dense = [r for r in res if (r + 1) ** 3 <= hashmap_size]
        self.n_dense = len(dense)
        r = torch.tensor(dense, dtype=torch.int64)
        strides = torch.stack([torch.ones_like(r), r + 1, (r + 1) ** 2])  # (3, n_dense)
        starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), (r + 1) ** 3]), 0)
        bits = torch.tensor([[(c >> d) & 1 for d in range(3)] for c in range(8)])  # corner c -> (dx, dy, dz)
        dense_size = int(starts[-1])
        hashed_start = -(-dense_size // hashmap_size) * hashmap_size
        n_hashed = len(res) - self.n_dense
        hashed_offsets = hashed_start + hashmap_size * torch.arange(n_hashed, dtype=torch.int64)
        self.hash_mask = hashmap_size - 1
        self.register_buffer("resolution", torch.tensor(res, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("dense_strides", strides.to(device), persistent=False)
        # Table index of corner c relative to the level's base vertex, level offset included: (n_dense, 8).
        self.register_buffer("dense_corners", (starts[:-1, None] + (bits @ strides).T).to(device), persistent=False)
        self.register_buffer("primes", torch.tensor(_PRIMES, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("hashed_offsets", hashed_offsets.to(device), persistent=False)
        # Instant-NGP's initialisation: features uniform in [-1e-4, 1e-4].
        size = hashed_start + hashmap_size * n_hashed if n_hashed else dense_size
        self.table = torch.nn.Parameter(
            torch.empty(config.n_features_per_level, size, device=device).uniform_(-1e-4, 1e-4)
        )

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table indices and trilinear weights of the 8 vertices around each point, each (L, 8, N).

        Corner ``c`` is the vertex offset by bit ``d`` of ``c`` along axis ``d``.
        """
        n, k = x.shape[0], self.n_dense
        levels = self.resolution.shape[0]
        res = self.resolution[:, None]
        p = x.detach().clamp(0.0, 1.0).T.unsqueeze(1) * res  # (3, L, N)
        p0 = torch.minimum(p.floor(), res - 1)
        frac = p - p0
        w01 = torch.stack([1 - frac, frac], 2)  # (3, L, 2, N)
        w = ((w01[2][:, :, None] * w01[1][:, None])[:, :, :, None] * w01[0][:, None, None]).view(levels, 8, n)
        vertex = p0.long()
        idx = torch.empty(levels, 8, n, dtype=torch.int64, device=x.device)
        if k > 0:
            base = (vertex[:, :k] * self.dense_strides[:, :, None]).sum(0)  # (k, N)
            torch.add(base[:, None], self.dense_corners[:, :, None], out=idx[:k])
        if k < levels:
            primes = self.primes[:, None, None]
            h = vertex[:, k:] * primes
            h01 = torch.stack([h, h + primes], 2) & self.hash_mask  # (3, L - k, 2, N)
            h01[0] |= self.hashed_offsets[:, None, None]
            xy = h01[2][:, :, None] ^ h01[1][:, None]
            torch.bitwise_xor(xy[:, :, :, None], h01[0][:, None, None], out=idx[k:].view(levels - k, 2, 2, 2, n))
        return idx, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.n_output_dims)
        idx, w = self.corners(x)
        out = _InterpolateTable.apply(self.table, idx, w)  # (F, L, N)
        return out.permute(2, 1, 0).reshape(x.shape[0], self.n_output_dims)


def tinycudann_available() -> bool:
    """True when tinycudann imports (it needs CUDA)."""
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return True


class _TcnnEncoding(torch.nn.Module):
    """tinycudann's fused hash grid, with float32 output and the same interface as :class:`HashGrid`."""

    def __init__(self, config: HashGridConfig):
        super().__init__()
        import tinycudann as tcnn

        self.config = config
        self.n_output_dims = config.n_output_dims
        self.encoding = tcnn.Encoding(3, config.tcnn_config(), dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, self.n_output_dims)
        return self.encoding(x.clamp(0.0, 1.0)).float()


def make_encoding(config: HashGridConfig, device: torch.device | str) -> torch.nn.Module:
    """tinycudann's encoding on a CUDA device when it imports, else :class:`HashGrid`; same output width."""
    if torch.device(device).type == "cuda" and tinycudann_available():
        return _TcnnEncoding(config).to(device)
    return HashGrid(config, device)
