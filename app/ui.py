"""The LODS Studio page: the run's setup on the left, the live run on the right.

Every callback is a method of :class:`Studio`, which knows the :class:`~app.jobs.JobManager` and
the operator's :class:`AppSettings` and nothing else; :func:`build_demo` only lays out components
and wires events. A ``gr.Timer`` polls the job (the trainer runs in its own thread) and each output
is re-sent only when what it shows has changed. Bad input never reaches the job: it becomes a
one-line notice under the buttons.
"""

from __future__ import annotations

import functools
import html
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.config import (
    APP_METHODS,
    CFG_MAX,
    MAX_TEXT,
    ModelPolicy,
    build_run_config,
    checked_cfg,
    default_learned_lr,
    learns_parameters,
)
from app.jobs import Job, JobManager, NotOwner, one_line
from app.plots import PLOTS, metric_frame, placeholder_frame, plot_colors, preview_grid
from lods.compare import MAX_RUNS, Slot, comparison_configs
from lods.compare import PRESETS as COMPARE_PRESETS
from lods.errors import UserError
from lods.runs import PRESETS, alignment_metrics

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
.lods-plots .block { min-width: 260px; }
#renders img { image-rendering: pixelated; width: 100%; height: auto; }
"""
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~$])")
COMPARE_PRESET_LABELS = {
    "cfg-vs-lods": "SDS at CFG 100 · LODS-embed at CFG 100 · LODS-embed at CFG ∞",
    "cfg-sweep": "CFG sweep (the paper's Fig. 5): LODS-embed at CFG 30 · 100 · 1000 · ∞",
}
COMPARE_CFG_CHOICES = ["7.5", "30", "100", "1000", "inf"]
COMPARE_OFF = "off"
COMPARE_COLUMNS = ["run", "step", "it/s", "saturation", "clipped", "floater score", "embedding distance",
                   "judged right"]


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


@dataclass(frozen=True)
class Defaults:
    prompt: str = "a red cube"
    negative_prompt: str = ""
    custom_model: str = ""
    backbone: str = "gs"
    method: str = "lods-embed"
    cfg: float = 100.0
    scene_lr_scale: float = 1.0
    steps: int = PRESETS["gs"]["steps"]
    seed: int = 0

    @property
    def learned_lr(self) -> float:
        return default_learned_lr(self.method, "toy")


DEFAULTS = Defaults()


def md_text(text: str) -> str:
    """User or library text shown inside Markdown: HTML-escaped, Markdown specials backslashed, one line."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def notice(text: str, error: bool = False) -> str:
    return f"⚠️ {md_text(text)}" if error else md_text(text)


def session_of(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) if request is not None else None) or "anonymous"


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
    if job.owner != viewer:
        detail += " · *started in another session: you are watching it read-only*"
    return f"{head}  \n{detail}"


def on_event_loop(fn: Any) -> Any:
    """``fn`` as a coroutine function, so that Gradio calls it on its event loop instead of handing it to
    a worker thread: for the quick, non-blocking callbacks (the timer, the knobs), one thread hop and its
    interpreter-lock handoffs fewer per request, which the training thread feels."""

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return run


class Studio:
    """The page's callbacks; each returns plain values or component updates, never raises for bad input."""

    def __init__(self, manager: JobManager, settings: AppSettings) -> None:
        self.manager = manager
        self.settings = settings
        self._seen: dict[str, float] = {}  # session -> time of its latest request (time.monotonic)
        self._drawn: tuple[Any, Any] = (None, None)  # (snapshot key, (renders, plots)): shared by every session
        self._drawn_lock = threading.Lock()

    def _session(self, request: gr.Request | None) -> str:
        session = session_of(request)
        self._seen[session] = time.monotonic()
        return session

    # ------------------------------------------------------------------ buttons

    def start(self, prompt: Any, negative_prompt: Any, prior: Any, custom_model: Any, backbone: Any, method: Any,
              cfg: Any, scene_lr_scale: Any, learned_lr: Any, steps: Any, seed: Any,
              request: gr.Request = None) -> str:
        try:
            name = self.settings.policy.resolve(prior, custom_model)
            config = build_run_config(
                prompt=prompt, negative_prompt=negative_prompt, prior=name, backbone=backbone, method=method,
                cfg=cfg, scene_lr_scale=scene_lr_scale, learned_lr=learned_lr, steps=steps, seed=seed,
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
        if job is not None:
            try:
                self.manager.discard(self._session(request))
                dismissed = job.id
            except NotOwner as err:
                if job.active:
                    message = notice(one_line(err), error=True)
                else:
                    dismissed = job.id
            except UserError as err:
                message = notice(one_line(err), error=True)
        d = DEFAULTS
        controls = (d.prompt, d.negative_prompt, self.settings.default_prior, d.custom_model, d.backbone, d.method,
                    d.cfg, d.scene_lr_scale, gr.update(value=d.learned_lr, interactive=True), d.steps, d.seed)
        return (*controls, message, *self._cleared(), {"dismissed": dismissed})

    # ------------------------------------------------------------------ live knobs

    def _knob(self, name: str, value: Any, request: gr.Request | None) -> str:
        try:
            job = self.manager.set_knobs(self._session(request), **{name: value})
        except UserError as err:
            return notice(one_line(err), error=True)
        if job is None:
            return ""
        label = {"cfg": "CFG weight", "scene_lr_scale": "scene learning-rate scale",
                 "learned_lr": "learned-parameter learning rate"}[name]
        return notice(f"{label} set to {float(value):g}; it applies from the next step.")

    def set_cfg(self, value: Any, request: gr.Request = None) -> str:
        return self._knob("cfg", value, request)

    def set_scene_lr(self, value: Any, request: gr.Request = None) -> str:
        return self._knob("scene_lr_scale", value, request)

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

    # ------------------------------------------------------------------ Compare tab

    @staticmethod
    def compare_preset(preset: Any) -> tuple:
        """The slots of a preset: (method, CFG) for each of the ``MAX_RUNS`` rows; unused rows off."""
        slots = COMPARE_PRESETS.get(preset, [])
        values: list[Any] = []
        for i in range(MAX_RUNS):
            if i < len(slots):
                values += [slots[i].method, "inf" if math.isinf(slots[i].cfg) else f"{slots[i].cfg:g}"]
            else:
                values += [COMPARE_OFF, "100"]
        return tuple(values)

    def compare_start(self, prompt: Any, prior: Any, backbone: Any, steps: Any, seed: Any, method1: Any, cfg1: Any,
                      method2: Any, cfg2: Any, method3: Any, cfg3: Any, method4: Any, cfg4: Any,
                      request: gr.Request = None) -> str:
        """Start (or queue) the comparison of the chosen slots; "off" slots are left out. The slots are named
        parameters: Gradio hands the session's request only to a parameter it can see in the signature."""
        slots = (method1, cfg1, method2, cfg2, method3, cfg3, method4, cfg4)
        try:
            name = self.settings.policy.resolve(prior, "")
            chosen = []
            for method, cfg in zip(slots[0::2], slots[1::2]):
                if method in (None, "", COMPARE_OFF):
                    continue
                text = str(cfg).strip().lower()
                weight = math.inf if text in ("inf", "∞", "infinity") else checked_cfg(text)
                chosen.append(Slot(str(method), weight))
            base = build_run_config(
                prompt=prompt, negative_prompt="", prior=name, backbone=backbone,
                method=chosen[0].method if chosen else "sds", cfg=100.0, scene_lr_scale=1.0,
                learned_lr=default_learned_lr("lods-embed", name), steps=steps, seed=seed,
                max_steps=self.settings.max_steps, overrides=self.settings.run_overrides,
            )
            for slot in chosen:
                if slot.method not in APP_METHODS:
                    raise UserError(f"unknown method '{md_text(slot.method)[:40]}'")
            configs = comparison_configs(base, chosen)
            job = self.manager.start_or_queue(configs[0], owner=self._session(request), compare=configs)
        except UserError as err:
            return notice(one_line(err), error=True)
        if isinstance(job, int):
            return notice(f"Another session's run is in progress: your comparison is queued (position {job}).")
        return notice(f"Started comparison {job.id}: {len(job.compare_configs)} runs, one step of each in turn.")

    def compare_pause(self, request: gr.Request = None) -> str:
        job = self.manager.current()
        if job is None or not job.active or not job.is_comparison:
            return notice("No comparison is running.")
        return self._toggle_pause(job, request)[0]

    def _comparison(self) -> Any:
        """The current job if it is a comparison, else None."""
        job = self.manager.current()
        return job if job is not None and job.is_comparison else None

    def _compare_keys(self, me: str) -> tuple[Any, dict[str, Any]]:
        """The comparison job (or None) and what the Compare tab shows of it, as comparable keys."""
        job = self._comparison()
        steps = tuple(t.step for t in job.comparison.trainers) if job is not None and job.comparison else ()
        return job, {"status": status_text(job, me) if job is not None else
                     "**No comparison yet.** Pick a preset or your own runs and press **Start comparison**.",
                     "steps": (job.id if job else None, steps, job.state if job else None,
                               len(job.files) if job else 0)}

    def compare_draw(self) -> tuple:
        """gallery, table, files of the Compare tab (run when its key changes)."""
        return self._compare_outputs(self._comparison())

    @staticmethod
    def _compare_outputs(job: Any) -> tuple:
        comparison = job.comparison if job is not None else None
        if comparison is None:
            return None, None, None
        gallery, rows = [], []
        for config, trainer, row in zip(job.compare_configs, comparison.trainers, comparison.rows()):
            snap = trainer.latest()
            judged = "–"
            if snap is not None:
                gallery.append((preview_grid(snap.previews, min_side=128, cols=2), row["label"]))
                align = alignment_metrics(config.prompt, config.prior, snap.previews)
                if align:
                    judged = f"{align['views_judged_right']} / {len(snap.previews)}"

            def num(v: Any) -> str:
                return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

            rows.append([row["label"], row["step"], f"{row['it_per_s']:.2f}", num(row["saturation"]),
                         num(row["clipped"]), num(row["floater_score"]), num(row["embedding_distance"]), judged])
        files = [str(p) for p in job.files] or None
        return gallery or None, {"headers": COMPARE_COLUMNS, "data": rows}, files

    def compare_poll(self, view: dict | None, request: gr.Request = None) -> tuple:
        """status, gallery, table, files, view state of the Compare tab; unchanged parts skipped (the API's)."""
        view = dict(view or {})
        job, keys = self._compare_keys(self._session(request))
        changed = {k for k, v in keys.items() if view.get(k) != v}
        view.update(keys)
        if not changed:
            return (gr.skip(),) * 4 + (view,)
        status = keys["status"] if "status" in changed else gr.skip()
        return (status, *self._compare_outputs(job), view)

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
        return self._phase_outputs(*self._visible(dict(view or {}), self._session(request)))

    @staticmethod
    def _phase_outputs(job: Any, kept: Any) -> tuple:
        if job is None:
            return None, None, gr.update(value="Pause")
        paths = [str(p) for p in (kept.files if kept is not None else job.files)]  # your last run's files
        model = next((p for p in paths if p.endswith((".ply", ".glb"))), None)
        return model, paths or None, gr.update(value="Resume" if job.state == "paused" else "Pause")

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

    def poll(self, view: dict | None, request: gr.Request = None) -> tuple:
        """status, renders, 3D result, the plots, files, pause label, view state; unchanged parts skipped.

        Everything at once, for the page's first load and for API clients; the page's timer uses
        :meth:`watch` and the draw methods."""
        view = dict(view or {})
        job, snap, kept, keys = self._keys(view, self._session(request))
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
            model, files, pause = self._phase_outputs(job, kept)
        return (status, renders, model, *plots, files, pause, view)


def build_demo(manager: JobManager, settings: AppSettings | None = None,
               on_load_js: str | None = None) -> gr.Blocks:
    """The page. ``on_load_js`` runs in the browser once the page has loaded (the viewer's iframe address)."""
    settings = settings or AppSettings()
    studio = Studio(manager, settings)
    d = DEFAULTS
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"# {TITLE}\n"
            "Text-to-3D by score distillation from a 2D diffusion model. **LODS** (Learn to Optimize Denoising "
            "Scores) learns the unconditional embedding, or a LoRA, while the scene trains. Turn the CFG weight "
            "during a run and watch saturation and floaters respond."
        )
        view = gr.State({})
        with gr.Tabs():
            with gr.Tab("Studio"):
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
                            scene_lr = gr.Slider(0, 10, value=d.scene_lr_scale, step=0.05,
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
            with gr.Tab("Compare", elem_id="compare-tab"):
                gr.Markdown(
                    "Run 2 to 4 configurations on the same prompt and seed, one step of each in turn on this "
                    "device, and watch them side by side: SDS at a high CFG weight against LODS, or the CFG "
                    "sweep of the paper's Fig. 5 (low weights lack detail, very large ones make floaters)."
                )
                compare_view = gr.State({})
                with gr.Row():
                    c_prompt = gr.Textbox(label="Prompt", value=d.prompt, max_length=MAX_TEXT, scale=3,
                                          elem_id="compare-prompt")
                    c_prior = gr.Dropdown(list(settings.policy.allowed), value=settings.default_prior,
                                          label="Prior", scale=1)
                with gr.Row():
                    c_backbone = gr.Radio([(v, k) for k, v in BACKBONE_LABELS.items()], value=d.backbone,
                                          label="Backbone")
                    c_steps = gr.Number(value=300, precision=0, label="Steps (each run)", elem_id="compare-steps")
                    c_seed = gr.Number(value=d.seed, precision=0, label="Seed")
                c_preset = gr.Radio([(v, k) for k, v in COMPARE_PRESET_LABELS.items()], value="cfg-vs-lods",
                                    label="Preset", elem_id="compare-preset")
                slot_inputs: list[Any] = []
                initial = Studio.compare_preset("cfg-vs-lods")
                with gr.Row():
                    for i in range(MAX_RUNS):
                        with gr.Column(min_width=160):
                            slot_inputs.append(gr.Dropdown(
                                [(COMPARE_OFF, COMPARE_OFF)] + [(METHOD_LABELS.get(m, m), m) for m in APP_METHODS],
                                value=initial[2 * i], label=f"Run {i + 1}: method"))
                            slot_inputs.append(gr.Dropdown(COMPARE_CFG_CHOICES, value=initial[2 * i + 1],
                                                           allow_custom_value=True, label=f"Run {i + 1}: CFG"))
                with gr.Row():
                    c_start = gr.Button("Start comparison", variant="primary", elem_id="compare-start")
                    c_pause = gr.Button("Pause / resume", elem_id="compare-pause")
                    c_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                c_note = gr.Markdown("", elem_id="compare-notice")
                c_status = gr.Markdown("", elem_id="compare-status")
                c_gallery = gr.Gallery(label="Latest renders, side by side", columns=MAX_RUNS, height="auto",
                                       elem_id="compare-gallery", interactive=False)
                c_table = gr.Dataframe(headers=COMPARE_COLUMNS, label="Metrics (latest logged step)",
                                       interactive=False, elem_id="compare-table")
                c_files = gr.File(label="Result files", file_count="multiple", interactive=False)

        setup = [prompt, negative, prior, custom, backbone, method, cfg, scene_lr, learned_lr, steps, seed]
        polled = [status, renders, model3d, *plots, files, pause_btn, view]
        quick: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
        start_btn.click(studio.start, setup, note, api_name="start")
        pause_btn.click(studio.toggle_pause, None, [note, pause_btn], api_name="pause", **quick)
        stop_btn.click(studio.stop, None, note, api_name="stop", **quick)
        reset_btn.click(studio.reset, view, [*setup, note, *polled], api_name="reset")
        cfg.release(on_event_loop(studio.set_cfg), cfg, note, api_name="set_cfg", **quick)
        scene_lr.release(on_event_loop(studio.set_scene_lr), scene_lr, note, api_name="set_scene_lr", **quick)
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

