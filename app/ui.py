"""The LODS Studio page: one module per tab (``app/studio_tab.py``, ``app/compare_tab.py``), the page's text
(``app/format.py``), and here the settings, the session, the timer shared by both tabs and the wiring.

Every callback is a method of :class:`Studio`, which knows the :class:`~app.jobs.JobManager` and the operator's
:class:`AppSettings` and nothing else; :func:`build_demo` only lays out the tabs and wires events. A ``gr.Timer``
polls the job (the trainer runs in its own thread) and each output is re-sent only when what it shows has
changed. Bad input never reaches the job: it becomes a one-line notice under the buttons.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.compare_tab import CompareTab, compare_layout
from app.config import ModelPolicy
from app.format import CSS, TITLE, md_text, result_model, status_text
from app.inside_panel import inside_panel
from app.jobs import JobManager
from app.sessions import on_event_loop, session_of
from app.studio_tab import DEFAULTS, StudioTab, studio_layout

__all__ = ["AppSettings", "Studio", "build_demo", "launch_options", "md_text", "result_model", "status_text"]


@dataclass
class AppSettings:
    """What the operator decides on the command line; nothing here comes from the page."""

    policy: ModelPolicy = field(default_factory=ModelPolicy)
    default_prior: str = "toy"
    run_overrides: dict[str, Any] = field(default_factory=dict)  # merged into every RunConfig
    max_steps: int = 20_000
    poll_seconds: float = 0.75
    watch_poll_seconds: float = 2.0  # the timer of a session watching another session's active run
    unload_grace_s: float = 5.0  # a closed heartbeat stops the tab's run unless the tab polls again within this
    viewer_html: str = ""  # the live 3D panel (app/viewer_link.py); empty: no live viewer




class Studio(StudioTab, CompareTab):
    """The page's callbacks: the Studio tab's, the Compare tab's, and the timer that serves both."""

    def __init__(self, manager: JobManager, settings: AppSettings) -> None:
        self.manager = manager
        self.settings = settings
        self._seen: dict[str, float] = {}  # session -> time of its latest request (time.monotonic)
        self._drawn: tuple[Any, Any] = (None, None)  # (snapshot key, (renders, plots)): shared by every session
        self._drawn_lock = threading.Lock()

    def _session(self, request: gr.Request | None) -> str:
        session = session_of(request)
        self._seen[session] = time.monotonic()
        self.manager.touch(session)
        return session

    def watch(self, view: dict | None, compare_view: dict | None, request: gr.Request = None) -> tuple:
        """The page's timer: both tabs' status lines and the keys of what changed, nothing heavy.

        Returns status, snap key, phase key, compare status, compare key, view, compare view, and the
        timer's interval when it changes: a session watching another session's run polls every
        ``watch_poll_seconds`` (2 s), the run's owner and an idle page every ``poll_seconds``. The keys are
        ``gr.State`` values: when one changes, its ``.change`` event draws that part (renders and plots,
        files, the Compare tab's gallery) once per change instead of on every tick, so a tick that finds
        nothing new costs a few string comparisons."""
        me = self._session(request)
        view, compare_view = dict(view or {}), dict(compare_view or {})
        job, _, _, keys = self._keys(view, me)
        _, c_keys = self._compare_keys(me)
        status = keys["status"] if view.get("status") != keys["status"] else gr.skip()
        c_status = c_keys["status"] if compare_view.get("status") != c_keys["status"] else gr.skip()
        watching = job is not None and job.active and job.owner != me
        interval = self.settings.watch_poll_seconds if watching else self.settings.poll_seconds
        timer = gr.Timer(value=interval) if view.get("interval") != interval else gr.skip()
        keys["interval"] = interval
        view.update(keys)
        compare_view.update(c_keys)
        return status, keys["snap"], keys["phase"], c_status, c_keys["steps"], view, compare_view, timer


def build_demo(manager: JobManager, settings: AppSettings | None = None,
               on_load_js: str | None = None) -> gr.Blocks:
    """The page. ``on_load_js`` runs in the browser once the page has loaded (the viewer's iframe address)."""
    settings = settings or AppSettings()
    studio = Studio(manager, settings)
    d = DEFAULTS
    # Gradio keeps a copy of every file it serves (each preview too); copies older than an hour go.
    with gr.Blocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            f"# {TITLE}\n"
            "Text-to-3D by score distillation from a 2D diffusion model. **LODS** (Learn to Optimize Denoising "
            "Scores) learns the unconditional embedding, or a LoRA, while the scene trains. Turn the CFG weight "
            "during a run and watch saturation and floaters respond."
        )
        view = gr.State({})
        with gr.Tabs():
            with gr.Tab("Studio"):
                s = studio_layout(settings, d)
            with gr.Tab("Compare", elem_id="compare-tab"):
                c = compare_layout(settings, d)
            with gr.Tab("Inside one step", elem_id="inside-tab"):
                inside_panel(studio)
        prompt, negative, prior, custom, backbone, method, cfg, lr_scale, learned_lr, steps, seed = (
            s[k] for k in ("prompt", "negative", "prior", "custom", "backbone", "method", "cfg", "lr_scale",
                           "learned_lr", "steps", "seed"))
        start_btn, pause_btn, stop_btn, reset_btn, note = (s[k] for k in ("start_btn", "pause_btn", "stop_btn",
                                                                            "reset_btn", "note"))
        status, renders, model3d, plots, files = (s[k] for k in ("status", "renders", "model3d", "plots", "files"))
        compare_view, c_prompt, c_prior, c_backbone, c_steps, c_seed, c_preset, slot_inputs = (
            c[k] for k in ("compare_view", "prompt", "prior", "backbone", "steps", "seed", "preset", "slots"))
        c_start, c_pause, c_stop, c_note, c_status, c_gallery, c_table, c_files = (
            c[k] for k in ("start", "pause", "stop", "note", "status", "gallery", "table", "files"))

        setup = [prompt, negative, prior, custom, backbone, method, cfg, lr_scale, learned_lr, steps, seed]
        polled = [status, renders, model3d, *plots, files, pause_btn, view]
        quick: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        start_btn.click(studio.start, setup, note, api_name="start")
        pause_btn.click(studio.toggle_pause, None, [note, pause_btn], api_name="pause", **quick)
        stop_btn.click(studio.stop, None, note, api_name="stop", **quick)
        reset_btn.click(studio.reset, view, [*setup, note, *polled], api_name="reset")
        cfg.release(on_event_loop(studio.set_cfg), cfg, note, api_name="set_cfg", **quick)
        lr_scale.release(on_event_loop(studio.set_lr_scale), lr_scale, note, api_name="set_lr_scale", **quick)
        gr.on([learned_lr.submit, learned_lr.blur], on_event_loop(studio.set_learned_lr), learned_lr, note,
              api_name="set_learned_lr", **quick)
        gr.on([method.change, prior.change], studio.method_changed, [method, prior], learned_lr,
              api_visibility="private", **quick)
        backbone.change(studio.backbone_changed, backbone, steps, api_visibility="private", **quick)
        c_preset.change(studio.compare_preset, c_preset, slot_inputs, api_visibility="private", **quick)
        c_start.click(studio.compare_start, [c_prompt, c_prior, c_backbone, c_steps, c_seed, *slot_inputs], c_note,
                      api_name="compare_start")
        c_pause.click(studio.compare_pause, None, c_note, api_name="compare_pause", **quick)
        c_stop.click(studio.stop, None, c_note, api_name="compare_stop", **quick)
        compare_polled = [c_status, c_gallery, c_table, c_files, compare_view]
        # The timer only compares keys; each part of the page is drawn when its key (a gr.State) changes.
        snap_key, phase_key, compare_key = gr.State(None), gr.State(None), gr.State(None)
        timer = gr.Timer(settings.poll_seconds)
        timer.tick(on_event_loop(studio.watch), [view, compare_view],
                   [status, snap_key, phase_key, c_status, compare_key, view, compare_view, timer],
                   api_name="watch",
                   trigger_mode="always_last", **quick)
        snap_key.change(studio.draw, view, [renders, *plots], api_name="draw", trigger_mode="always_last", **quick)
        phase_key.change(studio.draw_phase, view, [model3d, files, pause_btn], api_name="draw_phase", **quick)
        compare_key.change(studio.compare_draw, None, [c_gallery, c_table, c_files], api_name="compare_draw",
                           trigger_mode="always_last", **quick)
        # The first load (and API clients) get everything at once.
        demo.load(studio.poll, view, polled, api_name="poll", **quick)
        demo.load(studio.compare_poll, compare_view, compare_polled, api_name="compare_poll", **quick)
        if on_load_js:
            demo.load(None, js=on_load_js)
        demo.unload(studio.release)
    return demo




def launch_options() -> dict[str, Any]:
    """Styling arguments of ``demo.launch`` (Gradio 6 takes them there, not in ``gr.Blocks``)."""
    return {"css": CSS, "theme": gr.themes.Soft(), "run_history": False}  # no browser log of every poll

