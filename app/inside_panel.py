"""The "Inside one step" panel: for the run on show, at a chosen timestep and view, the noisy latent and the
one-step denoised images under eps(y), eps(null), the learned prediction (LODS's alpha or LoRA) and the
guided one, the parts of the update with the effective CFG, their history over the run, and the
estimator's formula with its live constants (:mod:`lods.inside`).

:func:`inside_panel` lays out its components inside the current ``gr.Blocks`` and wires them to callbacks
that take the :class:`app.ui.Studio` (its job manager and sessions). Any session may look inside the run
it sees (as its renders, read-only); one look at a time, each holding the trainer's scene lock for a few
UNet passes.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from app.format import md_text, notice
from app.sessions import on_event_loop
from lods.config import RunConfig
from lods.errors import UserError, one_line
from lods.inside import look_inside

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]
TILE = 256  # px per image in the gallery (nearest-neighbour enlargement)
VIEWS = RunConfig().preview_views

# (title, y title, [(history key, series name, colour)])
PARTS_PLOTS = (
    ("Effective CFG", "weight", [("cfg", "w (the knob)", "#64748b"), ("eff_cfg", "effective w'", "#dc2626")]),
    ("Parts of the update (norms)", "norm per view", [
        ("classifier_norm", "classifier", "#2563eb"),
        ("denoising_norm", "denoising", "#16a34a"),
        ("drift_norm", "LODS drift", "#ea580c")]),
    ("Cosines", "cosine", [
        ("cos_drift_classifier", "drift·classifier", "#ea580c"),
        ("cos_drift_denoising", "drift·denoising", "#a855f7"),
        ("cos_classifier_denoising", "classifier·denoising", "#2563eb"),
        ("eff_cfg_r2", "SDS fit R²", "#64748b")]),
)
COLUMNS = ["step", "value", "series"]

NO_RUN = "Nothing to look inside yet: start a run in the Studio tab, then press Look inside."


def _frame(records: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    return frame.astype({"step": "int64", "value": "float64", "series": "string"})


def parts_frame(history: list[dict[str, Any]], spec: tuple, max_points: int = 200) -> pd.DataFrame:
    """Columns step, value, series for one of ``PARTS_PLOTS`` (each series thinned to ``max_points``); one
    invisible point per series where a series has no data, so that the plot keeps its legend and colours."""
    _, _, series = spec
    records: list[tuple] = []
    for key, name, _ in series:
        rows = [(int(h["step"]), float(h[key])) for h in history
                if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
        if len(rows) > max_points:
            stride = math.ceil(len(rows) / max_points)
            rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
        records += [(s, v, name) for s, v in rows] or [(0, float("nan"), name)]
    return _frame(records)


def _colors(spec: tuple) -> dict[str, str]:
    return {name: colour for _, name, colour in spec[2]}


def parts_table(parts: dict[str, float], learned: bool) -> str:
    """The parts of one look as a Markdown table, and the effective CFG in a sentence."""
    def f(key: str) -> str:
        v = parts.get(key)
        return "–" if v is None else f"{v:.3g}"

    rows = [
        "| part | norm | cos with classifier | cos with denoising |",
        "| --- | --- | --- | --- |",
        f"| classifier ε(y) − ε(∅) | {f('classifier_norm')} | 1 | {f('cos_classifier_denoising')} |",
        f"| denoising ε(∅) − ε | {f('denoising_norm')} | {f('cos_classifier_denoising')} | 1 |",
    ]
    if learned:
        rows.append(f"| LODS drift ε(learned) − ε(∅) | {f('drift_norm')} | {f('cos_drift_classifier')} | "
                    f"{f('cos_drift_denoising')} |")
    w = parts.get("cfg", math.nan)
    if "eff_cfg" in parts:
        share = parts.get("eff_cfg_r2", math.nan)
        text = (f"**Effective CFG {parts['eff_cfg']:.3g}** at w = {w:g}: the plain-SDS weight whose direction is "
                f"closest to this step's ({100 * share:.1f}% of it explained by that SDS direction). One t and "
                "one noise draw: the plot below has one per logged training step, at random t.")
    else:
        text = f"No effective CFG here (w = {w:g}): no plain-SDS weight points this way."
    return "\n".join(rows) + "\n\n" + text


def _empty_plots() -> list[pd.DataFrame]:
    return [parts_frame([], spec) for spec in PARTS_PLOTS]


def _job_trainer(studio: Any) -> tuple[Any, str | None]:
    """The trainer of the run this page shows, or None and a one-line reason."""
    job = studio.manager.current()
    if job is None:
        return None, NO_RUN
    if job.is_comparison:
        return None, "Inside one step looks at a Studio run; the run now is a Compare tab comparison."
    if job.trainer is None:
        return None, "The run is still loading; look again in a moment."
    return job.trainer, None


def look(studio: Any, t: Any, view: Any, seed: Any, request: gr.Request = None) -> tuple:
    """The "Look inside" button: notice, gallery, parts table, formula and the three plots."""
    studio._session(request)
    trainer, why = _job_trainer(studio)
    if trainer is None:
        return (notice(why), None, "", "", *_empty_plots())
    try:
        view_i = int(str(view).split()[-1]) - 1 if isinstance(view, str) else int(view) - 1
        t_i = float(t)
        seed_i = int(seed) if seed is not None and math.isfinite(float(seed)) else 0
        if not math.isfinite(t_i) or t_i != int(t_i):
            raise UserError(f"t must be a whole number, not {t!r}")
        inside = look_inside(trainer, t=int(t_i), view=view_i, seed=seed_i)
    except (UserError, ValueError, TypeError) as err:
        return (notice(one_line(err), error=True), gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * len(PARTS_PLOTS))
    except Exception as err:  # e.g. a finished LoRA run whose adapter went with its estimator
        return (notice(f"could not look inside this run: {type(err).__name__}: {one_line(err)}", error=True),
                gr.skip(), gr.skip(), gr.skip(), *[gr.skip()] * len(PARTS_PLOTS))
    gallery = []
    for name, img in inside.images.items():
        f = max(1, TILE // img.shape[0])
        gallery.append((np.ascontiguousarray(img.repeat(f, axis=0).repeat(f, axis=1)), name))
    learned = "drift_norm" in inside.parts
    msg = f"{inside.method} at step {inside.step}, t = {inside.t}, view {inside.view + 1}, w = {inside.cfg:g}."
    if inside.notes:
        msg += " " + "; ".join(inside.notes) + "."
    history = trainer.latest().history if trainer.latest() is not None else []
    plots = [parts_frame(history, spec) for spec in PARTS_PLOTS]
    return (md_text(msg), gallery, parts_table(inside.parts, learned), inside.formula, *plots)


def refresh(studio: Any, seen: Any, request: gr.Request = None) -> tuple:
    """The panel's timer: the three plots and the formula when the run's published history changed."""
    trainer, _ = _job_trainer(studio)
    snap = trainer.latest() if trainer is not None else None
    key = (id(trainer), snap.step, len(snap.history)) if snap is not None else None
    if key == seen:
        return (gr.skip(), *[gr.skip()] * len(PARTS_PLOTS), seen)
    if snap is None:
        return ("", *_empty_plots(), key)
    with trainer.lock:
        cfg = trainer.knobs.cfg
    return (trainer.estimator.formula(cfg, trainer.step), *[parts_frame(snap.history, s) for s in PARTS_PLOTS], key)


def inside_panel(studio: Any, poll_seconds: float = 2.0) -> dict[str, Any]:
    """Lay out the panel in the current Blocks (inside a tab or an accordion) and wire it to ``studio``."""
    gr.Markdown("What one update is made of, for the run on show: the render's latents noised to t, the "
                "clean image each noise prediction implies in one step, the parts of the update and the "
                "**effective CFG** (the plain-SDS weight whose direction is closest to the method's, fitted "
                "every step; for LODS it shows whether the learned embedding lowers the guidance).")
    with gr.Row(equal_height=False):
        t = gr.Slider(1, 999, value=500, step=1, label="Timestep t", elem_id="inside-t")
        view = gr.Radio([f"view {i + 1}" for i in range(VIEWS)], value="view 1", label="Preview view",
                        elem_id="inside-view")
        seed = gr.Number(0, precision=0, label="Noise seed", elem_id="inside-seed", min_width=100)
        button = gr.Button("Look inside", variant="primary", elem_id="inside-look", min_width=120, scale=0)
    note = gr.Markdown("", elem_id="inside-notice")
    gallery = gr.Gallery(label="One step: render, noisy latent, one-step denoised images", columns=6,
                         object_fit="contain", height=280, allow_preview=True, elem_id="inside-images")
    with gr.Row(equal_height=False):
        table = gr.Markdown("", elem_id="inside-parts")
        formula = gr.Markdown("", latex_delimiters=LATEX, elem_id="inside-formula")
    with gr.Row():
        plots = [gr.LinePlot(parts_frame([], spec), x="step", y="value", color="series", title=spec[0],
                             color_map=_colors(spec), tooltip="all", height=240, x_title="step", y_title=spec[1],
                             show_label=False, min_width=300)
                 for spec in PARTS_PLOTS]
    seen = gr.State(None)
    outputs = [note, gallery, table, formula, *plots]

    def on_look(t_value, view_value, seed_value, request: gr.Request = None):
        return look(studio, t_value, view_value, seed_value, request)

    def on_tick(seen_value, request: gr.Request = None):
        return refresh(studio, seen_value, request)

    button.click(on_look, [t, view, seed], outputs, api_name="look_inside", concurrency_limit=1,
                 concurrency_id="inside")
    timer = gr.Timer(poll_seconds)
    timer.tick(on_event_loop(on_tick), seen, [formula, *plots, seen], api_visibility="private", show_progress="hidden",
               trigger_mode="always_last")
    return dict(t=t, view=view, seed=seed, button=button, note=note, gallery=gallery, table=table,
                formula=formula, plots=plots, timer=timer)
