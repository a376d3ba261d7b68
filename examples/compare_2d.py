"""2D generation on the toy prior: SDS at CFG 7.5 and 100 against LODS-embed at CFG 100, side by side.

    python -m examples.compare_2d --out runs/compare-2d [--steps 500] [--prompts "a red cube" ...]

Writes ``grid.png`` (one row per prompt: world render, then each method), ``results.json`` and
``table.md`` with the mean saturation and value of object pixels and the share of clipped pixels,
next to the same statistics of the world's own renders of each caption.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lods import metrics
from lods.config import RunConfig
from lods.export import image_grid, write_png
from lods.priors.diffusers_prior import DiffusersPrior
from lods.priors.toy.judge import judge_images, load_judge
from lods.priors.toy.world import render_captions
from lods.trainer import Trainer

SETTINGS = [("sds", 7.5, None), ("sds", 100.0, None), ("lods-embed", 100.0, 3e-3)]


def world_reference(caption: str, n: int = 64) -> dict[str, float]:
    """The world's renders measured as the generated images are: on their non-white pixels (a generated image
    has no object mask, so both sides use the same rule)."""
    r = render_captions([caption] * n, seed=123)
    return metrics.color_stats(r.rgb, metrics.foreground_mask(r.rgb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts", nargs="+", default=["a red cube", "a blue sphere", "a green torus", "a yellow cone on grass"]
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = DiffusersPrior.from_pretrained("toy")
    judge = load_judge()
    rows, tiles = [], []
    for prompt in args.prompts:
        ref = world_reference(prompt)
        tiles.append(render_captions([prompt], seed=5).rgb)
        rows.append(
            {"prompt": prompt, "setting": "world renders", **{k: ref[k] for k in ("saturation", "value", "clipped")}}
        )
        for method, cfg, lr in SETTINGS:
            config = RunConfig(
                prompt=prompt,
                backbone="image",
                method=method,
                cfg=cfg,
                steps=args.steps,
                seed=args.seed,
                device="cpu",
                batch=1,
                learned_lr=lr,
                snapshot_every=10**9,
            )
            trainer = Trainer(config, prior=prior)
            trainer.run()
            image = trainer.scene.image(prior).cpu()
            tiles.append(image)
            stats = metrics.color_stats(image, metrics.foreground_mask(image))
            right = bool(judge_images(judge, image, [prompt])["objects_right"][0])
            rows.append(
                {
                    "prompt": prompt,
                    "setting": f"{method} cfg {cfg:g}",
                    "judged_right": right,
                    **{k: stats[k] for k in ("saturation", "value", "clipped")},
                }
            )
            print(rows[-1])
    write_png(out / "grid.png", image_grid(torch.cat(tiles), cols=1 + len(SETTINGS)))
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| setting | saturation | value | clipped | judged right |", "| --- | --- | --- | --- | --- |"]
    for setting in ["world renders"] + [f"{m} cfg {c:g}" for m, c, _ in SETTINGS]:
        sel = [r for r in rows if r["setting"] == setting]
        mean = {k: sum(r[k] for r in sel) / len(sel) for k in ("saturation", "value", "clipped")}
        right = f"{sum(r['judged_right'] for r in sel)}/{len(sel)}" if "judged_right" in sel[0] else "-"
        lines.append(
            f"| {setting} | {mean['saturation']:.3f} | {mean['value']:.3f} | {mean['clipped']:.3f} | {right} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
