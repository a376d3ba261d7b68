"""The toy world: a procedural scene generator with a known ground truth.

Primitives (cube, sphere, cylinder, cone, torus, capsule) in eight named colours of moderate
saturation, plain, striped or checked, alone, on a ground (a checkered floor or grass), or in
pairs, seen from the same random cameras the 3D trainer samples, on a white background.
Rendering is batched sphere tracing of signed distance functions in PyTorch (CPU is fine).

Every scene comes with its caption (from a small grammar) and its labels, so that a judge can be
trained on it and generated images can be compared with the world's own renders.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lods.cameras import CameraRange, Cameras, sample_cameras

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "capsule")
# Moderate saturation (HSV S about 0.5-0.65), so that guidance has room to push colours either way.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.32, 0.28),
    "orange": (0.86, 0.56, 0.26),
    "yellow": (0.86, 0.78, 0.32),
    "green": (0.36, 0.66, 0.34),
    "cyan": (0.30, 0.70, 0.76),
    "blue": (0.30, 0.42, 0.82),
    "purple": (0.56, 0.36, 0.74),
    "pink": (0.88, 0.52, 0.68),
}
COLOR_NAMES = tuple(COLORS)
GROUNDS = ("checkered floor", "grass")
CATEGORIES = ("single", "surroundings", "multi")
# Colour-shape combinations never shown to the diffusion model, to measure generalisation.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("orange", "torus"),
        ("blue", "cone"),
        ("green", "cube"),
        ("yellow", "cylinder"),
        ("purple", "sphere"),
        ("pink", "capsule"),
    }
)
COMBOS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)  # the judge's 48 labels
BACKGROUND = 1.0
GROUND_Y = -0.5


@dataclass(frozen=True)
class WorldObject:
    color: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """One scene of the toy world: one or two objects, maybe a ground."""

    objects: tuple[WorldObject, ...]
    ground: str | None = None

    @property
    def category(self) -> str:
        if len(self.objects) == 2:
            return "multi"
        return "surroundings" if self.ground else "single"

    @property
    def caption(self) -> str:
        text = " and ".join(f"{article(o.color)} {o.color} {o.shape}" for o in self.objects)
        return f"{text} on {self.ground}" if self.ground else text

    @property
    def combos(self) -> tuple[tuple[str, str], ...]:
        return tuple((o.color, o.shape) for o in self.objects)

    @property
    def held_out(self) -> bool:
        return any(c in HELD_OUT for c in self.combos)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_caption(caption: str) -> Scene:
    """Inverse of :attr:`Scene.caption`; raises ``ValueError`` for text outside the grammar.

    View suffixes such as ", front view" and a leading article variation are tolerated.
    """
    text = caption.strip().lower().split(",")[0].strip()
    ground = None
    for g in GROUNDS:
        if text.endswith(f" on {g}"):
            ground, text = g, text[: -len(f" on {g}")]
    objects = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] not in ("a", "an") or words[1] not in COLORS or words[2] not in SHAPES:
            raise ValueError(f"not a toy-world caption: {caption!r}")
        objects.append(WorldObject(words[1], words[2]))
    if not 1 <= len(objects) <= 2 or (ground and len(objects) != 1):
        raise ValueError(f"not a toy-world caption: {caption!r}")
    return Scene(tuple(objects), ground)


def all_captions(category: str, held_out: bool | None = None) -> list[str]:
    """Every caption of a category; ``held_out`` True/False keeps only held-out / training ones."""
    scenes: list[Scene] = []
    if category == "single":
        scenes = [Scene((WorldObject(c, s),)) for c, s in COMBOS]
    elif category == "surroundings":
        scenes = [Scene((WorldObject(c, s),), g) for c, s in COMBOS for g in GROUNDS]
    elif category == "multi":
        scenes = [
            Scene((WorldObject(c1, s1), WorldObject(c2, s2)))
            for c1, s1 in COMBOS
            for c2, s2 in COMBOS
            if c1 != c2 and s1 != s2
        ]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if held_out is not None:
        scenes = [s for s in scenes if s.held_out == held_out]
    return [s.caption for s in scenes]


def random_scene(rng: random.Random, category: str | None = None, allow_held_out: bool = False) -> Scene:
    """A random scene; by default never one with a held-out colour-shape combination."""
    category = category or rng.choices(CATEGORIES, weights=(0.4, 0.3, 0.3))[0]
    while True:
        n = 2 if category == "multi" else 1
        objs = tuple(WorldObject(rng.choice(COLOR_NAMES), rng.choice(SHAPES)) for _ in range(n))
        if n == 2 and (objs[0].color == objs[1].color or objs[0].shape == objs[1].shape):
            continue
        scene = Scene(objs, rng.choice(GROUNDS) if category == "surroundings" else None)
        if allow_held_out or not scene.held_out:
            return scene


# ---------------------------------------------------------------------------------------------
# Signed distance functions, in each object's local frame (unit scale: about 0.5 in radius).


def _length2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y + 1e-12)


def sdf_shape(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance from points ``p`` (..., 3) to a primitive of about unit diameter."""
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return p.norm(dim=-1) - 0.5
    if shape == "cube":
        q = p.abs() - 0.38
        return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0) - 0.05
    if shape == "cylinder":
        dx, dy = _length2(x, z) - 0.4, y.abs() - 0.45
        return torch.maximum(dx, dy).clamp_max(0) + _length2(dx.clamp_min(0), dy.clamp_min(0))
    if shape == "capsule":
        yc = y.clamp(-0.2, 0.2)
        return torch.sqrt(x * x + (y - yc) ** 2 + z * z) - 0.3
    if shape == "torus":
        return _length2(_length2(x, z) - 0.33, y) - 0.17
    if shape == "cone":
        # Capped cone: base radius r1 at y = -h, apex radius r2 = 0 at y = +h.
        h, r1 = 0.48, 0.48
        qx, qy = _length2(x, z), y
        # Distance to the flat cap.
        cax = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
        cay = qy.abs() - h
        # Distance to the slanted side, the segment from (r1, -h) to (0, h).
        k2x, k2y = -r1, 2 * h
        t = (((0 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0, 1)
        cbx, cby = qx - 0 + k2x * t, qy - h + k2y * t
        inside = (cbx < 0) & (cay < 0)
        d = torch.sqrt(torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby) + 1e-12)
        return torch.where(inside, -d, d)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class _Placed:
    shape: str
    rgb: torch.Tensor  # (3,)
    rgb2: torch.Tensor  # (3,) second tone
    pattern: int  # 0 plain, 1 stripes, 2 checks
    center: torch.Tensor  # (3,)
    scale: float
    yaw: float
    label: int = field(default=0)

    def local(self, p: torch.Tensor) -> torch.Tensor:
        q = (p - self.center) / self.scale
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return torch.stack([c * q[..., 0] - s * q[..., 2], q[..., 1], s * q[..., 0] + c * q[..., 2]], -1)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        return sdf_shape(self.shape, self.local(p)) * self.scale

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        q = self.local(p)
        if self.pattern == 1:
            w = (torch.sin(q[..., 1] * 22.0) > 0).float()
        elif self.pattern == 2:
            w = ((torch.floor(q[..., 0] * 6) + torch.floor(q[..., 1] * 6) + torch.floor(q[..., 2] * 6)) % 2).float()
        else:
            w = torch.zeros_like(q[..., 0])
        return self.rgb * (1 - w[..., None]) + self.rgb2 * w[..., None]


def _place(scene: Scene, rng: random.Random) -> list[_Placed]:
    placed = []
    n = len(scene.objects)
    for i, obj in enumerate(scene.objects):
        base = torch.tensor(COLORS[obj.color]) + torch.tensor([rng.uniform(-0.03, 0.03) for _ in range(3)])
        base = base.clamp(0, 1)
        pattern = rng.choices((0, 1, 2), weights=(0.5, 0.25, 0.25))[0]
        tone = base * 0.72 if rng.random() < 0.5 else base + (1 - base) * 0.4
        if n == 1:
            center, scale = torch.zeros(3), 1.0
        else:
            scale = 0.72
            x = (-0.5 if i == 0 else 0.5) + rng.uniform(-0.04, 0.04)
            center = torch.tensor([x, GROUND_Y + 0.5 * scale, rng.uniform(-0.1, 0.1)])
        placed.append(_Placed(obj.shape, base, tone, pattern, center, scale, rng.uniform(0, 2 * math.pi)))
    return placed


LIGHT = torch.tensor([0.45, 0.8, 0.4]) / math.sqrt(0.45**2 + 0.8**2 + 0.4**2)


@dataclass
class WorldRender:
    rgb: torch.Tensor  # (B, 3, H, W) in [0, 1]
    object_mask: torch.Tensor  # (B, H, W) bool: pixels covered by an object (not ground, not background)
    alpha: torch.Tensor  # (B, H, W) float: anything but background (objects and ground)


def render_scenes(
    scenes: list[Scene],
    cameras: Cameras,
    rng: random.Random | None = None,
    supersample: int = 2,
    steps: int = 56,
) -> WorldRender:
    """Render ``scenes[i]`` from ``cameras[i]`` by sphere tracing; deterministic given ``rng``'s state."""
    rng = rng or random.Random(0)
    B, H, W = len(scenes), cameras.height, cameras.width
    hi = Cameras(
        cameras.c2w,
        cameras.fovy,
        cameras.azimuth,
        cameras.elevation,
        cameras.distance,
        W * supersample,
        H * supersample,
    )
    origins, dirs = hi.rays()  # (B, N, 3)
    N = origins.shape[1]
    placed = [_place(s, rng) for s in scenes]
    grass_phase = [rng.uniform(0, 6.28) for _ in scenes]

    def scene_sdf(b: int, p: torch.Tensor) -> torch.Tensor:
        ds = [o.sdf(p) for o in placed[b]]
        if scenes[b].ground:
            radial = _length2(p[..., 0], p[..., 2]) - 1.45
            slab = (p[..., 1] - (GROUND_Y - 0.03)).abs() - 0.03
            ds.append(torch.maximum(radial, slab))
        return torch.stack(ds, -1)

    rgb = torch.full((B, N, 3), BACKGROUND)
    obj_mask = torch.zeros(B, N, dtype=torch.bool)
    alpha = torch.zeros(B, N)
    for b in range(B):
        o, d = origins[b], dirs[b]
        # Start marching at the bounding sphere (radius 1.6) to save steps.
        oc = (o * d).sum(-1)
        disc = oc * oc - (o * o).sum(-1) + 1.6**2
        t = (-oc - torch.sqrt(disc.clamp_min(0))).clamp_min(0)
        # March only the rays still alive (compacted), which is most of the cost saved.
        idx = (disc > 0).nonzero().squeeze(1)
        hit = torch.zeros(N, dtype=torch.bool)
        for _ in range(steps):
            if len(idx) == 0:
                break
            ti = t[idx]
            dist = scene_sdf(b, o[idx] + d[idx] * ti[:, None]).amin(-1)
            done = dist < 1e-3
            hit[idx[done]] = True
            ti = ti + dist.clamp_min(2e-3) * 0.95
            t[idx] = torch.where(done, t[idx], ti)
            keep = ~done & (ti < 6.0)
            idx = idx[keep]
        if not hit.any():
            continue
        p = o[hit] + d[hit] * t[hit, None]
        comps = scene_sdf(b, p)
        which = comps.argmin(-1)
        eps = 1e-3
        offs = torch.eye(3) * eps
        normal = torch.stack(
            [scene_sdf(b, p + offs[k]).amin(-1) - scene_sdf(b, p - offs[k]).amin(-1) for k in range(3)], -1
        )
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        albedo = torch.zeros(len(p), 3)
        for k, obj in enumerate(placed[b]):
            m = which == k
            if m.any():
                albedo[m] = obj.albedo(p[m])
        n_obj = len(placed[b])
        ground = which == n_obj
        if ground.any():
            g = p[ground]
            if scenes[b].ground == "checkered floor":
                chk = ((torch.floor(g[:, 0] / 0.3) + torch.floor(g[:, 2] / 0.3)) % 2)[:, None]
                albedo[ground] = 0.82 - 0.3 * chk
            else:
                ph = grass_phase[b]
                noise = torch.sin(g[:, 0] * 17 + ph) * torch.sin(g[:, 2] * 19 - ph) + 0.5 * torch.sin(
                    g[:, 0] * 41 + g[:, 2] * 37
                )
                albedo[ground] = torch.tensor([0.42, 0.62, 0.30]) * (1 + 0.12 * noise[:, None])
        diffuse = (normal @ LIGHT).clamp_min(0)[:, None]
        # Soft shadow of objects on the ground: march towards the light.
        shade = torch.ones(len(p))
        if ground.any():
            q = p[ground] + normal[ground] * 0.01
            ts = torch.full((len(q),), 0.02)
            occl = torch.ones(len(q))
            for _ in range(16):
                dd = torch.stack([obj.sdf(q + LIGHT * ts[:, None]) for obj in placed[b]], -1).amin(-1)
                occl = torch.minimum(occl, (8 * dd / ts).clamp(0, 1))
                ts = ts + dd.clamp(0.02, 0.3)
            shade[ground] = 0.55 + 0.45 * occl
        view = -d[hit]
        half = LIGHT + view
        half = half / half.norm(dim=-1, keepdim=True)
        spec = (normal * half).sum(-1).clamp_min(0).pow(24)[:, None] * 0.18 * (~ground).float()[:, None]
        color = albedo * (0.42 + 0.58 * diffuse) * shade[:, None] + spec
        rgb_b = rgb[b]
        rgb_b[hit] = color.clamp(0, 1)
        obj_mask[b, hit] = ~ground
        alpha[b, hit] = 1.0
    rgb = rgb.view(B, H * supersample, W * supersample, 3).permute(0, 3, 1, 2)
    rgb = F.avg_pool2d(rgb, supersample) if supersample > 1 else rgb
    om = obj_mask.view(B, 1, H * supersample, W * supersample).float()
    al = alpha.view(B, 1, H * supersample, W * supersample)
    if supersample > 1:
        om, al = F.avg_pool2d(om, supersample), F.avg_pool2d(al, supersample)
    return WorldRender(rgb.contiguous(), om[:, 0] > 0.5, al[:, 0])


def render_captions(
    captions: list[str],
    size: int = 64,
    seed: int = 0,
    cameras: Cameras | None = None,
    ranges: CameraRange | None = None,
) -> WorldRender:
    """Render captions of the grammar from random cameras (or ``cameras``); reproducible by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    cams = cameras or sample_cameras(len(captions), size, ranges=ranges, generator=gen)
    return render_scenes([parse_caption(c) for c in captions], cams, random.Random(seed))
