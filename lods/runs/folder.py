"""The run folder: one contract, one writer, used by the CLI, the app, batch, sweep and compare.

A run folder holds ``config.yaml`` (what ran: every default resolved, the live knobs' final values),
``metrics.jsonl`` (one JSON object per logged step), ``summary.json``, ``checkpoint.safetensors`` (and the
one before, ``checkpoint-prev.safetensors``) and the result the scene exports: ``image.png`` (image),
``scene.ply`` (gs) or ``mesh.glb`` (nerf), plus ``turntable.mp4`` and ``views.png`` for 3D. Result files
are written only when a run ends without diverging: a diverged run leaves the folder as it was.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods import checkpoint
from lods.errors import UserError
from lods.export import atomic_path
from lods.trainer import Trainer, write_config


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


def write_run_folder(trainer: Trainer, out: Path, status: str, seconds: float | None = None, start_step: int = 0,
                     video: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """The run folder's result files, ``summary.json``, ``metrics.jsonl`` and ``config.yaml`` (what ran, knob
    values at the end); the one writer of the CLI, batch, sweep and the app. Returns the summary and the
    files written. Call it only for a state that passed the divergence guard (never after "diverged")."""
    if status == "diverged":
        raise ValueError("a diverged run's state is not written")
    out.mkdir(parents=True, exist_ok=True)
    results = export_results(trainer, out, video_frames=60 if video else 0)
    extra, extra_files = trainer.export_extra(out)
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
        **extra,
    }
    write_config(out / "config.yaml", ran)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
    with atomic_path(out / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(h, default=_json_default) + "\n" for h in trainer.history))
    names = [*[v for v in results.values() if isinstance(v, str)], *extra_files, "config.yaml", "summary.json",
             "metrics.jsonl", checkpoint.LATEST]
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
                                                camera=trainer.config.camera, views=views, video_frames=video_frames)
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
