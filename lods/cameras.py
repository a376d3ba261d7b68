"""Random cameras around the object, and view-dependent prompt suffixes.

Conventions (shared by every renderer in the project, CPU and CUDA):

* world: y up, the object centred at the origin;
* camera: OpenCV convention, x right, y down, z forward (the direction the camera looks);
* ``viewmat`` is world-to-camera (4x4), ``c2w`` its inverse;
* intrinsics ``K`` in pixels, principal point at the image centre.

The sampling ranges follow DreamFusion / threestudio (azimuth all around, an elevation band,
a distance and a field-of-view range); the toy world draws its training views from the same
distribution so that the prior has seen every view the 3D trainer asks it about.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CameraRange:
    """Ranges of the random camera distribution (degrees and world units)."""

    azimuth: tuple[float, float] = (-180.0, 180.0)
    elevation: tuple[float, float] = (5.0, 40.0)
    distance: tuple[float, float] = (2.6, 3.1)
    fovy: tuple[float, float] = (40.0, 45.0)


@dataclass
class Cameras:
    """A batch of pinhole cameras. All tensors have a leading batch dimension."""

    c2w: torch.Tensor  # (B, 4, 4) camera-to-world, OpenCV axes
    fovy: torch.Tensor  # (B,) radians
    azimuth: torch.Tensor  # (B,) degrees
    elevation: torch.Tensor  # (B,) degrees
    distance: torch.Tensor  # (B,)
    width: int
    height: int

    @property
    def viewmat(self) -> torch.Tensor:
        """World-to-camera matrices (B, 4, 4)."""
        return torch.linalg.inv(self.c2w)

    @property
    def focal(self) -> torch.Tensor:
        """Focal length in pixels (B,)."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)

    @property
    def K(self) -> torch.Tensor:
        """Intrinsics (B, 3, 3)."""
        f = self.focal
        K = torch.zeros(len(f), 3, 3, dtype=f.dtype, device=f.device)
        K[:, 0, 0] = f
        K[:, 1, 1] = f
        K[:, 0, 2] = self.width / 2
        K[:, 1, 2] = self.height / 2
        K[:, 2, 2] = 1
        return K

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> Cameras:
        """The cameras at ``index`` (a slice or an index tensor)."""
        return Cameras(self.c2w[index], self.fovy[index], self.azimuth[index], self.elevation[index],
                       self.distance[index], self.width, self.height)

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(
            self.c2w.to(device),
            self.fovy.to(device),
            self.azimuth.to(device),
            self.elevation.to(device),
            self.distance.to(device),
            self.width,
            self.height,
        )

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions through pixel centres, each (B, H*W, 3)."""
        B, H, W = len(self), self.height, self.width
        dev, dt = self.c2w.device, self.c2w.dtype
        ys, xs = torch.meshgrid(
            torch.arange(H, device=dev, dtype=dt) + 0.5,
            torch.arange(W, device=dev, dtype=dt) + 0.5,
            indexing="ij",
        )
        f = self.focal.view(B, 1)
        d_cam = torch.stack(
            [
                (xs.reshape(1, -1) - W / 2) / f,
                (ys.reshape(1, -1) - H / 2) / f,
                torch.ones(B, H * W, device=dev, dtype=dt),
            ],
            dim=-1,
        )
        d = d_cam @ self.c2w[:, :3, :3].transpose(1, 2)
        d = d / d.norm(dim=-1, keepdim=True)
        o = self.c2w[:, None, :3, 3].expand_as(d)
        return o, d


def look_at(position: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4), OpenCV axes, looking from ``position`` (B, 3) at ``target``."""
    if target is None:
        target = torch.zeros_like(position)
    forward = target - position
    forward = forward / forward.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, up)
    right = right / right.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=position.dtype, device=position.device).repeat(len(position), 1, 1)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = down
    c2w[:, :3, 2] = forward
    c2w[:, :3, 3] = position
    return c2w


def orbit(
    azimuth: torch.Tensor,
    elevation: torch.Tensor,
    distance: torch.Tensor,
    fovy_deg: torch.Tensor,
    width: int,
    height: int,
) -> Cameras:
    """Cameras on a sphere around the origin. Azimuth 0 looks at the object's front (+z side)."""
    az, el = torch.deg2rad(azimuth), torch.deg2rad(elevation)
    pos = torch.stack(
        [distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el), distance * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )
    return Cameras(look_at(pos), torch.deg2rad(fovy_deg), azimuth, elevation, distance, width, height)


def sample_cameras(
    n: int,
    width: int,
    height: int | None = None,
    ranges: CameraRange | None = None,
    generator: torch.Generator | None = None,
) -> Cameras:
    """Draw ``n`` random cameras from ``ranges``."""
    r = ranges or CameraRange()

    def u(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    return orbit(u(r.azimuth), u(r.elevation), u(r.distance), u(r.fovy), width, height or width)


def turntable(
    n: int, width: int, height: int | None = None, elevation: float = 20.0, distance: float = 2.85, fovy: float = 42.5
) -> Cameras:
    """``n`` evenly spaced cameras all around the object, for grids and videos."""
    az = torch.arange(n, dtype=torch.float32) * (360.0 / n) - 180.0
    return orbit(
        az, torch.full((n,), elevation), torch.full((n,), distance), torch.full((n,), fovy), width, height or width
    )


def view_suffix(azimuth_deg: float, elevation_deg: float, overhead_above: float = 60.0) -> str:
    """DreamFusion's view-dependent prompt suffix for one camera: front, side, back or overhead."""
    if elevation_deg > overhead_above:
        return "overhead view"
    a = (azimuth_deg + 180.0) % 360.0 - 180.0
    if abs(a) < 45.0:
        return "front view"
    if abs(a) > 135.0:
        return "back view"
    return "side view"

