"""The Studio tab: a run's setup on the left, the live run on the right (renders, 3D, plots, files).

:class:`StudioTab` holds the tab's callbacks (mixed into :class:`app.ui.Studio`, which gives them the job
manager, the settings and the session); :func:`studio_layout` lays out its components.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from app.config import (
    APP_METHODS,
    CFG_MAX,
    MAX_TEXT,
    build_run_config,
    cfg_text,
    default_learned_lr,
    learns_parameters,
    page_knob,
    round_weight,
)
from app.format import BACKBONE_LABELS, METHOD_LABELS, md_text, notice, queue_text, result_model, status_text
from app.history import history_html
from app.jobs import Job, NotOwner, one_line
from app.plots import PLOTS, mark_names, metric_frame, placeholder_frame, plot_colors, preview_grid
from app.sessions import cached_copies, session_of
from lods.config import KNOB_LABELS, Image3DConfig
from lods.errors import UserError
from lods.guidance import METHODS
from lods.runs import PRESETS

CFG_QUICK = (7.5, 30.0, 100.0, 1000.0, math.inf)  # the one-click weights under the CFG box
PREVIEW_SIDE = 320  # each preview view is sent enlarged (nearest) to at least this many pixels
NO_WORLD_SCENE = -1
WORLD_SCENES = 9  # the held-out world scenes offered as input views: those of `bench image3d` (three a category)
IMAGE3D_HELP = (
    "With an input view the run is **image to 3D** (the paper's section 4.2, after Magic123): the render at the "
    "input camera learns the image, a view-conditioned prior (Zero-1-to-3 on the toy world) shapes the novel "
    "views, and the text prior, with the method and CFG above, gives their texture. An empty prompt takes the "
    "toy world's caption of the image. The renders show the input and, for a world render, its true views at "
    "+90°, +180° and +270° above; below, the render at the input camera and the generated views.")


@dataclass(frozen=True)
class Defaults:
    prompt: str = "a red cube"
    negative_prompt: str = ""
    custom_model: str = ""
    backbone: str = "gs"
    method: str = "lods-embed"
    cfg: float = 100.0
    lr_scale: float = 1.0
    steps: int = PRESETS["gs"]["steps"]
    seed: int = 0
    text_weight: float = Image3DConfig.text_weight
    view_weight: float = Image3DConfig.view_weight

    @property
    def learned_lr(self) -> float:
        return default_learned_lr(self.method, "toy")


DEFAULTS = Defaults()


class StudioTab:
    """The Studio tab's callbacks; each returns plain values or component updates, never raises for bad input."""

    # ------------------------------------------------------------------ buttons

    def start(self, prompt: Any, negative_prompt: Any, prior: Any, custom_model: Any, backbone: Any, method: Any,
              cfg: Any, lr_scale: Any, learned_lr: Any, steps: Any, seed: Any, image: Any = None,
              world_scene: Any = NO_WORLD_SCENE, text_weight: Any = None, view_weight: Any = None,
              request: gr.Request = None) -> str:
        """Start (or queue) a run; with an input view (an upload, or a world render picked) it is image-to-3D."""
        try:
            name = self.settings.policy.resolve(prior, custom_model)
            config = build_run_config(
                prompt=prompt, negative_prompt=negative_prompt, prior=name, backbone=backbone, method=method,
                cfg=cfg, lr_scale=lr_scale, learned_lr=learned_lr, steps=steps, seed=seed,
                max_steps=self.settings.max_steps, overrides=self.settings.run_overrides,
                image=self.input_view(image, world_scene), text_weight=text_weight, view_weight=view_weight,
            )
            job = self.manager.start_or_queue(config, owner=self._session(request))
        except UserError as err:
            return notice(one_line(err), error=True)
        if isinstance(job, int):
            return notice(f"Another session's run is in progress: yours is queued (position {job}) and starts "
                          "when the device is free; keep this tab open.")
        return notice(f"Started run {job.id}.")

    def input_view(self, image: Any, world_scene: Any) -> str | None:
        """The input view's path: a picked world render (written once, with its JSON of caption and camera, so
        that the run measures its novel views against the world's), else the upload, else None (text-to-3D)."""
        if world_scene not in (None, "", NO_WORLD_SCENE):
            from lods.runs.image3d import world_input

            index = int(_number_or(world_scene, -1))
            if not 0 <= index < WORLD_SCENES:
                raise UserError(f"there is no world scene {md_text(str(world_scene))[:20]}")
            path = self._inputs_dir() / f"world-scene-{index}.png"
            if not path.is_file():
                world_input(path, index)
            return str(path)
        if image is None or image == "":
            return None
        if not isinstance(image, str):
            raise UserError("the input view must be an uploaded image file")
        return image

    def world_picked(self, world_scene: Any) -> Any:
        """A world render picked: it shows in the input box (or a one-line error where it cannot be made)."""
        try:
            path = self.input_view(None, world_scene)
        except UserError as err:
            gr.Warning(one_line(err))
            return gr.skip()
        return path

    @staticmethod
    def reset_input() -> tuple:
        """Reset: no input view, Magic123's weights."""
        return None, NO_WORLD_SCENE, DEFAULTS.text_weight, DEFAULTS.view_weight

    def _inputs_dir(self) -> Path:
        if self._world_inputs is None:  # made on first use: most pages never pick a world render
            self._world_inputs = Path(tempfile.mkdtemp(prefix="lods-inputs-"))
        return self._world_inputs

    def _toggle_pause(self, job: Job, request: gr.Request | None) -> tuple[str, bool | None]:
        """Pause a running job or resume a paused one; the notice and the new paused state (None: refused)."""
        pause = job.state != "paused"
        try:
            self.manager.set_paused(self._session(request), pause)
        except UserError as err:
            return notice(one_line(err), error=True), None
        return notice("Paused." if pause else "Resumed."), pause

    def toggle_pause(self, request: gr.Request = None) -> tuple[str, Any]:
        job = self.manager.current()
        if job is None or not job.active:
            return notice("Nothing is running."), gr.update(value="Pause")
        message, paused = self._toggle_pause(job, request)
        return message, gr.skip() if paused is None else gr.update(value="Resume" if paused else "Pause")

    def stop(self, request: gr.Request = None) -> str:
        try:
            job = self.manager.stop(self._session(request))
        except UserError as err:
            return notice(one_line(err), error=True)
        if job is None:
            return notice("Nothing is running.")
        return notice("Stopping: the result files appear below once they are written.")

    def reset(self, view: dict, request: gr.Request = None) -> tuple:
        """Restore every default and clear the view; this session's own run is stopped and its files deleted.

        Another session's finished run only disappears from this tab; its running one cannot be reset here.
        """
        job = self.manager.current()
        message, dismissed = "", view.get("dismissed", 0)
        me = self._session(request)
        kept = self.manager.kept(me)
        served = [*(kept.files if kept else []), *(job.files if job is not None and job.owner == me else [])]
        cached = dict(zip(served, cached_copies(served)))
        if job is not None or kept is not None:
            try:
                self.manager.discard(me)
                dismissed = job.id if job is not None else dismissed
            except NotOwner as err:
                if job.active:
                    message = notice(one_line(err), error=True)
                else:
                    dismissed = job.id
            except UserError as err:
                message = notice(one_line(err), error=True)
        for source, folder in cached.items():
            if not Path(source).exists():  # its run's folder went: Gradio's copy goes too
                shutil.rmtree(folder, ignore_errors=True)
        d = DEFAULTS
        controls = (d.prompt, d.negative_prompt, self.settings.default_prior, d.custom_model, d.backbone, d.method,
                    cfg_text(d.cfg), math.log10(d.cfg), d.lr_scale,
                    gr.update(value=d.learned_lr, interactive=True), d.steps, d.seed)
        if message:  # the run goes on: its view stays
            return (*controls, message, *[gr.skip()] * (len(self._cleared())), {**view})
        return (*controls, message, *self._cleared(), {"dismissed": dismissed})

    def run_controls(self, view: dict | None, request: gr.Request = None) -> tuple:
        """The setup controls showing the run this page displays (after a reload): your own run, or another
        session's run while it goes; unchanged otherwise (another session's finished run is only shown)."""
        me = self._session(request)
        job, _ = self._visible(dict(view or {}), me)
        if job is None or job.is_comparison or (job.owner != me and not job.active):
            return tuple(gr.skip() for _ in range(12))
        c = job.config
        cfg, lr_scale, learned = job.knob("cfg"), job.knob("lr_scale"), job.knob("learned_lr")
        listed = c.prior in self.settings.policy.allowed
        learns = learns_parameters(c.method)
        return (c.prompt, c.negative_prompt, c.prior if listed else gr.skip(), "" if listed else c.prior,
                c.backbone, c.method, cfg_text(cfg), _slider(cfg), lr_scale,
                gr.update(value=learned if learned is not None else default_learned_lr(c.method, c.prior),
                          interactive=learns), c.steps, c.seed)

    # ------------------------------------------------------------------ live knobs

    def _knob(self, name: str, value: Any, request: gr.Request | None) -> str:
        try:
            job = self.manager.set_knobs(self._session(request), **{name: value})
        except UserError as err:
            return notice(one_line(err), error=True)
        if job is None:
            return ""
        return notice(f"{KNOB_LABELS[name]} set to {page_knob(name, value):g}; it applies from the next step.")

    def set_cfg(self, value: Any, request: gr.Request = None) -> tuple[str, Any, Any]:
        """Apply the weight typed in the CFG box (Enter or leaving the box): the notice, the box, the slider.

        Before a run the weight only goes into the box and the slider (the next Start uses it)."""
        try:
            weight = page_knob("cfg", value)
        except UserError as err:
            return notice(one_line(err), error=True), gr.skip(), gr.skip()
        message = self._knob("cfg", weight, request)
        if message.startswith("⚠️"):
            return message, gr.skip(), gr.skip()
        return message, cfg_text(weight), _slider(weight)

    def set_cfg_log(self, log10_w: Any, request: gr.Request = None) -> tuple[str, Any, Any]:
        """The log-scale slider was released at ``log10_w``: its weight, rounded to two digits, applies."""
        try:
            weight = round_weight(float(log10_w))
        except (TypeError, ValueError):
            return notice("the CFG slider sent no number", error=True), gr.skip(), gr.skip()
        return self.set_cfg(weight, request)

    def set_lr_scale(self, value: Any, request: gr.Request = None) -> str:
        return self._knob("lr_scale", value, request)

    def _weight(self, name: str, value: Any, request: gr.Request | None) -> str:
        job = self.manager.current()
        if job is not None and job.active and not job.is_comparison and job.knob(name) is None:
            return notice("This run is text-to-3D; the priors' weights apply to runs with an input view.")
        return self._knob(name, value, request)

    def set_text_weight(self, value: Any, request: gr.Request = None) -> str:
        return self._weight("text_weight", value, request)

    def set_view_weight(self, value: Any, request: gr.Request = None) -> str:
        return self._weight("view_weight", value, request)

    def set_learned_lr(self, value: Any, request: gr.Request = None) -> str:
        job = self.manager.current()
        if job is not None and job.active and not learns_parameters(job.config.method):
            return notice(f"{job.config.method} learns no parameters; the rate applies to your next run.")
        return self._knob("learned_lr", value, request)

    # ------------------------------------------------------------------ other controls

    @staticmethod
    def method_changed(method: Any, prior: Any, learned_lr: Any = None) -> tuple[Any, Any]:
        """The learned-rate box and the ∞ button follow the method (``learns``, ``finite_cfg_only``); the rate
        becomes the method's default unless the box holds a rate someone typed (no method's default)."""
        rules = StudioTab.method_rules(method)
        defaults = {default_learned_lr(m, p) for m in APP_METHODS for p in (prior, "toy")}
        if learned_lr in (None, "") or learned_lr in defaults:
            return gr.update(value=default_learned_lr(method, prior), **_fields(rules[0])), rules[1]
        return rules

    @staticmethod
    def method_rules(method: Any) -> tuple[Any, Any]:
        """The learned-rate box and the ∞ button follow a method set by Reset or a reload (values kept)."""
        learns = learns_parameters(method)
        finite = method in METHODS and METHODS[method].finite_cfg_only
        return (gr.update(interactive=learns,
                          info="alpha or LoRA step size (live)" if learns else "this method learns no parameters"),
                gr.update(interactive=not finite))

    @staticmethod
    def backbone_changed(backbone: Any, steps: Any = None) -> Any:
        """The steps become the backbone's default, unless the box holds a number someone typed."""
        defaults = {DEFAULTS.steps, *(preset.get("steps") for preset in PRESETS.values())}
        if steps not in (None, "") and steps not in defaults:
            return gr.skip()
        return gr.update(value=PRESETS.get(backbone, {}).get("steps", DEFAULTS.steps))

    def release(self, request: gr.Request = None) -> None:
        """The tab closed or reloaded: stop the run it owns, unless it polls again within the grace period.

        Gradio reports a closed tab when the page's heartbeat connection drops, which a network hiccup
        also does; a tab that is still open keeps polling and so keeps its run, and so does a reloaded
        one (its owner token comes back from the browser's storage, :meth:`app.ui.Studio.claim`).
        """
        session, closed_at = self._who(request), time.monotonic()
        self._owners.pop(session_of(request), None)  # that page is gone; a reload claims its token again

        def stop_if_gone() -> None:
            if self._seen.get(session, 0.0) <= closed_at:
                self._seen.pop(session, None)
                self.manager.release(session)

        if self.settings.unload_grace_s <= 0:
            stop_if_gone()
            return
        timer = threading.Timer(self.settings.unload_grace_s, stop_if_gone)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ polling

    def _cleared(self) -> tuple:
        """Idle values of the poll's outputs (without the view state)."""
        plots = [_plot_update(spec, placeholder_frame(spec), [], True) for spec in PLOTS]
        return (status_text(None, ""), None, None, *plots, history_html([], []), None,
                *_buttons(None, ""))

    def _visible(self, view: dict, me: str) -> tuple[Any, Any]:
        """The job this session sees (None once it dismissed it) and its finished run kept with its files."""
        job = self.manager.current()
        if job is not None and job.id <= view.get("dismissed", 0):
            job = None
        kept = self.manager.kept(me)
        if kept is not None and job is not None and job.owner == me:
            kept = None
        return job, kept

    @staticmethod
    def _snap_key(job: Any, snap: Any) -> Any:
        return (job.id, snap.step, len(snap.knob_changes), snap.status) if snap is not None else job.id

    def _keys(self, view: dict, me: str) -> tuple[Any, Any, Any, dict[str, Any]]:
        """The job this session sees, its latest snapshot, the finished run it keeps, and comparable keys of
        what the page shows: ``status``, ``snap`` (renders and plots) and ``phase`` (files, 3D, buttons)."""
        job, kept = self._visible(view, me)
        keys: dict[str, Any] = {"status": status_text(job, me) + queue_text(self.manager, me)}
        snap = job.snapshot() if job is not None else None
        if job is None:
            keys.update(snap=None, phase=None)
        else:
            keys["snap"] = self._snap_key(job, snap)
            keys["phase"] = (job.id, job.state, len(job.files), kept.id if kept else None)
        return job, snap, kept, keys

    def _draw(self, key: Any, job: Any, snap: Any) -> tuple[Any, list[Any], str]:
        """The preview image, the plot updates and the render history of a snapshot, made once however many
        sessions watch it.

        The previews go out enlarged (nearest) to ``PREVIEW_SIDE`` pixels per view, two views a row, and
        the page draws them pixelated; the plots that do not apply to the run's method are hidden."""
        with self._drawn_lock:
            if self._drawn[0] != key:
                method, backbone = job.config.method, job.config.backbone
                changes = list(snap.knob_changes)
                plots = [_plot_update(spec, metric_frame(snap.history, changes, spec), changes,
                                      spec.applies(method, backbone)) for spec in PLOTS]
                frames = self.history.frames(job.trainer) if job.trainer is not None else []
                if hasattr(job.trainer, "reference_row"):  # image to 3D: the input and the world's views above
                    views = torch.cat([job.trainer.reference_row(), snap.previews.float()])
                    grid = preview_grid(views, min_side=PREVIEW_SIDE * 3 // 4, cols=len(snap.previews))
                else:
                    grid = preview_grid(snap.previews, min_side=PREVIEW_SIDE, cols=2)
                self._drawn = (key, (grid, plots, history_html(frames, changes)))
            return self._drawn[1]

    def draw(self, view: dict | None, request: gr.Request = None) -> tuple:
        """renders, plots and render history of the latest snapshot (run when the snapshot key changes)."""
        job, _ = self._visible(dict(view or {}), self._session(request))
        snap = job.snapshot() if job is not None else None
        if snap is None:
            cleared = self._cleared()
            return (None, *cleared[3:3 + len(PLOTS)], history_html([], []))
        renders, plots, strip = self._draw(self._snap_key(job, snap), job, snap)
        return (renders, *plots, strip)

    def draw_phase(self, view: dict | None, request: gr.Request = None) -> tuple:
        """3D result, files, the buttons' states and the notice (run when the job's phase changes)."""
        me = self._session(request)
        return self._phase_outputs(*self._visible(dict(view or {}), me), me)

    @staticmethod
    def _phase_outputs(job: Any, kept: Any, me: str) -> tuple:
        """model, files, Pause, Start, Stop, Reset and the notice: once a run of yours has ended, the notice
        no longer speaks of it stopping."""
        if job is None:
            return (None, None, *_buttons(None, me), gr.skip())
        # Your own last run's files only: another session's run shows its renders, never its file URLs.
        mine = kept if kept is not None else (job if job.owner == me else None)
        paths = [str(p) for p in mine.files] if mine is not None else []
        model = result_model(paths)
        note: Any = gr.skip()
        if not job.active and job.owner == me:
            note = notice(f"Run {job.id} {job.phase}; its result files are below.") if job.files else ""
        return (model, paths or None, *_buttons(job, me), note)

    def poll(self, view: dict | None, request: gr.Request = None) -> tuple:
        """status, renders, 3D result, the plots, render history, files, buttons, view state; unchanged parts
        skipped.

        Everything at once, for the page's first load and for API clients; the page's timer uses
        :meth:`watch` and the draw methods."""
        view = dict(view or {})
        me = self._session(request)
        job, snap, kept, keys = self._keys(view, me)
        changed = {k for k, v in keys.items() if view.get(k) != v}
        view.update(keys)
        n_out = len(self._cleared())
        if not changed:
            return (*[gr.skip()] * n_out, view)
        if job is None:
            return (*self._cleared(), view)
        status = keys["status"] if "status" in changed else gr.skip()
        renders, plots, strip = gr.skip(), [gr.skip()] * len(PLOTS), gr.skip()
        if "snap" in changed and snap is not None:
            renders, plots, strip = self._draw(keys["snap"], job, snap)
        model, files, *buttons = [gr.skip()] * 6
        if "phase" in changed:
            model, files, *buttons = self._phase_outputs(job, kept, me)[:-1]
        return (status, renders, model, *plots, strip, files, *buttons, view)


def _number_or(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def world_scene_choices() -> list[tuple[str, int]]:
    """The input-view picker's entries: none, then the view-conditioned prior's held-out world scenes."""
    from lods.priors.toy.views import held_out_scene

    return [("none (text to 3D, or the upload)", NO_WORLD_SCENE)] + [
        (f"world scene {i}: {held_out_scene(i).caption}", i) for i in range(WORLD_SCENES)]


def _fields(update: dict) -> dict:
    return {k: v for k, v in update.items() if k != "__type__"}


def _slider(weight: float) -> float:
    """The log-scale slider's position for ``weight`` (its right end for the infinite weight)."""
    return math.log10(min(weight, CFG_MAX))


def _plot_update(spec: Any, frame: Any, changes: list, visible: bool) -> Any:
    return gr.update(value=frame, visible=visible, color_map=plot_colors(spec, changes),
                     colors_in_legend=mark_names(changes))


def _buttons(job: Any, me: str) -> tuple:
    """Pause (its label), Start, Stop and Reset as the displayed run allows: Start waits while your own run
    goes (another session's Start queues), Pause and Stop need your active run, Reset a run to clear."""
    yours = job is not None and job.owner == me
    going = job is not None and job.active
    return (gr.update(value="Resume" if going and job.state == "paused" else "Pause", interactive=yours and going),
            gr.update(interactive=not (yours and going)),
            gr.update(interactive=yours and going),
            gr.update(interactive=job is not None and (yours or not going)))


def _quick_label(weight: float) -> str:
    return "∞" if math.isinf(weight) else f"{weight:g}"


def studio_layout(settings: Any, defaults: Any) -> dict[str, Any]:
    """The tab's components (inside ``gr.Tab("Studio")``), by name.

    Left: what a run is, then the live knobs, with Start within the first screen at 1400 x 1000. The CFG
    weight is a box (Enter or leaving it applies what was typed), one-click weights, and a slider over
    log10 w (released: the weight, to two digits, applies). Right: the previews, two views a row at 256 px
    or more each, the render history, and the plots."""
    d = defaults
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=1, max_lines=4, max_length=MAX_TEXT,
                                elem_id="prompt")
            with gr.Row():
                prior = gr.Dropdown(list(settings.policy.allowed), value=settings.default_prior,
                                    label="Prior (diffusion model)", elem_id="prior")
                method = gr.Dropdown([(METHOD_LABELS.get(m, m), m) for m in APP_METHODS], value=d.method,
                                     label="Method", elem_id="method")
            backbone = gr.Radio([(v, k) for k, v in BACKBONE_LABELS.items()], value=d.backbone,
                                label="Backbone")
            with gr.Row(equal_height=True, elem_id="cfg-row"):
                cfg = gr.Textbox(value=cfg_text(d.cfg), label="CFG weight w", info="live: type, press Enter",
                                 max_length=24, elem_id="cfg", scale=1, min_width=130)
                cfg_log = gr.Slider(0, math.log10(CFG_MAX), value=_slider(d.cfg), step=0.005,
                                    label="…or drag (log scale)", info="1 · 10 · 100 · 1000 · 10000", buttons=[],
                                    elem_id="cfg-log", scale=2, min_width=200)
            with gr.Row(elem_id="cfg-quick-row"):
                quick = [gr.Button(f"w = {_quick_label(w)}", size="sm", min_width=60, elem_classes="cfg-quick",
                                   elem_id=f"cfg-{_quick_label(w).replace('.', '_').replace('∞', 'inf')}")
                         for w in CFG_QUICK]
            with gr.Row():
                steps = gr.Number(value=d.steps, precision=0, label="Steps", elem_id="steps", min_width=100)
                seed = gr.Number(value=d.seed, precision=0, label="Seed", min_width=100)
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start", min_width=70)
                pause_btn = gr.Button("Pause", elem_id="pause", min_width=70, interactive=False)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", min_width=70, interactive=False)
                reset_btn = gr.Button("Reset", elem_id="reset", min_width=70, interactive=False)
            note = gr.Markdown("", elem_id="notice")
            with gr.Row():
                lr_scale = gr.Slider(0, 10, value=d.lr_scale, step=0.05,
                                     label="Scene learning-rate scale", info="live")
                learned_lr = gr.Number(value=d.learned_lr, label="Learned-parameter learning rate",
                                       info="alpha or LoRA step size (live)", elem_id="learned-lr")
            with gr.Accordion("Image to 3D: an input view (optional)", open=False, elem_id="image3d"):
                gr.Markdown(IMAGE3D_HELP)
                with gr.Row():
                    image_in = gr.Image(type="filepath", image_mode="RGBA", sources=["upload", "clipboard"],
                                        label="Input view", height=180, elem_id="image-in")
                    world_pick = gr.Dropdown(world_scene_choices(), value=NO_WORLD_SCENE,
                                             label="…or a world render (its true novel views are known)",
                                             elem_id="world-pick")
                with gr.Row():
                    text_weight = gr.Slider(0, 10, value=d.text_weight, step=0.1, label="Text prior's weight",
                                            info="live; texture (the method above)", elem_id="text-weight")
                    view_weight = gr.Slider(0, 200, value=d.view_weight, step=1, label="View prior's weight",
                                            info="live; shape (Zero-1-to-3 SDS)", elem_id="view-weight")
            negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, max_length=MAX_TEXT,
                                  placeholder="empty: the null prompt, as in Stable Diffusion")
            custom = gr.Textbox(label="…or a Hugging Face model id", value=d.custom_model,
                                placeholder="owner/name", visible=settings.policy.custom_ids, max_length=200)
        with gr.Column(scale=3, min_width=560):
            status = gr.Markdown(status_text(None, ""), elem_id="status")
            with gr.Tabs():
                with gr.Tab("Renders"):
                    renders = gr.Image(type="numpy", format="png", interactive=False, show_label=False,
                                       buttons=[], elem_id="renders")
                    history = gr.HTML(history_html([], []), elem_id="history")
                with gr.Tab("3D"):
                    if settings.viewer_html:
                        gr.HTML(settings.viewer_html)
                    else:
                        gr.Markdown("The live 3D viewer is not running; the finished scene appears below.")
                    model3d = gr.Model3D(label="Result scene", interactive=False)
            with gr.Row(elem_classes="lods-plots"):
                plots = [gr.LinePlot(placeholder_frame(spec), x="step", y="value", color="series",
                                     title=spec.title, color_map=plot_colors(spec), colors_in_legend=[],
                                     tooltip="all", height=240, x_title="step", y_title=spec.y_title,
                                     color_title="marks", label=spec.title, show_label=False, min_width=300,
                                     elem_id=f"plot-{spec.key}")
                         for spec in PLOTS]
            with gr.Accordion("What the plots show", open=False):
                gr.Markdown("\n".join(f"- **{spec.title}**: {spec.caption}" for spec in PLOTS)
                            + "\n- **marks** (orange, purple, green): a live change of CFG or a learning rate, "
                              "named in the legend (`w 100 → 7.5 @ 120`: at step 120); a plot the method does "
                              "not log is hidden")
            files = gr.File(label="Result files", file_count="multiple", interactive=False, elem_id="files")
    return dict(prompt=prompt, negative=negative, prior=prior, custom=custom, backbone=backbone, method=method,
                cfg=cfg, cfg_log=cfg_log, cfg_quick=quick, lr_scale=lr_scale, learned_lr=learned_lr, steps=steps,
                seed=seed, start_btn=start_btn, pause_btn=pause_btn, stop_btn=stop_btn, reset_btn=reset_btn,
                note=note, status=status, renders=renders, history=history, model3d=model3d, plots=plots,
                files=files, image_in=image_in, world_pick=world_pick, text_weight=text_weight,
                view_weight=view_weight)
