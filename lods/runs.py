"""``generate`` and ``edit``: a run from the command line, with a progress bar and the contract's files.

``--out DIR`` receives ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON object per logged
step), ``summary.json``, ``checkpoint.pt`` and the result: ``image.png`` (image), ``scene.ply`` (gs) or
``mesh.glb`` (nerf), plus ``turntable.mp4`` and ``views.png`` for 3D.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from lods import export
from lods.cameras import turntable
from lods.errors import UserError
from lods.export import atomic_path
from lods.scenes.image import ImageScene
from lods.trainer import RunConfig, Trainer

TOY_MAX_GAUSSIANS = 5000
PRESETS = {
    # Defaults per backbone on the embedded prior (CPU-friendly); YAML files in examples/ override them.
    "gs": {"steps": 600, "batch": 2},
    "nerf": {"steps": 600, "batch": 1},
    "image": {"steps": 500, "batch": 1, "cfg": 100.0},
}


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Merge, later winning: ``--resume`` folder's config, ``--config`` YAML, flags, ``--set``; then the
    backbone's preset fills what is still unset. ``--lr`` is the image's learning rate (2D) or a multiplier
    of every scene learning rate (3D)."""
    cfg: dict[str, Any] = {}
    resume = getattr(args, "resume", None)
    if resume:
        path = Path(resume) / "config.yaml"
        if not path.exists():
            raise UserError(f"{resume} has no config.yaml to resume from")
        cfg.update(yaml.safe_load(path.read_text()))
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise UserError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(loaded, dict):
            raise UserError(f"{path} must hold a mapping of config keys")
        cfg.update(loaded)
    flags = {
        "prompt": args.prompt,
        "prior": args.prior,
        "method": args.method,
        "cfg": args.cfg,
        "steps": args.steps,
        "seed": args.seed,
        "device": args.device,
        "learned_lr": args.learned_lr,
        "negative_prompt": args.negative_prompt,
        "backbone": getattr(args, "backbone", None),
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    if args.command == "edit":
        cfg.update(backbone="image", source_prompt=args.source_prompt)
        cfg.setdefault("method", "dds")
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    backbone = cfg.get("backbone", "gs")
    if args.lr is not None:
        if backbone == "image":
            cfg["lr"] = {**(cfg.get("lr") or {}), "image": args.lr}
        else:
            cfg["lr_scale"] = args.lr
    for k, v in PRESETS.get(backbone, {}).items():
        cfg.setdefault(k, v)
    return with_toy_gaussian_cap(cfg)


def with_toy_gaussian_cap(cfg: dict) -> dict:
    """A Gaussian-splat run on the toy prior densifies up to ``TOY_MAX_GAUSSIANS`` unless told otherwise.

    64x64 renders need few splats: the cap keeps CPU runs above 5 it/s (uncapped they grow to about
    19,000 splats and slow to 3 it/s) and keeps the live viewer's splat messages small."""
    if cfg.get("backbone", "gs") == "gs" and cfg.get("prior", "toy") == "toy":
        cfg["gaussians"] = {"max_points": TOY_MAX_GAUSSIANS, **(cfg.get("gaussians") or {})}
    return cfg


def load_image(path: str | Path, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    except FileNotFoundError as err:
        raise UserError(f"image {path} not found") from err
    except UnidentifiedImageError as err:
        raise UserError(f"{path} is not an image file") from err
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def run_from_args(args: argparse.Namespace) -> int:
    cfg_dict = config_from_args(args)
    try:
        config = RunConfig.from_dict(cfg_dict)
    except TypeError as err:
        raise UserError(f"bad config: {err}") from err
    config.validate()
    out = Path(args.out)
    init_image = None
    if args.command == "edit":
        from lods.trainer import load_prior

        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        prior = load_prior(config.prior, device)
        init_image = load_image(args.image, prior.image_size)
        trainer = Trainer(config, prior=prior, out_dir=out, init_image=init_image)
    else:
        trainer = Trainer(config, out_dir=out)
    if getattr(args, "resume", None):
        ck = Path(args.resume) / "checkpoint.pt"
        if not ck.exists():
            raise UserError(f"{args.resume} has no checkpoint.pt to resume from")
        trainer.load_checkpoint(ck)
    return run_and_export(trainer, out)


def run_and_export(trainer: Trainer, out: Path, show_progress: bool = True, video: bool = True) -> int:
    """Train with a progress bar, then write the contract's files into ``out`` (``video=False``: no
    turntable video, for benchmarks)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(resolved_config(trainer), sort_keys=False))
    start_step, t0 = trainer.step, time.perf_counter()
    bar = tqdm(
        total=trainer.config.steps,
        initial=trainer.step,
        desc=trainer.config.method,
        unit="it",
        disable=not show_progress,
    )

    def progress(step: int, total: int, stats: dict) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(cfg=stats["cfg"], t=int(stats.get("t", 0)), loss=f"{stats['loss']:.3g}")

    status = trainer.run(progress)
    bar.close()
    trainer.close()
    seconds = time.perf_counter() - t0
    results = export_results(trainer, out, video_frames=60 if video else 0)
    summary = {
        "prompt": trainer.config.prompt,
        "method": trainer.config.method,
        "backbone": trainer.config.backbone,
        "prior": trainer.config.prior,
        "cfg": trainer.config.cfg,
        "steps": trainer.step,
        "seconds": round(seconds, 3),
        "it_per_s": round((trainer.step - start_step) / max(seconds, 1e-9), 3),
        "status": status,
        "message": trainer.message,
        "device": str(trainer.device),
        "final_metrics": results.pop("metrics"),
        "files": results,
    }
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(h, default=_json_default) + "\n" for h in trainer.history))
    if status == "diverged":
        raise UserError(trainer.message)
    if show_progress:
        print(f"{status}: {trainer.step} steps in {seconds:.1f} s; results in {out}")
    return 0


def resolved_config(trainer: Trainer) -> dict[str, Any]:
    """The run's config with every default the trainer chose filled in: the values that actually ran
    (device, CPU threads, render resolution, the learned parameters' learning rate, view prompts, and
    every field of the scene's, the estimator's and the cameras' settings). ``--resume`` reads it back."""
    from dataclasses import is_dataclass

    cfg = asdict(trainer.config)
    scene_config = getattr(trainer.scene, "config", None)
    section = {"gs": "gaussians", "nerf": "nerf", "image": "image"}[trainer.config.backbone]
    if is_dataclass(scene_config):
        cfg[section] = asdict(scene_config)
    cfg["camera"] = {k: list(v) for k, v in asdict(trainer.camera_range).items()}
    if is_dataclass(getattr(trainer.estimator, "config", None)):
        cfg["guidance"] = {**asdict(trainer.estimator.config), "lr": float(trainer.estimator.lr)}
    cfg["device"] = str(getattr(trainer, "sliced_on", trainer.device))  # ZeroGPU: the slices' device
    cfg["threads"] = torch.get_num_threads()  # the CPU threads torch used (set by the trainer on CPU)
    cfg["resolution"] = int(trainer.resolution)
    if cfg["learned_lr"] is None and getattr(trainer.estimator, "lr", None) is not None:
        cfg["learned_lr"] = float(trainer.estimator.lr)
    cfg["view_prompts"] = bool(trainer.view_prompts)
    return cfg


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


@torch.no_grad()
def export_results(trainer: Trainer, out: Path, views: int = 8, video_frames: int = 60) -> dict[str, Any]:
    """Write the result files of a run; returns their names and the final metrics."""
    from lods import metrics

    files: dict[str, Any] = {}
    scene = trainer.scene
    if isinstance(scene, ImageScene):
        image = scene.image(trainer.prior).cpu()
        export.write_png(out / "image.png", export.to_uint8_frames(image)[0])
        files["image"] = "image.png"
        cs = metrics.color_stats(image, metrics.foreground_mask(image))
        files["metrics"] = {k: cs[k] for k in ("saturation", "value", "clipped")}
        return files
    size = trainer.resolution
    grid_out = trainer.render_views(turntable(views, size))
    export.write_png(out / "views.png", export.image_grid(grid_out.rgb.float().cpu(), cols=views))
    files["views"] = "views.png"
    if video_frames:
        frames = trainer.render_views(turntable(video_frames, size * 2)).rgb.float().cpu()
        export.write_video(out / "turntable.mp4", export.to_uint8_frames(frames), fps=24)
        files["video"] = "turntable.mp4"
    if hasattr(scene, "to_ply_attributes"):
        attrs = scene.to_ply_attributes()
        export.write_gaussians_ply(out / "scene.ply", **attrs)
        export.write_splat(out / "scene.splat", **attrs,
                           pixel_variance=export.run_pixel_variance(trainer.resolution, trainer.config.camera))
        files["scene"], files["splat"] = "scene.ply", "scene.splat"
    if trainer.config.backbone == "nerf":
        from lods.scenes.nerf import extract_mesh

        v, f, c = extract_mesh(scene)
        export.write_mesh_glb(out / "mesh.glb", v, f, c)
        files["mesh"] = "mesh.glb"
    rgb, alpha = grid_out.rgb.float().cpu(), grid_out.alpha.float().cpu()
    cs = metrics.color_stats(rgb, alpha[:, 0] > 0.5)
    files["metrics"] = {
        "saturation": cs["saturation"],
        "value": cs["value"],
        "clipped": cs["clipped"],
        "floater_score": metrics.floater_score(alpha),
    }
    files["metrics"].update(alignment_metrics(trainer.config.prompt, trainer.config.prior, rgb))
    return files


def alignment_metrics(prompt: str, prior: str, images: torch.Tensor) -> dict[str, float]:
    """The toy judge's verdict over the views, when the prompt is a toy-world caption; on other priors the
    CLIP score when local open_clip weights are configured (``lods.clip_score``), else nothing."""
    if prior != "toy":
        from lods.clip_score import clip_scorer

        scorer = clip_scorer()
        return {"clip_score": scorer(images, prompt)} if scorer is not None else {}
    from lods.priors.toy.judge import judge_images, shipped_judge
    from lods.priors.toy.world import parse_caption

    try:
        parse_caption(prompt)
        judge = shipped_judge()
    except (ValueError, FileNotFoundError):
        return {}
    r = judge_images(judge, images, [prompt] * len(images))
    return {"alignment": float(r["objects_right"].float().mean()), "views_judged_right": int(r["objects_right"].sum())}
