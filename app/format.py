"""How the page writes things: labels, the status line, notices, durations (Markdown-safe), and its CSS."""

from __future__ import annotations

import html
import math
import re

from app.jobs import Job, JobManager

TITLE = "LODS Studio"
METHOD_LABELS = {
    "lods-embed": "LODS: learned null embedding",
    "lods-lora": "LODS: LoRA on the null branch",
    "sds": "SDS (DreamFusion)",
    "sds-ref": "SDS-ref: conditional prediction only",
    "sds-norm": "SDS-norm: SDS divided by w",
    "vsd": "VSD (ProlificDreamer)",
    "cfg-anneal": "SDS with annealed CFG",
    "cfg-rescale": "SDS with CFG rescale (MVDream)",
    "ism": "ISM (LucidDreamer)",
}
BACKBONE_LABELS = {"gs": "Gaussian splats", "nerf": "NeRF", "image": "2D image"}
STATE_LABELS = {
    "loading": "⏳ Loading the prior", "running": "● Running", "paused": "⏸ Paused", "exporting": "⏳ Writing files",
    "done": "✓ Done", "stopped": "■ Stopped", "diverged": "⚠️ Diverged", "failed": "⚠️ Failed",
}
CSS = """
#notice p, #status p { margin: 0.2em 0; }
#notice { min-height: 1.6em; }
.lods-plots .block { min-width: 300px; }
#renders img { image-rendering: pixelated; max-width: 100%; height: auto; object-fit: contain; }
#renders .image-container, #renders .image-frame { height: auto; }
#cfg-log input[type="number"] { display: none; }
.lods-history { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; padding: 4px 0; }
.lods-history-head { font-size: 0.85em; opacity: 0.8; margin-top: 6px; }
.lods-frame { margin: 0; text-align: center; font-size: 0.75em; flex: 0 0 auto; }
.lods-frame img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.lods-mark { flex: 0 0 auto; align-self: stretch; border-left: 3px solid #ea580c; color: #ea580c;
  font-size: 0.75em; padding: 2px 4px; max-width: 90px; }
.lods-pane { margin: 0 0 10px 0; }
.lods-pane figcaption { font-weight: 600; margin-bottom: 2px; }
.lods-pane img { image-rendering: pixelated; max-width: 100%; height: auto; display: block; }
"""
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~$])")


def md_text(text: str) -> str:
    """User or library text shown inside Markdown: HTML-escaped, Markdown specials backslashed, one line."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def notice(text: str, error: bool = False) -> str:
    return f"⚠️ {md_text(text)}" if error else md_text(text)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def queue_text(manager: JobManager, viewer: str) -> str:
    """`` · your run is queued (position 1 of 2)`` / `` · 2 runs queued``, or nothing."""
    n = manager.queue_length()
    if not n:
        return ""
    pos = manager.queue_position(viewer)
    return f" · your run is queued (position {pos} of {n})" if pos else f" · {n} run{'s' * (n > 1)} queued"


def status_text(job: Job | None, viewer: str) -> str:
    """Two Markdown lines: the state with step, it/s and ETA; then what runs and for whom."""
    if job is None:
        return "**Ready.** Type a prompt, pick a method and press **Start**."
    state = job.state
    config = job.config
    snap = job.snapshot()
    step = job.trainer.step if job.trainer is not None else 0
    head = f"**{STATE_LABELS.get(state, state)}**"
    if state == "loading":
        head += f" {md_text(config.prior)}…"
    elif job.comparison is not None:
        steps_done = [t.step for t in job.comparison.trainers]
        head += f" · step {min(steps_done)} / {config.steps} (each of {len(steps_done)} runs)"
    elif job.trainer is not None:
        head += f" · step {step} / {config.steps}"
        rate = snap.it_per_s if snap is not None else 0.0
        if state in ("running", "paused") and rate > 0:
            head += f" · {rate:.2f} it/s"
            if state == "running":
                head += f" · ETA {duration((config.steps - step) / rate)}"
    if job.message and state in ("stopped", "diverged", "failed", "done"):
        head += f" · {md_text(job.message)}"
    what = (f"Comparison of {len(job.compare_configs)} runs (Compare tab)" if job.is_comparison
            else md_text(METHOD_LABELS.get(config.method, config.method)))
    cfg = "" if job.is_comparison else f"CFG {job.knob('cfg'):g}, "
    detail = (f"{what} on {BACKBONE_LABELS.get(config.backbone, config.backbone)}, prior {md_text(config.prior)}, "
              f"{cfg}prompt “{md_text(config.prompt)}”")
    if config.image3d.input_image and not job.is_comparison:
        detail = (f"Image to 3D, text prior: {detail}; weights: text {job.knob('text_weight'):g}, "
                  f"view {job.knob('view_weight'):g}  \n*Renders: above, the input and (for a world render) the "
                  f"world's true views at +90°, +180°, +270°; below, the render at the input camera and the "
                  f"generated views.*")
    if job.owner != viewer:
        detail += " · *started in another session: you are watching it read-only*"
    return f"{head}  \n{detail}"


MODEL_FILES = (".splat", ".glb", ".ply")  # what the 3D tab shows, in this order of preference


def result_model(paths: list[str]) -> str | None:
    """The file ``gr.Model3D`` shows: the splats with the training views' pixel filter (``scene.splat``,
    the colours and opacity of the renders), else a NeRF's mesh, else the raw ``scene.ply``."""
    for suffix in MODEL_FILES:
        found = next((p for p in paths if p.endswith(suffix)), None)
        if found:
            return found
    return None
