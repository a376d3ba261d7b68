"""The Compare tab: 2 to 4 configurations on the same prompt and seed, stepped in turn, side by side.

:class:`CompareTab` holds the tab's callbacks (mixed into :class:`app.ui.Studio`); :func:`compare_layout`
lays out its components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.config import APP_METHODS, MAX_TEXT, build_run_config, checked_cfg, default_learned_lr
from app.format import BACKBONE_LABELS, METHOD_LABELS, md_text, notice, status_text
from app.jobs import one_line
from app.plots import image_panel, preview_grid
from app.studio_tab import NO_WORLD_SCENE, world_scene_choices
from lods.errors import UserError
from lods.runs import alignment_metrics
from lods.runs.compare import MAX_RUNS, Slot, comparison_configs
from lods.runs.compare import PRESETS as COMPARE_PRESETS
from lods.runs.lessons import LESSONS

# Views per step of each compared run: one, as the lessons were measured (twice the steps of the page's default
# two in the same time; lods.runs.lessons)
COMPARE_BATCH = next(iter(LESSONS.values())).batch
PANE_VIEW_PX = 300  # each view of a pane is drawn this wide (pixelated), about the Studio previews' size


@dataclass(frozen=True)
class Preset:
    """What the preset radio offers: a lesson (with its sentence, steps and backbone) or a plain set of slots."""

    label: str
    slots: tuple[Slot, ...]
    look_for: str = ""
    steps: int | None = None
    backbone: str | None = None
    input_view: int | None = None  # a world scene as the input view: image to 3D


def _presets() -> dict[str, Preset]:
    """The lessons (``lods.runs.lessons``) first, then the comparisons of ``lods.runs.compare.PRESETS`` that no
    lesson of the same name replaces."""
    presets = {name: Preset(f"Lesson: {lesson.title}", tuple(lesson.slots), lesson.look_for, lesson.steps,
                            lesson.backbone) for name, lesson in LESSONS.items()}
    for name, slots in COMPARE_PRESETS.items():
        if name not in presets:
            presets[name] = Preset(" · ".join(slot.label for slot in slots), tuple(slots))
    presets["image-to-3d"] = Preset(
        "Image to 3D: SDS against LODS-embed on the text prior (CFG 100)",
        (Slot("sds", 100.0), Slot("lods-embed", 100.0)),
        "Both runs learn the same input view (world scene 0) with the same view-conditioned prior; only the text "
        "prior's estimator differs. On the toy world LODS-embed's novel views came out slightly closer to the "
        "world's true ones (PSNR +0.23 dB [+0.05, +0.42] over 9 held-out scenes, docs/bench/image3d); by eye "
        "the two look alike.",
        steps=120, backbone="gs", input_view=0)
    return presets


COMPARE_PRESETS_SHOWN = _presets()
DEFAULT_PRESET = next(iter(COMPARE_PRESETS_SHOWN))
COMPARE_CFG_CHOICES = ["7.5", "30", "100", "1000", "inf"]
COMPARE_OFF = "off"
COMPARE_COLUMNS = ["run", "step", "it/s", "saturation", "clipped", "floater score", "embedding distance",
                   "judged right"]


class CompareTab:
    """The Compare tab's callbacks."""

    # ------------------------------------------------------------------ Compare tab

    @staticmethod
    def compare_slots(preset: Any) -> tuple:
        """The slots of a preset: (method, CFG) for each of the ``MAX_RUNS`` rows; unused rows off."""
        chosen = COMPARE_PRESETS_SHOWN.get(preset)
        slots = chosen.slots if chosen is not None else ()
        values: list[Any] = []
        for i in range(MAX_RUNS):
            if i < len(slots):
                values += [slots[i].method, "inf" if math.isinf(slots[i].cfg) else f"{slots[i].cfg:g}"]
            else:
                values += [COMPARE_OFF, "100"]
        return tuple(values)

    @staticmethod
    def compare_preset(preset: Any) -> tuple:
        """A preset chosen: its slots (an "off" slot's CFG hidden), its steps and backbone (a lesson's), and the
        sentence saying what to look for."""
        chosen = COMPARE_PRESETS_SHOWN.get(preset)
        values = CompareTab.compare_slots(preset)
        slots = []
        for method, cfg in zip(values[0::2], values[1::2]):
            slots += [method, gr.update(value=cfg, visible=method != COMPARE_OFF)]
        if chosen is None:
            return (*slots, gr.skip(), gr.skip(), "", gr.skip())
        look = f"**Look for:** {md_text(chosen.look_for)}" if chosen.look_for else ""
        return (*slots, chosen.steps if chosen.steps else gr.skip(), chosen.backbone or gr.skip(), look,
                chosen.input_view if chosen.input_view is not None else NO_WORLD_SCENE)

    @staticmethod
    def compare_slot_changed(method: Any) -> Any:
        """A slot turned "off" hides its CFG weight."""
        return gr.update(visible=method not in (None, "", COMPARE_OFF))

    def compare_start(self, prompt: Any, prior: Any, backbone: Any, steps: Any, seed: Any, method1: Any, cfg1: Any,
                      method2: Any, cfg2: Any, method3: Any, cfg3: Any, method4: Any, cfg4: Any,
                      input_view: Any = NO_WORLD_SCENE, request: gr.Request = None) -> str:
        """Start (or queue) the comparison of the chosen slots; "off" slots are left out; a world scene as
        ``input_view`` makes every run image-to-3D from it. The slots are named parameters: Gradio hands the
        session's request only to a parameter it can see in the signature."""
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
                method=chosen[0].method if chosen else "sds", cfg=100.0, lr_scale=1.0,
                learned_lr=default_learned_lr("lods-embed", name), steps=steps, seed=seed,
                max_steps=self.settings.max_steps,
                overrides={"batch": COMPARE_BATCH, **(self.settings.run_overrides or {})},
                image=self.input_view(None, input_view),
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

    def compare_replay(self, percent: Any) -> str:
        """The panes at ``percent`` of the comparison's length: each run's last preview by that step."""
        job = self._comparison()
        if job is None or job.comparison is None:
            return "<p>No comparison to replay yet.</p>"
        try:
            share = min(max(float(percent), 0.0), 100.0) / 100.0
        except (TypeError, ValueError):
            share = 1.0
        step = round(share * max(config.steps for config in job.compare_configs))
        panes = []
        for config, frame in zip(job.compare_configs, job.comparison.frames_at(step)):
            if frame is not None:
                shown, previews = frame
                panes.append((preview_grid(previews, min_side=1, cols=len(previews), gap=1),
                              f"{Slot(config.method, config.cfg).label} · step {shown}", len(previews)))
        return image_panel(panes, "lods-pane", PANE_VIEW_PX) if panes else f"<p>No previews by step {step}.</p>"

    def compare_draw(self) -> tuple:
        """gallery, table, files of the Compare tab (run when its key changes)."""
        return self._compare_outputs(self._comparison())

    @staticmethod
    def _compare_outputs(job: Any) -> tuple:
        comparison = job.comparison if job is not None else None
        if comparison is None:
            return "", None, None
        gallery, rows = [], []
        # A pane (its image and the judge's verdict) changes only with a new snapshot: drawn once per snapshot,
        # not at every poll (the drawing and the judge would take their time from the runs).
        cache = job.__dict__.setdefault("_panes", {})
        for i, (config, trainer, row) in enumerate(zip(job.compare_configs, comparison.trainers, comparison.rows())):
            snap = trainer.latest()
            judged = "–"
            if snap is not None:
                key = (i, snap.step)
                if key not in cache:
                    views = len(snap.previews)
                    align = alignment_metrics(config.prompt, config.prior, snap.previews)
                    cache[key] = (preview_grid(snap.previews, min_side=1, cols=views, gap=1), views,
                                  f"{align['views_judged_right']} / {views}" if align else "–")
                    for old in [k for k in cache if k[0] == i and k != key]:
                        del cache[old]
                grid, views, judged = cache[key]
                gallery.append((grid, f"{row['label']} · step {snap.step}", views))

            def num(v: Any) -> str:
                return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

            rows.append([row["label"], row["step"], f"{row['it_per_s']:.2f}", num(row["saturation"]),
                         num(row["clipped"]), num(row["floater_score"]), num(row["embedding_distance"]), judged])
        files = [str(p) for p in job.files] or None
        panes = image_panel(gallery, "lods-pane", PANE_VIEW_PX) if gallery else ""
        return panes, {"headers": COMPARE_COLUMNS, "data": rows}, files

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


def compare_layout(settings: Any, defaults: Any) -> dict[str, Any]:
    """The tab's components (inside ``gr.Tab("Compare")``), by name."""
    d = defaults
    gr.Markdown(
        "Run 2 to 4 configurations on the same prompt and seed, one step of each in turn on this "
        "device, and watch them side by side, each run's views at the size of the Studio previews. The "
        "lessons each teach one thing in a couple of minutes and say what to look for; the prompt follows "
        "the Studio tab's."
    )
    compare_view = gr.State({})
    with gr.Row():
        c_prompt = gr.Textbox(label="Prompt", value=d.prompt, max_length=MAX_TEXT, scale=3,
                              elem_id="compare-prompt")
        c_prior = gr.Dropdown(list(settings.policy.allowed), value=settings.default_prior,
                              label="Prior", scale=1)
    with gr.Row():
        first = COMPARE_PRESETS_SHOWN[DEFAULT_PRESET]
        c_backbone = gr.Radio([(v, k) for k, v in BACKBONE_LABELS.items()], value=first.backbone or d.backbone,
                              label="Backbone")
        c_steps = gr.Number(value=first.steps or 300, precision=0, label="Steps (each run)", elem_id="compare-steps")
        c_seed = gr.Number(value=d.seed, precision=0, label="Seed")
    c_preset = gr.Radio([(p.label, k) for k, p in COMPARE_PRESETS_SHOWN.items()], value=DEFAULT_PRESET,
                        label="Preset (a lesson sets its runs, steps and backbone)", elem_id="compare-preset")
    c_look_for = gr.Markdown(CompareTab.compare_preset(DEFAULT_PRESET)[-2], elem_id="compare-look-for")
    c_input = gr.Dropdown(world_scene_choices(), value=NO_WORLD_SCENE, elem_id="compare-input",
                          label="Input view (image to 3D: every run learns this world render; none: text to 3D)")
    slot_inputs: list[Any] = []
    initial = CompareTab.compare_slots(DEFAULT_PRESET)
    with gr.Row():
        for i in range(MAX_RUNS):
            with gr.Column(min_width=160):
                slot_inputs.append(gr.Dropdown(
                    [(COMPARE_OFF, COMPARE_OFF)] + [(METHOD_LABELS.get(m, m), m) for m in APP_METHODS],
                    value=initial[2 * i], label=f"Run {i + 1}: method"))
                slot_inputs.append(gr.Dropdown(COMPARE_CFG_CHOICES, value=initial[2 * i + 1],
                                               allow_custom_value=True, label=f"Run {i + 1}: CFG",
                                               visible=initial[2 * i] != COMPARE_OFF))
    with gr.Row():
        c_start = gr.Button("Start comparison", variant="primary", elem_id="compare-start")
        c_pause = gr.Button("Pause / resume", elem_id="compare-pause")
        c_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    c_note = gr.Markdown("", elem_id="compare-notice")
    c_status = gr.Markdown("", elem_id="compare-status")
    c_gallery = gr.HTML("", elem_id="compare-gallery")
    with gr.Accordion("Replay: the runs side by side at any point of their history", open=False):
        c_replay = gr.Slider(0, 100, value=100, step=1, label="% of the run (each pane: its last preview by then)",
                             elem_id="compare-replay")
        c_replay_panes = gr.HTML("", elem_id="compare-replay-panes")
    c_table = gr.Dataframe(headers=COMPARE_COLUMNS, label="Metrics (latest logged step)",
                           interactive=False, elem_id="compare-table")
    c_files = gr.File(label="Result files", file_count="multiple", interactive=False)
    return dict(compare_view=compare_view, prompt=c_prompt, prior=c_prior, backbone=c_backbone, steps=c_steps,
                seed=c_seed, preset=c_preset, look_for=c_look_for, slots=slot_inputs, start=c_start, pause=c_pause,
                stop=c_stop, note=c_note, status=c_status, gallery=c_gallery, table=c_table, files=c_files,
                replay=c_replay, replay_panes=c_replay_panes, input_view=c_input)
