"""The LODS Studio page: one module per tab (``app/studio_tab.py``, ``app/compare_tab.py``), the page's text
(``app/format.py``), and here the settings, the session, the timer shared by both tabs and the wiring.

Every callback is a method of :class:`Studio`, which knows the :class:`~app.jobs.JobManager` and the operator's
:class:`AppSettings` and nothing else; :func:`build_demo` only lays out the tabs and wires events. A ``gr.Timer``
polls the job (the trainer runs in its own thread) and each output is re-sent only when what it shows has
changed. Bad input never reaches the job: it becomes a one-line notice under the buttons.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app.compare_tab import CompareTab, compare_layout
from app.config import ModelPolicy, cfg_text
from app.format import CSS, TITLE, md_text, result_model, status_text
from app.history import RenderHistory
from app.inside_panel import inside_panel
from app.jobs import JobManager
from app.sessions import on_event_loop, session_of
from app.studio_tab import CFG_QUICK, DEFAULTS, NO_WORLD_SCENE, StudioTab, studio_layout

TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
# While the log-scale slider is dragged, the CFG box shows its weight (two significant digits, as applied).
CFG_DRAG_JS = "(x) => String(Math.min(10000, Math.max(1, Number(Math.pow(10, x).toPrecision(2)))))"
OWNER_KEY = "lods-studio-owner"  # the browser storage key of the owner token

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
        self._owners: dict[str, str] = {}  # Gradio session -> the browser's owner token (see claim)
        self.history = RenderHistory()
        self._world_inputs: Path | None = None  # the world renders picked as input views (StudioTab.input_view)
        manager.add_trainer_listener(self.history.follow)

    def claim(self, token: Any, request: gr.Request = None) -> str:
        """The page has loaded: its owner token, kept in the browser's storage (``gr.BrowserState``), names
        this browser as the owner of its runs from now on, so that a reloaded page keeps its run (a new
        browser gets a new random token). API clients that never call this are their Gradio session."""
        token = token if isinstance(token, str) and TOKEN.fullmatch(token) else secrets.token_urlsafe(24)
        session = session_of(request)
        if session != "anonymous":
            self._owners[session] = "browser:" + token  # never equal to a plain session hash
        return token

    def page_loaded(self, token: Any, request: gr.Request = None) -> tuple[str, Any]:
        """The page's first event: its owner token claimed, then its timer started (no tick speaks for the page
        before it is known as its owner)."""
        return self.claim(token, request), gr.Timer(active=True)

    def _who(self, request: gr.Request | None) -> str:
        session = session_of(request)
        return self._owners.get(session, session)

    def _session(self, request: gr.Request | None) -> str:
        session = self._who(request)
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
        prompt, negative, prior, custom, backbone, method, cfg, cfg_log, lr_scale, learned_lr, steps, seed = (
            s[k] for k in ("prompt", "negative", "prior", "custom", "backbone", "method", "cfg", "cfg_log",
                           "lr_scale", "learned_lr", "steps", "seed"))
        start_btn, pause_btn, stop_btn, reset_btn, note = (s[k] for k in ("start_btn", "pause_btn", "stop_btn",
                                                                            "reset_btn", "note"))
        status, renders, history, model3d, plots, files = (
            s[k] for k in ("status", "renders", "history", "model3d", "plots", "files"))
        compare_view, c_prompt, c_prior, c_backbone, c_steps, c_seed, c_preset, slot_inputs, c_look_for = (
            c[k] for k in ("compare_view", "prompt", "prior", "backbone", "steps", "seed", "preset", "slots",
                           "look_for"))
        c_start, c_pause, c_stop, c_note, c_status, c_gallery, c_table, c_files = (
            c[k] for k in ("start", "pause", "stop", "note", "status", "gallery", "table", "files"))

        image_in, world_pick, text_weight, view_weight = (s[k] for k in ("image_in", "world_pick", "text_weight",
                                                                         "view_weight"))
        setup = [prompt, negative, prior, custom, backbone, method, cfg, lr_scale, learned_lr, steps, seed,
                 image_in, world_pick, text_weight, view_weight]
        controls = [prompt, negative, prior, custom, backbone, method, cfg, cfg_log, lr_scale, learned_lr, steps,
                    seed]
        buttons = [pause_btn, start_btn, stop_btn, reset_btn]
        polled = [status, renders, model3d, *plots, history, files, *buttons, view]
        quick: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        start_btn.click(studio.start, setup, note, api_name="start")
        pause_btn.click(studio.toggle_pause, None, [note, pause_btn], api_name="pause", **quick)
        stop_btn.click(studio.stop, None, note, api_name="stop", **quick)
        reset_btn.click(studio.reset, view, [*controls, note, *polled], api_name="reset")
        reset_btn.click(studio.reset_input, None, [image_in, world_pick, text_weight, view_weight],
                        api_visibility="private", **quick)
        # The input view: a world render picked shows in the image box; an upload (or clearing it) unpicks it.
        world_pick.select(studio.world_picked, world_pick, image_in, api_visibility="private")
        gr.on([image_in.upload, image_in.clear], lambda: NO_WORLD_SCENE, None, world_pick,
              api_visibility="private", queue=False)
        text_weight.release(on_event_loop(studio.set_text_weight), text_weight, note, api_name="set_text_weight",
                            **quick)
        view_weight.release(on_event_loop(studio.set_view_weight), view_weight, note, api_name="set_view_weight",
                            **quick)
        # The CFG weight: Enter or leaving the box applies what the box holds; the slider over log10 w shows the
        # weight while it is dragged (in the browser) and applies it when released; the buttons apply theirs.
        gr.on([cfg.submit, cfg.blur], on_event_loop(studio.set_cfg), cfg, [note, cfg, cfg_log], api_name="set_cfg",
              **quick)
        cfg_log.input(None, cfg_log, cfg, js=CFG_DRAG_JS, api_visibility="private", queue=False)
        cfg_log.release(on_event_loop(studio.set_cfg_log), cfg_log, [note, cfg, cfg_log], api_name="set_cfg_log",
                        **quick)
        for button, weight in zip(s["cfg_quick"], CFG_QUICK):
            button.click(on_event_loop(studio.set_cfg), gr.State(cfg_text(weight)), [note, cfg, cfg_log],
                         api_visibility="private", **quick)
        lr_scale.release(on_event_loop(studio.set_lr_scale), lr_scale, note, api_name="set_lr_scale", **quick)
        gr.on([learned_lr.submit, learned_lr.blur], on_event_loop(studio.set_learned_lr), learned_lr, note,
              api_name="set_learned_lr", **quick)
        # A method or backbone the person picks brings its defaults; one set by Reset or by a reload (the run's
        # own values) only its rules (whether it learns parameters, takes CFG inf).
        gr.on([method.select, prior.select], studio.method_changed, [method, prior, learned_lr],
              [learned_lr, s["cfg_quick"][-1]],
              api_visibility="private", **quick)
        method.change(studio.method_rules, method, [learned_lr, s["cfg_quick"][-1]], api_visibility="private",
                      **quick)
        backbone.select(studio.backbone_changed, [backbone, steps], steps, api_visibility="private", **quick)
        prompt.change(None, prompt, c_prompt, js="(text) => text", api_visibility="private", queue=False)
        c_preset.change(studio.compare_preset, c_preset, [*slot_inputs, c_steps, c_backbone, c_look_for,
                                                          c["input_view"]],
                        api_visibility="private", **quick)
        for i in range(0, len(slot_inputs), 2):
            slot_inputs[i].change(studio.compare_slot_changed, slot_inputs[i], slot_inputs[i + 1],
                                  api_visibility="private", **quick)
        c_start.click(studio.compare_start, [c_prompt, c_prior, c_backbone, c_steps, c_seed, *slot_inputs,
                                             c["input_view"]], c_note, api_name="compare_start")
        c_pause.click(studio.compare_pause, None, c_note, api_name="compare_pause", **quick)
        c["replay"].change(studio.compare_replay, c["replay"], c["replay_panes"], api_name="compare_replay",
                           trigger_mode="always_last", **quick)
        c_stop.click(studio.stop, None, c_note, api_name="compare_stop", **quick)
        compare_polled = [c_status, c_gallery, c_table, c_files, compare_view]
        # The timer only compares keys; each part of the page is drawn when its key (a gr.State) changes.
        snap_key, phase_key, compare_key = gr.State(None), gr.State(None), gr.State(None)
        timer = gr.Timer(settings.poll_seconds, active=False)  # ticks once the page has claimed its owner token
        timer.tick(on_event_loop(studio.watch), [view, compare_view],
                   [status, snap_key, phase_key, c_status, compare_key, view, compare_view, timer],
                   api_name="watch",
                   trigger_mode="always_last", **quick)
        snap_key.change(studio.draw, view, [renders, *plots, history], api_name="draw", trigger_mode="always_last",
                        **quick)
        phase_key.change(studio.draw_phase, view, [model3d, files, *buttons, note], api_name="draw_phase", **quick)
        compare_key.change(studio.compare_draw, None, [c_gallery, c_table, c_files], api_name="compare_draw",
                           trigger_mode="always_last", **quick)
        # The first load (and API clients) get everything at once: the browser's owner token first (a reloaded
        # page keeps its run), then the page, then the controls of the run it shows.
        token = gr.BrowserState("", storage_key=OWNER_KEY)
        loaded = demo.load(studio.page_loaded, token, [token, timer], api_visibility="private", **quick)
        loaded.then(studio.poll, view, polled, api_name="poll", **quick).then(
            studio.run_controls, view, controls, api_visibility="private", **quick)
        demo.load(studio.compare_poll, compare_view, compare_polled, api_name="compare_poll", **quick)
        if on_load_js:
            demo.load(None, js=on_load_js)
        demo.unload(studio.release)
    return demo




def launch_options() -> dict[str, Any]:
    """Styling arguments of ``demo.launch`` (Gradio 6 takes them there, not in ``gr.Blocks``)."""
    return {"css": CSS, "theme": gr.themes.Soft(), "run_history": False}  # no browser log of every poll


def launch_local(demo: gr.Blocks) -> str:
    """Launch ``demo`` in the background on a free loopback port, styled as the app (tests, benchmarks, the
    screenshot scripts); returns its address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options())
    return f"http://127.0.0.1:{port}/"

