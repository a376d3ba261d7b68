"""The judge: a small CNN that names the colour and shape of every object in a toy-world image.

It is the alignment metric of the toy prior: an image is judged right for a caption when the set of
(colour, shape) pairs it detects equals the caption's set. It is trained on world renders of every
combination (held-out ones included: it is a measuring instrument, not a generator).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lods.priors.toy.world import COMBOS, GROUNDS, parse_caption

JUDGE_PATH = Path(__file__).parent / "weights" / "judge.safetensors"
GROUND_CLASSES = ("none",) + GROUNDS


class Judge(nn.Module):
    """64x64 RGB in [0, 1] -> 48 multi-label (colour, shape) logits and 3 ground logits.

    The (colour, shape) logits are computed at every cell of an 8x8 feature map and max-pooled, so
    that a colour is bound to the shape at the same place (two objects never mix their attributes).
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        chans = [3, w, 2 * w, 4 * w]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
        layers += [nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
                   nn.Conv2d(4 * w, 4 * w, 3, padding=2, dilation=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.combo_head = nn.Conv2d(4 * w, len(COMBOS), 1)
        self.ground_head = nn.Linear(4 * w, len(GROUND_CLASSES))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 8w): mean and max over space; used for the artifact score too."""
        h = self.feature_map(images)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.feature_map(images)
        return self.combo_head(h).amax((2, 3)), self.ground_head(h.mean((2, 3)))


def targets(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    combo = torch.zeros(len(captions), len(COMBOS))
    ground = torch.zeros(len(captions), dtype=torch.long)
    for i, c in enumerate(captions):
        scene = parse_caption(c)
        for pair in scene.combos:
            combo[i, COMBOS.index(pair)] = 1
        ground[i] = GROUND_CLASSES.index(scene.ground or "none")
    return combo, ground


def detected_sets(combo_logits: torch.Tensor) -> list[frozenset[tuple[str, str]]]:
    """The (colour, shape) pairs above 0.5; the single most likely one when none is."""
    out = []
    for row in torch.sigmoid(combo_logits):
        idx = (row > 0.5).nonzero().flatten().tolist() or [int(row.argmax())]
        out.append(frozenset(COMBOS[i] for i in idx))
    return out


@torch.no_grad()
def judge_images(judge: Judge, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Per image: ``objects_right`` (bool), ``ground_right`` (bool), ``confidence`` (mean prob of the
    caption's pairs)."""
    judge.eval()
    combo_logits, ground_logits = judge(images.float().clamp(0, 1))
    sets = detected_sets(combo_logits)
    combo_t, ground_t = targets(captions)
    objects_right = torch.tensor([s == frozenset(parse_caption(c).combos) for s, c in zip(sets, captions)])
    ground_right = ground_logits.argmax(1) == ground_t
    probs = torch.sigmoid(combo_logits)
    confidence = (probs * combo_t).sum(1) / combo_t.sum(1)
    return {"objects_right": objects_right, "ground_right": ground_right, "confidence": confidence}


def load_judge(path: str | Path = JUDGE_PATH) -> Judge:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"judge weights not found at {path}; train them with `python -m lods toy-prior judge --train`"
        )
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


@functools.lru_cache(maxsize=1)
def shipped_judge() -> Judge:
    """The package's judge, loaded once per process (alignment metrics ask for it on every run and poll)."""
    return load_judge()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation: mirror, small zoom and shift (white border), light photometric jitter.

    Hue is never touched, since colour is what the judge names."""
    b = len(x)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    zoom = 1 + 0.24 * (torch.rand(b, generator=gen) - 0.5)
    shift = 0.24 * (torch.rand(b, 2, generator=gen) - 0.5)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = flip / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1 - F.grid_sample(1 - x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 1 + 0.3 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 0.5) * contrast + 0.5 + 0.05 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(b, 1, 1, 1, generator=gen)
    if float(torch.rand(1, generator=gen)) < 0.3:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x.clamp(0, 1)


def _render_multi(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh two-object renders (uint8) and their captions, reproducible by ``seed``."""
    from lods.cameras import sample_cameras
    from lods.priors.toy.world import random_scene, render_scenes

    rng = random.Random(seed)
    scenes = [random_scene(rng, "multi", allow_held_out=True) for _ in range(n)]
    cams = sample_cameras(n, 64, generator=torch.Generator().manual_seed(seed))
    rgb = (render_scenes(scenes, cams, rng).rgb * 255).round().to(torch.uint8)
    return rgb, [s.caption for s in scenes]


def train_judge(
    data: dict,
    out: str | Path = JUDGE_PATH,
    minutes: float = 10.0,
    batch: int = 64,
    seed: int = 0,
    init: Judge | None = None,
    lr: float = 2e-3,
    multi_fraction: float = 0.5,
    fresh_per_step: int = 8,
    work_dir: str | Path | None = None,
) -> Judge:
    """Train on cached renders (``rgb`` uint8, ``captions``) for a time budget, continuing ``init`` if
    given; saves safetensors.

    Each batch holds ``multi_fraction`` two-object scenes (the hard case), ``fresh_per_step`` of them
    rendered anew at every step and kept in the pool, so that the judge sees far more pairings than the
    cache holds. The learning rate follows a cosine over the budget (time spent rendering included).
    With ``work_dir`` the run is resumable: a checkpoint and the fresh renders are kept there, and a
    rerun with the same arguments continues where the last one stopped.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = init.train() if init is not None else Judge().train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    rgb, captions = data["rgb"], list(data["captions"])
    step, elapsed = 0, 0.0
    work = Path(work_dir) if work_dir is not None else None
    ckpt = work / "judge_ckpt.pt" if work is not None else None
    fresh_rgb: list[torch.Tensor] = []
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        for p in sorted(work.glob("fresh_*.pt")):
            part = torch.load(p)
            fresh_rgb.append(part["rgb"])
            captions += part["captions"]
        if ckpt.exists():
            state = torch.load(ckpt)
            judge.load_state_dict(state["judge"])
            opt.load_state_dict(state["opt"])
            step, elapsed = state["step"], state["elapsed"]
            gen.set_state(state["gen"])
    n_base = len(rgb)
    n_fresh_saved = sum(len(f) for f in fresh_rgb)
    # Fresh renders go into a buffer that grows by doubling (the cache itself is never copied).
    pool = torch.cat(fresh_rgb) if fresh_rgb else torch.zeros(0, *rgb.shape[1:], dtype=torch.uint8)
    n_pool = len(pool)
    pending_rgb: list[torch.Tensor] = []
    pending_caps: list[str] = []
    combo_t, ground_t = targets(captions)
    multi = torch.tensor([parse_caption(c).category == "multi" for c in captions]).nonzero().flatten()

    def save_checkpoint() -> None:
        nonlocal n_fresh_saved, pending_rgb, pending_caps
        if pending_caps:
            part = {"rgb": torch.cat(pending_rgb), "captions": pending_caps}
            path = work / f"fresh_{n_fresh_saved:08d}.pt"
            torch.save(part, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            n_fresh_saved += len(pending_caps)
            pending_rgb, pending_caps = [], []
        state = {"judge": judge.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                 "gen": gen.get_state()}
        torch.save(state, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    budget, last_save = minutes * 60, elapsed
    bar = tqdm(total=int(budget), initial=int(elapsed), desc="judge", unit="s")
    while elapsed < budget:
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget))))
        n_multi = round(batch * multi_fraction) if len(multi) else 0
        n_new = min(fresh_per_step, n_multi)
        idx = torch.cat([
            torch.randint(n_base + n_pool, (batch - n_multi,), generator=gen),
            multi[torch.randint(max(1, len(multi)), (n_multi - n_new,), generator=gen)],
        ])
        in_base = idx < n_base
        x = torch.empty(len(idx), *rgb.shape[1:], dtype=torch.uint8)
        x[in_base] = rgb[idx[in_base]]
        x[~in_base] = pool[idx[~in_base] - n_base]
        c_t, g_t = combo_t[idx], ground_t[idx]
        if n_new:
            new_rgb, new_caps = _render_multi(n_new, seed * 1_000_003 + step + 1)
            new_c, new_g = targets(new_caps)
            x, c_t, g_t = torch.cat([x, new_rgb]), torch.cat([c_t, new_c]), torch.cat([g_t, new_g])
            if n_pool + n_new > len(pool):
                grown = torch.zeros(max(2 * len(pool), n_pool + n_new, 1024), *pool.shape[1:], dtype=torch.uint8)
                grown[:n_pool] = pool[:n_pool]
                pool = grown
            pool[n_pool : n_pool + n_new] = new_rgb
            first = n_base + n_pool
            n_pool += n_new
            combo_t, ground_t = torch.cat([combo_t, new_c]), torch.cat([ground_t, new_g])
            multi = torch.cat([multi, torch.arange(first, first + n_new)])
            pending_rgb.append(new_rgb)
            pending_caps += new_caps
        x = _augment(x.float() / 255, gen)
        combo_logits, ground_logits = judge(x)
        loss = F.binary_cross_entropy_with_logits(combo_logits, c_t) * 10 + F.cross_entropy(ground_logits, g_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        elapsed += time.time() - t0
        bar.update(int(elapsed) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if ckpt is not None and elapsed - last_save > 120:
            save_checkpoint()
            last_save = elapsed
    bar.close()
    if ckpt is not None:
        save_checkpoint()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return judge.eval()


def evaluate_on_renders(judge: Judge, data: dict) -> dict:
    """Accuracy of the judge on renders it was not trained on, by category."""
    results: dict[str, list[bool]] = {}
    for i in range(0, len(data["captions"]), 256):
        caps = data["captions"][i : i + 256]
        r = judge_images(judge, data["rgb"][i : i + 256].float() / 255, caps)
        for c, ok, gok in zip(caps, r["objects_right"].tolist(), r["ground_right"].tolist()):
            results.setdefault(parse_caption(c).category, []).append(ok and gok)
    report = {k: sum(v) / len(v) for k, v in results.items()}
    report["all"] = sum(sum(v) for v in results.values()) / sum(len(v) for v in results.values())
    return report


def save_report(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
