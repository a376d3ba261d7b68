"""The Studio tab: a run's setup on the left, the live run on the right (renders, 3D, plots, files).

:class:`StudioTab` holds the tab's callbacks (mixed into :class:`app.ui.Studio`, which gives them the job
manager, the settings and the session); :func:`studio_layout` lays out its components.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app.config import APP_METHODS, CFG_MAX, MAX_TEXT, build_run_config, default_learned_lr, learns_parameters
from app.format import BACKBONE_LABELS, METHOD_LABELS, notice, queue_text, result_model, status_text
from app.jobs import Job, NotOwner, one_line
from app.plots import PLOTS, metric_frame, placeholder_frame, plot_colors, preview_grid
from app.sessions import cached_copies, session_of
from lods.config import KNOB_LABELS
from lods.errors import UserError
from lods.runs import PRESETS


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

    @property
    def learned_lr(self) -> float:
        return default_learned_lr(self.method, "toy")


DEFAULTS = Defaults()


class StudioTab:
    """The Studio tab's callbacks; each returns plain values or component updates, never raises for bad input."""

    # ------------------------------------------------------------------ buttons

    def start(self, prompt: Any, negative_prompt: Any, prior: Any, custom_model: Any, backbone: Any, method: Any,
              cfg: Any, lr_scale: Any, learned_lr: Any, steps: Any, seed: Any,
              request: gr.Request = None) -> str:
        try:
            name = self.settings.policy.resolve(prior, custom_model)
            config = build_run_config(
                prompt=prompt, negative_prompt=negative_prompt, prior=name, backbone=backbone, method=method,
                cfg=cfg, lr_scale=lr_scale, learned_lr=learned_lr, steps=steps, seed=seed,
                max_steps=self.settings.max_steps, overrides=self.settings.run_overrides,
            )
            job = self.manager.start_or_queue(config, owner=self._session(request))
        except UserError as err:
            return notice(one_line(err), error=True)
        if isinstance(job, int):
            return notice(f"Another session's run is in progress: yours is queued (position {job}) and starts "
                          "when the device is free; keep this tab open.")
        return notice(f"Started run {job.id}.")

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
                    d.cfg, d.lr_scale, gr.update(value=d.learned_lr, interactive=True), d.steps, d.seed)
        return (*controls, message, *self._cleared(), {"dismissed": dismissed})

    # ------------------------------------------------------------------ live knobs

    def _knob(self, name: str, value: Any, request: gr.Request | None) -> str:
        try:
            job = self.manager.set_knobs(self._session(request), **{name: value})
        except UserError as err:
            return notice(one_line(err), error=True)
        if job is None:
            return ""
        return notice(f"{KNOB_LABELS[name]} set to {float(value):g}; it applies from the next step.")

    def set_cfg(self, value: Any, request: gr.Request = None) -> str:
        return self._knob("cfg", value, request)

    def set_lr_scale(self, value: Any, request: gr.Request = None) -> str:
        return self._knob("lr_scale", value, request)

    def set_learned_lr(self, value: Any, request: gr.Request = None) -> str:
        job = self.manager.current()
        if job is not None and job.active and not learns_parameters(job.config.method):
            return notice(f"{job.config.method} learns no parameters; the rate applies to your next run.")
        return self._knob("learned_lr", value, request)

    # ------------------------------------------------------------------ other controls

    @staticmethod
    def method_changed(method: Any, prior: Any) -> Any:
        learns = learns_parameters(method)
        return gr.update(value=default_learned_lr(method, prior), interactive=learns,
                         info="alpha or LoRA step size (live)" if learns else "this method learns no parameters")

    @staticmethod
    def backbone_changed(backbone: Any) -> Any:
        return gr.update(value=PRESETS.get(backbone, {}).get("steps", DEFAULTS.steps))

    def release(self, request: gr.Request = None) -> None:
        """The tab closed or reloaded: stop the run it owns, unless it polls again within the grace period.

        Gradio reports a closed tab when the page's heartbeat connection drops, which a network hiccup
        also does; a tab that is still open keeps polling and so keeps its run.
        """
        session, closed_at = session_of(request), time.monotonic()

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
        plots = [placeholder_frame(spec) for spec in PLOTS]
        return (status_text(None, ""), None, None, *plots, None, gr.update(value="Pause"))

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
        what the page shows: ``status``, ``snap`` (renders and plots) and ``phase`` (files, 3D, Pause label)."""
        job, kept = self._visible(view, me)
        keys: dict[str, Any] = {"status": status_text(job, me) + queue_text(self.manager, me)}
        snap = job.snapshot() if job is not None else None
        if job is None:
            keys.update(snap=None, phase=None)
        else:
            keys["snap"] = self._snap_key(job, snap)
            keys["phase"] = (job.id, job.state, len(job.files), kept.id if kept else None)
        return job, snap, kept, keys

    def _draw(self, key: Any, snap: Any) -> tuple[Any, list[Any]]:
        """The preview image and the plot frames of a snapshot, made once however many sessions watch it.

        The previews go out at their own resolution (the page enlarges them without smoothing), so
        that every update carries a small PNG."""
        with self._drawn_lock:
            if self._drawn[0] != key:
                self._drawn = (key, (preview_grid(snap.previews, min_side=64),
                                     [metric_frame(snap.history, snap.knob_changes, spec) for spec in PLOTS]))
            return self._drawn[1]

    def draw(self, view: dict | None, request: gr.Request = None) -> tuple:
        """renders and plots of the latest snapshot (run when the snapshot key changes)."""
        job, _ = self._visible(dict(view or {}), self._session(request))
        snap = job.snapshot() if job is not None else None
        if snap is None:
            return (None, *[placeholder_frame(spec) for spec in PLOTS])
        renders, plots = self._draw(self._snap_key(job, snap), snap)
        return (renders, *plots)

    def draw_phase(self, view: dict | None, request: gr.Request = None) -> tuple:
        """3D result, files, Pause label (run when the job's phase changes)."""
        me = self._session(request)
        return self._phase_outputs(*self._visible(dict(view or {}), me), me)

    @staticmethod
    def _phase_outputs(job: Any, kept: Any, me: str) -> tuple:
        if job is None:
            return None, None, gr.update(value="Pause")
        # Your own last run's files only: another session's run shows its renders, never its file URLs.
        mine = kept if kept is not None else (job if job.owner == me else None)
        paths = [str(p) for p in mine.files] if mine is not None else []
        model = result_model(paths)
        return model, paths or None, gr.update(value="Resume" if job.state == "paused" else "Pause")

    def poll(self, view: dict | None, request: gr.Request = None) -> tuple:
        """status, renders, 3D result, the plots, files, pause label, view state; unchanged parts skipped.

        Everything at once, for the page's first load and for API clients; the page's timer uses
        :meth:`watch` and the draw methods."""
        view = dict(view or {})
        me = self._session(request)
        job, snap, kept, keys = self._keys(view, me)
        changed = {k for k, v in keys.items() if view.get(k) != v}
        view.update(keys)
        if not changed:
            return (*[gr.skip()] * (5 + len(PLOTS)), view)
        if job is None:
            return (*self._cleared(), view)
        status = keys["status"] if "status" in changed else gr.skip()
        renders, plots = gr.skip(), [gr.skip()] * len(PLOTS)
        if "snap" in changed and snap is not None:
            renders, plots = self._draw(keys["snap"], snap)
        model, files, pause = gr.skip(), gr.skip(), gr.skip()
        if "phase" in changed:
            model, files, pause = self._phase_outputs(job, kept, me)
        return (status, renders, model, *plots, files, pause, view)


def studio_layout(settings: Any, defaults: Any) -> dict[str, Any]:
    """The tab's components (inside ``gr.Tab("Studio")``), by name."""
    d = defaults
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=2, max_lines=4, max_length=MAX_TEXT,
                                elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, max_length=MAX_TEXT,
                                  placeholder="empty: the null prompt, as in Stable Diffusion")
            with gr.Row():
                prior = gr.Dropdown(list(settings.policy.allowed), value=settings.default_prior,
                                    label="Prior (diffusion model)", elem_id="prior")
                custom = gr.Textbox(label="…or a Hugging Face model id", value=d.custom_model,
                                    placeholder="owner/name", visible=settings.policy.custom_ids,
                                    max_length=200)
            backbone = gr.Radio([(v, k) for k, v in BACKBONE_LABELS.items()], value=d.backbone,
                                label="Backbone")
            method = gr.Dropdown([(METHOD_LABELS.get(m, m), m) for m in APP_METHODS], value=d.method,
                                 label="Method")
            cfg = gr.Slider(1, CFG_MAX, value=d.cfg, step=0.5, label="CFG weight w", info="live",
                            elem_id="cfg")
            with gr.Row():
                lr_scale = gr.Slider(0, 10, value=d.lr_scale, step=0.05,
                                     label="Scene learning-rate scale", info="live")
                learned_lr = gr.Number(value=d.learned_lr, label="Learned-parameter learning rate",
                                       info="alpha or LoRA step size (live)", elem_id="learned-lr")
            with gr.Row():
                steps = gr.Number(value=d.steps, precision=0, label="Steps", elem_id="steps")
                seed = gr.Number(value=d.seed, precision=0, label="Seed")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                pause_btn = gr.Button("Pause", elem_id="pause")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                reset_btn = gr.Button("Reset", elem_id="reset")
            note = gr.Markdown("", elem_id="notice")
        with gr.Column(scale=3, min_width=420):
            status = gr.Markdown(status_text(None, ""), elem_id="status")
            with gr.Tabs():
                with gr.Tab("Renders"):
                    renders = gr.Image(label="Latest renders (preview views)", type="numpy", format="png",
                                       interactive=False, elem_id="renders")
                with gr.Tab("3D"):
                    if settings.viewer_html:
                        gr.HTML(settings.viewer_html)
                    else:
                        gr.Markdown("The live 3D viewer is not running; the finished scene appears below.")
                    model3d = gr.Model3D(label="Result scene", interactive=False)
            with gr.Row(elem_classes="lods-plots"):
                plots = [gr.LinePlot(placeholder_frame(spec), x="step", y="value", color="series",
                                     title=spec.title, color_map=plot_colors(spec), tooltip="all",
                                     height=220, x_title="step", y_title=spec.key, label=spec.title,
                                     show_label=False, min_width=260)
                         for spec in PLOTS]
            with gr.Accordion("What the plots show", open=False):
                gr.Markdown("\n".join(f"- **{spec.title}**: {spec.caption}" for spec in PLOTS)
                            + "\n- **knob change** (orange): a live change of CFG or a learning rate; "
                              "hover a tooth to see which")
            files = gr.File(label="Result files", file_count="multiple", interactive=False, elem_id="files")
    return dict(prompt=prompt, negative=negative, prior=prior, custom=custom, backbone=backbone, method=method,
                cfg=cfg, lr_scale=lr_scale, learned_lr=learned_lr, steps=steps, seed=seed, start_btn=start_btn,
                pause_btn=pause_btn, stop_btn=stop_btn, reset_btn=reset_btn, note=note, status=status,
                renders=renders, model3d=model3d, plots=plots, files=files)
