"""``generate`` and ``edit``: a run from the command line, with a progress bar and the contract's files.

``--out DIR`` receives ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one JSON object per logged
step), ``summary.json``, ``checkpoint.safetensors`` (and the one before, ``checkpoint-prev.safetensors``)
and the result: ``image.png`` (image), ``scene.ply`` (gs) or ``mesh.glb`` (nerf), plus ``turntable.mp4``
and ``views.png`` for 3D. Result files are written only when a run ends without diverging: a diverged run
leaves the folder's previous results as they were.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from lods import checkpoint
from lods.config import RunConfig
from lods.errors import UserError
from lods.export import atomic_path
from lods.trainer import Trainer, load_prior, resolve_device, write_config

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
        cfg.update(copy.deepcopy(checkpoint.load(resume)["config"]))  # the config the checkpoint ran with
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file {path} not found" if not path.exists() else f"{path} is not a file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not a text file") from err
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
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--set {key}: {value!r} is not a value ({str(err).splitlines()[0]})") from err
    backbone = cfg.get("backbone", "gs")
    if args.lr is not None:
        if backbone == "image":
            cfg["lr"] = {**(cfg.get("lr") or {}), "image": args.lr}
        else:
            cfg["lr_scale"] = args.lr
    for k, v in PRESETS.get(backbone, {}).items():
        cfg.setdefault(k, v)
    return cfg


def load_image(path: str | Path, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} not found" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img = opened.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    except UnidentifiedImageError as err:
        raise UserError(f"{path} is not an image file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"{path} is too large to be an input image ({str(err).split('.')[0]})") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise UserError(f"{path} cannot be read as an image ({str(err).splitlines()[0][:100]})") from err
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def prepare_out(out: str | Path) -> Path:
    """``out`` as a writable folder (created if needed), or a ``UserError`` that says why it cannot be."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror})") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder is not writable")
    return out


def run_from_args(args: argparse.Namespace) -> int:
    config = RunConfig.from_dict(config_from_args(args))
    config.validate()
    out = prepare_out(args.out)
    init_image = None
    if args.command == "edit":
        prior = load_prior(config.prior, resolve_device(config.device))
        init_image = load_image(args.image, prior.image_size)
        trainer = Trainer(config, prior=prior, out_dir=out, init_image=init_image)
    else:
        trainer = Trainer(config, out_dir=out)
    if getattr(args, "resume", None):
        trainer.load_checkpoint(args.resume)
    return run_and_export(trainer, out)


def run_and_export(trainer: Trainer, out: Path, show_progress: bool = True, video: bool = True) -> int:
    """Train with a progress bar, then write the contract's files into ``out`` (``video=False``: no
    turntable video, for benchmarks)."""
    out.mkdir(parents=True, exist_ok=True)
    if trainer.checkpoint_step is None:  # a fresh run; a resumed one keeps its config.yaml until a checkpoint
        write_config(out / "config.yaml", trainer.resolved_config())
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

    try:
        status = trainer.run(progress)
    finally:
        bar.close()
        trainer.close()
    if status == "diverged":  # nothing written: the folder's previous results and checkpoints stay as they were
        raise UserError(trainer.message)
    seconds = time.perf_counter() - t0
    write_run_folder(trainer, out, status, seconds=seconds, start_step=start_step, video=video)
    if show_progress:
        print(f"{status}: {trainer.step} steps in {seconds:.1f} s; results in {out}")
    return 0


def write_run_folder(trainer: Trainer, out: Path, status: str, seconds: float | None = None, start_step: int = 0,
                     video: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """The run folder's result files, ``summary.json``, ``metrics.jsonl`` and ``config.yaml`` (what ran, knob
    values at the end); the one writer of the CLI, batch, sweep and the app. Returns the summary and the
    files written. Call it only for a state that passed the divergence guard (never after "diverged")."""
    if status == "diverged":
        raise ValueError("a diverged run's state is not written")
    out.mkdir(parents=True, exist_ok=True)
    results = export_results(trainer, out, video_frames=60 if video else 0)
    ran = trainer.resolved_config()
    summary = {
        "prompt": ran.prompt,
        "method": ran.method,
        "backbone": ran.backbone,
        "prior": ran.prior,
        "cfg": ran.cfg,  # the weight at the end; knob_changes lists every change
        "knob_changes": trainer.knob_changes,
        "steps": trainer.step,
        "seconds": None if seconds is None else round(seconds, 3),
        "it_per_s": None if seconds is None else round((trainer.step - start_step) / max(seconds, 1e-9), 3),
        "status": status,
        "message": trainer.message,
        "device": str(trainer.device),
        "final_metrics": results.pop("metrics"),
        "files": results,
    }
    write_config(out / "config.yaml", ran)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(h, default=_json_default) + "\n" for h in trainer.history))
    names = [*[v for v in results.values() if isinstance(v, str)], "config.yaml", "summary.json", "metrics.jsonl",
             checkpoint.LATEST]
    return summary, [out / name for name in names if (out / name).is_file()]


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


@torch.no_grad()
def export_results(trainer: Trainer, out: Path, views: int = 8, video_frames: int = 60) -> dict[str, Any]:
    """Write the result files of a run (``Scene.export``); returns their names and, under ``metrics``, the
    final metrics with the prompt's alignment."""
    files, final, images = trainer.scene.export(out, trainer.prior, trainer.resolution, trainer.background,
                                                views=views, video_frames=video_frames)
    if trainer.scene.live_view is not None:  # a 3D scene: its views are judged against the prompt
        final.update(alignment_metrics(trainer.config.prompt, trainer.config.prior, images))
    return {**files, "metrics": final}


def alignment_metrics(prompt: str, prior: str, images: torch.Tensor) -> dict[str, float]:
    """The toy judge's verdict over the views, when the prior ships a judge (the toy prior) and the prompt is a
    caption of its world; on other priors the CLIP score when local open_clip weights are configured
    (``lods.clip_score``), else nothing."""
    from lods.priors.diffusers_prior import judge_path

    if judge_path(prior) is None:
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
