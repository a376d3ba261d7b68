"""``python -m lods bench lessons``: does each lesson show what its sentence says, on prompts it was not set on?

For the lessons with :class:`~lods.runs.lessons.Check` s (``cfg-weight``, ``sds-vs-lods``) every slot runs on
each of :data:`~lods.runs.lessons.LESSON_PROMPTS` x :data:`~lods.runs.lessons.LESSON_SEEDS` with the lesson's
own settings (:meth:`~lods.runs.lessons.Lesson.config`); a slot shared by two lessons with the same settings
(SDS at CFG 1000) runs once. Each run is alone in its process (not interleaved with the others, so that its
random numbers do not depend on what else runs) and is measured after training on 8 turntable views against
the world's renders (:func:`lods.bench.quality.measure`). A row is appended to ``results.csv`` after every run,
so an interrupted benchmark resumes where it stopped.

The report pairs the slots per prompt (seeds averaged, :mod:`lods.bench.stats`): the mean difference with its
bootstrap 95% interval, the Wilcoxon signed-rank p-value and the verdict "holds", "does not hold" or "not
shown". ``lessons.png`` shows the final renders of two prompts (the first two of the list, seed 0).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods.bench.stats import NOT_SHOWN, PairedResult, paired_rows
from lods.runs.batch import slug
from lods.runs.compare import Slot
from lods.runs.lessons import LESSON_PROMPTS, LESSON_SEEDS, LESSONS, PROMPT_RULE_SEED, TUNING_PROMPTS, Check, Lesson

BENCH_LESSONS = ("cfg-weight", "sds-vs-lods")
COLUMNS = ("method", "cfg", "prompt", "seed", "steps", "batch", "saturation", "world_saturation", "saturation_error",
           "clipped", "value", "floater_hard", "feature_distance", "alignment", "embedding_distance", "seconds",
           "it_per_s")
KEY = ("method", "cfg", "prompt", "seed", "steps", "batch")
GRID_PROMPTS = 2


@dataclass(frozen=True)
class LessonRun:
    """One slot of a lesson on one prompt and seed."""

    lesson: Lesson
    slot: Slot
    prompt: str
    seed: int

    def key(self) -> tuple:
        return (self.slot.method, float(self.slot.cfg), self.prompt, int(self.seed), int(self.lesson.steps),
                int(self.lesson.batch))

    @property
    def label(self) -> str:
        return f"{self.slot.label} · {self.prompt} · seed {self.seed}"

    @property
    def view_file(self) -> str:
        return f"{slug(self.slot.method + ' ' + str(self.slot.cfg), 24)}/{slug(self.prompt)}-seed{self.seed}.png"


def plan(lessons: tuple[str, ...] = BENCH_LESSONS, prompts: tuple[str, ...] = LESSON_PROMPTS,
         seeds: tuple[int, ...] = LESSON_SEEDS) -> list[LessonRun]:
    """Every run, seeds outermost, then prompts, then the lessons' slots (a run shared by lessons once): a
    benchmark cut short still pairs every slot on the prompts it reached."""
    runs, seen = [], set()
    for seed in seeds:
        for prompt in prompts:
            for name in lessons:
                for slot in LESSONS[name].slots:
                    run = LessonRun(LESSONS[name], slot, prompt, seed)
                    if run.key() not in seen:
                        seen.add(run.key())
                        runs.append(run)
    return runs


def row_key(row: dict[str, Any]) -> tuple:
    return (row["method"], float(row["cfg"]), row["prompt"], int(float(row["seed"])), int(float(row["steps"])),
            int(float(row["batch"])))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``results.csv`` (numbers as floats; none when there is no file)."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in COLUMNS:
            if k not in ("method", "prompt") and r.get(k) not in ("", None):
                r[k] = float(r[k])
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.5f}" if isinstance(v, float) and k != "cfg" else v) for k, v in row.items()})


@torch.no_grad()
def run_one(run: LessonRun, prior: Any, out: Path) -> dict[str, Any]:
    """Train ``run`` to its end, measure it against the world, write its views; its row."""
    from lods import export
    from lods.bench.quality import measure, world_reference
    from lods.cameras import turntable
    from lods.trainer import Trainer

    config = run.lesson.config(run.slot, run.prompt, run.seed, snapshot_every=run.lesson.steps, checkpoint_every=0)
    start = time.perf_counter()
    with torch.enable_grad():
        trainer = Trainer(config, prior=prior)
        try:
            status = trainer.run()
        finally:
            trainer.close()
    seconds = time.perf_counter() - start
    if status != "done":
        raise RuntimeError(f"{run.label} ended {status}: {trainer.message}")
    views = trainer.render_views(turntable(8, trainer.resolution))
    measured = measure(views.rgb.float().cpu(), views.alpha.float().cpu(), run.prompt, world_reference(run.prompt))
    path = out / "views" / run.view_file
    path.parent.mkdir(parents=True, exist_ok=True)
    export.write_png(path, export.image_grid(views.rgb.float().cpu().clamp(0, 1), cols=len(views.rgb)))
    last = trainer.history[-1] if trainer.history else {}
    return {
        "method": run.slot.method, "cfg": run.slot.cfg, "prompt": run.prompt, "seed": run.seed,
        "steps": run.lesson.steps, "batch": run.lesson.batch, "seconds": seconds,
        "it_per_s": trainer.step / max(seconds, 1e-9), "embedding_distance": float(last.get("embedding_distance", 0.0)),
        **{k: v for k, v in measured.items() if k in COLUMNS},
    }


def run_lessons(out: Path, report_only: bool = False, runs: list[LessonRun] | None = None,
                prior: Any = None, log=print, with_balance: bool = True) -> list[dict[str, Any]]:
    """Run what ``results.csv`` lacks (one progress line per run), then write the report and the picture."""
    out.mkdir(parents=True, exist_ok=True)
    runs = plan() if runs is None else runs
    csv_path = out / "results.csv"
    done = {row_key(r) for r in read_rows(csv_path)}
    todo = [] if report_only else [r for r in runs if r.key() not in done]
    log(f"lessons benchmark: {len(runs)} runs, {len(runs) - len(todo)} already in {csv_path}")
    if todo and prior is None:
        from lods.trainer import load_prior

        prior = load_prior("toy", torch.device("cpu"))
    for i, run in enumerate(todo, 1):
        row = run_one(run, prior, out)
        append_row(csv_path, row)
        log(f"[{len(runs) - len(todo) + i}/{len(runs)}] {run.label}: saturation {row['saturation']:.3f} (world "
            f"{row['world_saturation']:.3f}), clipped {row['clipped']:.3f}, {row['seconds']:.0f} s")
    rows = read_rows(csv_path)
    balance = guidance_balance(list(dict.fromkeys(r.prompt for r in runs)), prior) if rows and with_balance else None
    write_report(rows, runs, out, balance)
    return rows


# ---------------------------------------------------------------------------- why the weights


@torch.no_grad()
def guidance_balance(prompts: list[str], prior: Any = None, fractions: tuple[float, ...] = (0.2, 0.5, 0.8),
                     weights: tuple[float, ...] = (1.0, 7.5, 100.0, 1000.0), views: int = 4) -> dict[str, Any]:
    """How the two parts of the SDS direction compare on the world's own renders of ``prompts`` (fixed noise):
    the ratio |eps(y) - eps(null)| / |eps(null) - eps| per timestep, and the cosine between the SDS direction
    w (eps(y) - eps(null)) + eps(null) - eps at each weight and at the largest one. The scene's optimiser
    (Adam) ignores the size of an update, so weights whose directions are nearly parallel train alike."""
    from lods.cameras import turntable
    from lods.priors.toy.world import render_captions

    if prior is None:
        from lods.trainer import load_prior

        prior = load_prior("toy", torch.device("cpu"))
    null = prior.encode_text([""])
    ratios: dict[float, list[float]] = {f: [] for f in fractions}
    cosines: dict[float, list[float]] = {w: [] for w in weights}
    gen = torch.Generator().manual_seed(0)
    for prompt in prompts:
        rgb = render_captions([prompt] * views, size=prior.image_size, seed=0, cameras=turntable(views, 64)).rgb
        z = prior.encode_images(rgb.to(prior.device)).float()
        text = prior.encode_text([prompt]).expand(views, -1, -1)
        for f in fractions:
            t = torch.full((views,), int(f * prior.num_train_timesteps), device=z.device)
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            z_t = prior.add_noise(z, noise, t)
            eps_c = prior.predict_noise(z_t, t, text)
            eps_u = prior.predict_noise(z_t, t, null.expand(views, -1, -1))
            cls, den = (eps_c - eps_u).flatten(1), (eps_u - noise).flatten(1)
            ratios[f] += (cls.norm(dim=1) / den.norm(dim=1)).tolist()
            top = weights[-1] * cls + den
            for w in weights:
                cosines[w] += torch.nn.functional.cosine_similarity(w * cls + den, top, dim=1).tolist()
    return {"ratio": {f: float(np.mean(v)) for f, v in ratios.items()},
            "cosine_to_largest": {w: float(np.mean(v)) for w, v in cosines.items()}, "prompts": len(prompts)}


def balance_lines(balance: dict[str, Any]) -> list[str]:
    ratio = ", ".join(f"{v:.2f} at t = {f:g} T" for f, v in balance["ratio"].items())
    weights = list(balance["cosine_to_largest"])
    cos = ", ".join(f"{w:g}: {v:.3f}" for w, v in balance["cosine_to_largest"].items())
    return [f"Why the weights: on the world's own renders of the {balance['prompts']} prompts (4 views, fixed noise) "
            f"|eps(y) - eps(null)| / |eps(null) - eps| is {ratio}; the cosine between the SDS direction at each "
            f"weight and at {weights[-1]:g} is {cos}. The scene's optimiser (Adam) ignores the size of an update, "
            "so weights whose directions are this close train alike.", ""]


# ---------------------------------------------------------------------------- report


def _value(check: Check, row: dict[str, Any]) -> float:
    try:
        v = float(row[check.measure])
    except (KeyError, TypeError, ValueError):
        return float("nan")
    return abs(v) if check.absolute else v


def lesson_results(rows: list[dict[str, Any]], lesson: Lesson) -> list[tuple[Check, PairedResult]]:
    """Each check of ``lesson`` as a paired test over the prompts that both of its slots ran (at the lesson's
    steps and batch)."""
    labelled = []
    for r in rows:
        if int(float(r["steps"])) == lesson.steps and int(float(r["batch"])) == lesson.batch:
            labelled.append({**r, "variant": Slot(r["method"], float(r["cfg"])).label})
    out = []
    for check in lesson.checks:
        a, b = lesson.slots[check.a].label, lesson.slots[check.b].label
        out.append((check, paired_rows(labelled, a, b, lambda r, c=check: _value(c, r), check.claimed)))
    return out


def lesson_seconds(rows: list[dict[str, Any]], lesson: Lesson) -> list[float]:
    """Seconds of the whole lesson (its slots one after another, as the Compare tab steps them) per prompt and
    seed where every slot ran."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if int(float(r["steps"])) == lesson.steps and int(float(r["batch"])) == lesson.batch and "seconds" in r:
            cell = cells.setdefault((r["prompt"], int(float(r["seed"]))), {})
            cell[Slot(r["method"], float(r["cfg"])).label] = float(r["seconds"])
    labels = [s.label for s in lesson.slots]
    return [sum(c[x] for x in labels) for c in cells.values() if all(x in c for x in labels)]


def report_lines(rows: list[dict[str, Any]], lessons: tuple[str, ...] = BENCH_LESSONS) -> list[str]:
    lines = []
    for name in lessons:
        lesson = LESSONS[name]
        seconds = lesson_seconds(rows, lesson)
        lines += [f"## {lesson.title}", "", f"*Look for:* {lesson.look_for}", "",
                  f"{lesson.steps} steps, {lesson.batch} view per step, backbone {lesson.backbone}. "
                  + (f"The whole lesson took {np.median(seconds):.0f} s (median of {len(seconds)}; range "
                     f"{min(seconds):.0f} to {max(seconds):.0f} s) here." if seconds else ""), "",
                  "| B vs A | measure (claimed) | prompts | A | B | B - A [95% interval] | prompts as claimed / "
                  "against | Wilcoxon p | verdict |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for check, r in lesson_results(rows, lesson):
            a, b = lesson.slots[check.a].label, lesson.slots[check.b].label
            arrow = "<" if check.claimed == "less" else ">"
            weak = "" if r.verdict == NOT_SHOWN or (math.isfinite(r.p_value) and r.p_value < 0.05) else " (weak)"
            lines.append(f"| {b} vs {a} | {check.what or check.measure} (B {arrow} A) | {r.n} | {r.mean_a:.3f} | "
                         f"{r.mean_b:.3f} | {r.interval()} | {r.better} / {r.worse} | {r.p_value:.3f} | "
                         f"**{r.verdict}**{weak} |")
        lines.append("")
    return lines


def mean_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | runs | saturation | world's | clipped | floater (opaque) | judged right | embedding moved | "
             "s per run |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = []
    for name in BENCH_LESSONS:
        order += [s for s in LESSONS[name].slots if s not in order]
    for slot in order:
        rs = [r for r in rows if r["method"] == slot.method and math.isclose(float(r["cfg"]), slot.cfg)]
        if rs:
            m = {k: float(np.mean([float(r[k]) for r in rs])) for k in
                 ("saturation", "world_saturation", "clipped", "floater_hard", "alignment", "embedding_distance",
                  "seconds")}
            lines.append(f"| {slot.label} | {len(rs)} | {m['saturation']:.3f} | {m['world_saturation']:.3f} | "
                         f"{m['clipped']:.3f} | {m['floater_hard']:.3f} | {m['alignment']:.3f} | "
                         f"{m['embedding_distance']:.3f} | {m['seconds']:.0f} |")
    return lines


def write_report(rows: list[dict[str, Any]], runs: list[LessonRun], out: Path,
                 balance: dict[str, Any] | None = None) -> None:
    prompts = list(dict.fromkeys(r.prompt for r in runs))
    seeds = sorted({r.seed for r in runs})
    about = (out / "about.txt").read_text().strip() if (out / "about.txt").exists() else ""
    lines = [
        "# Lessons benchmark (toy prior)", "",
        *([about, ""] if about else []),
        f"{len(rows)} of {len(runs)} planned runs. Prompts ({len(prompts)}, fixed by a rule before any run: "
        f"`random.Random({PROMPT_RULE_SEED})` draws 3 one-object, 3 on-a-ground and 2 two-object captions of the "
        f"toy world's training combinations, leaving out the tuning prompt(s) {', '.join(TUNING_PROMPTS)} and the "
        f"quality benchmark's 24): {', '.join(prompts)}. Seeds {seeds}. Every run is measured on 8 turntable "
        "views against the world's renders of its prompt from the same cameras.", "",
        *mean_table(rows), "",
        *(balance_lines(balance) if balance else []),
        "Each prompt gives one difference B - A (its seeds averaged); the interval is a bootstrap 95% interval of "
        "the mean difference (BCa, 9,999 resamples); Wilcoxon p is the two-sided signed-rank test. A check "
        "**holds** where the interval lies wholly on the claimed side of 0, **does not hold** where it lies "
        "wholly on the other side, and is **not shown** where it includes 0; (weak): signed-rank p of 0.05 or "
        "more.", "",
        *report_lines(rows),
        "`lessons.png`: the final renders (front and side view) of the first two prompts, seed 0: one row per "
        "prompt, the world's render first, then each slot of " + " and ".join(BENCH_LESSONS) + " in order.",
    ]
    (out / "report.md").write_text("\n".join(lines).replace("nan", "-") + "\n")
    write_grid(runs, out, prompts[:GRID_PROMPTS])


def _labelled(grid: np.ndarray, labels: list[str], stride: int, band: int = 18) -> np.ndarray:
    """``grid`` with a white band on top naming each column (``stride`` pixels apart)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (grid.shape[1], grid.shape[0] + band), "white")
    image.paste(Image.fromarray(grid), (0, band))
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(labels):
        draw.text((i * stride + 6, 3), label, fill=(0, 0, 0))
    return np.asarray(image)


def write_grid(runs: list[LessonRun], out: Path, prompts: list[str], scale: int = 2, pad: int = 2) -> None:
    """``lessons.png``: per prompt (seed 0) a row of the world's render and every slot's final render (views 0
    and 2 side by side), enlarged ``scale`` times (nearest neighbour)."""
    from lods import export
    from lods.bench.quality import world_reference

    seed = min((r.seed for r in runs), default=0)
    rows = []
    for prompt in prompts:
        world = world_reference(prompt)["rgb"]
        cells = [torch.cat([world[0], world[2]], dim=2)]
        for run in [r for r in runs if r.prompt == prompt and r.seed == seed]:
            path = out / "views" / run.view_file
            if not path.exists():
                return
            views = export.read_views(path)
            pair = np.concatenate([views[0], views[2]], axis=1)
            cells.append(torch.from_numpy(pair).permute(2, 0, 1).float() / 255)
        rows.append(cells)
    if not rows:
        return
    cols = max(len(r) for r in rows)
    cells = [c for r in rows for c in r + [torch.ones_like(r[0])] * (cols - len(r))]
    grid = export.image_grid(torch.stack(cells), cols=cols, pad=pad)
    labels = ["world"] + [r.slot.label for r in runs if r.prompt == prompts[0] and r.seed == seed]
    export.write_png(out / "lessons.png", _labelled(grid.repeat(scale, 0).repeat(scale, 1), labels,
                                                    (cells[0].shape[-1] + pad) * scale))
    (out / "lessons.txt").write_text("columns: " + ", ".join(labels) + "\nrows: " + ", ".join(prompts) + "\n")
