"""``python -m lods.bench.judge_splats``: how often the toy judge is right on Gaussian-splat renders.

The quality benchmark judges the renders of trained splats, but the judge was trained and tested on the
world's own renders. Here splats are fitted, by plain photometric loss, to the world's renders of one
scene of a known caption from many cameras; then the judge names the splats' renders and the world's
renders from the same held-out turntable views. The difference is the judge's own error on splats.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch


def world_views(caption: str, cameras: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB (V, 3, H, W) and alpha (V, H, W) of one scene of ``caption`` (the same placement, colours and
    pattern in every view) seen from ``cameras``."""
    from lods.priors.toy.world import parse_caption, render_scenes

    scene = parse_caption(caption)
    rgb, alpha = [], []
    for i in range(len(cameras)):
        r = render_scenes([scene], cameras[i : i + 1], random.Random(seed))
        rgb.append(r.rgb)
        alpha.append(r.alpha)
    return torch.cat(rgb), torch.cat(alpha)


def fit_splats(target: torch.Tensor, cameras: Any, steps: int, seed: int, batch: int = 4) -> Any:
    """A Gaussian scene fitted to ``target`` views (white background) by L2 with the CPU rasterizer."""
    from lods.scenes.gaussians import GaussianConfig, GaussianScene

    gen = torch.Generator().manual_seed(seed)
    scene = GaussianScene(GaussianConfig(num_points=2000, max_points=5000, densify_from=100, densify_every=100,
                                         densify_until=steps), generator=gen)
    optimizer = torch.optim.Adam(scene.param_groups(), eps=1e-15)
    white = torch.ones(batch, 3)
    for step in range(steps):
        idx = torch.randperm(len(target), generator=gen)[:batch]
        out = scene.render(cameras[idx], white)
        loss = (out.rgb - target[idx]).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scene.post_step(step, out, optimizer)
    return scene


def judge_on_splats(captions: list[str], steps: int = 300, train_views: int = 32, test_views: int = 8,
                    size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Per caption: views judged right on the world's renders and on the fitted splats' renders (same views)."""
    from lods.cameras import sample_cameras, turntable
    from lods.priors.toy.judge import judge_images, shipped_judge

    judge = shipped_judge()
    rows = []
    for k, caption in enumerate(captions):
        train_cams = sample_cameras(train_views, size, generator=torch.Generator().manual_seed(seed + k))
        target, _ = world_views(caption, train_cams, seed + k)
        scene = fit_splats(target, train_cams, steps, seed + k)
        test_cams = turntable(test_views, size)
        world, _ = world_views(caption, test_cams, seed + k)
        with torch.no_grad():
            splats = scene.render(test_cams, torch.ones(test_views, 3)).rgb.clamp(0, 1)
        right_world = judge_images(judge, world, [caption] * test_views)["objects_right"]
        right_splats = judge_images(judge, splats, [caption] * test_views)["objects_right"]
        rows.append({"caption": caption, "world": float(right_world.float().mean()),
                     "splats": float(right_splats.float().mean()),
                     "psnr": float(-10 * torch.log10((splats - world).square().mean()))})
        print(json.dumps(rows[-1]))
    return {"steps": steps, "train_views": train_views, "test_views": test_views, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from lods.bench.quality import QUALITY_PROMPTS

    p = argparse.ArgumentParser(prog="python -m lods.bench.judge_splats", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--per-category", type=int, default=8)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    captions = [c for cs in QUALITY_PROMPTS.values() for c in cs[: args.per_category]]
    report = judge_on_splats(captions, steps=args.steps)
    for category, cs in QUALITY_PROMPTS.items():
        rs = [r for r in report["rows"] if r["caption"] in cs]
        if rs:
            report[category] = {k: sum(r[k] for r in rs) / len(rs) for k in ("world", "splats", "psnr")}
            print(f"{category}: world {report[category]['world']:.3f}, splats {report[category]['splats']:.3f}, "
                  f"PSNR {report[category]['psnr']:.1f} dB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
