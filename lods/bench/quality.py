"""``python -m lods bench quality``: the paper's claims, measured on the toy world against its own renders.

Every run is a Gaussian-splat generation on the toy prior; after training it is seen from 8 turntable
views and compared with the world's renders of the same caption from the same cameras:

- ``alignment``: the share of the 8 views the judge names right (colour and shape of every object);
- ``saturation_error``: mean HSV saturation of the rendered pixels (alpha > 0.5) minus the world's
  (> 0: over-saturated, < 0: washed out);
- ``artifact_score``: ``feature_distance + clipped_excess``, the distance of the mean judge features of
  the views from the world's, relative to the world's norm, plus the share of clipped pixels beyond the
  world's;
- ``floater_score``: the share of rendered alpha outside the caption's objects' main components
  (:func:`lods.metrics.floater_score` with one component per object);
- ``diversity`` (per method and prompt, in the report): mean feature distance between seeds' views.

Runs are resumable (finished folders are skipped) and can run on Ray, as ``batch`` does.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods.errors import UserError
from lods.runs.batch import Claimed, Job, claim, release_claim, run_all, run_job, slug

QUALITY_PROMPTS = {
    "single": [
        "a red cube", "a blue sphere", "a green cylinder", "a yellow cone",
        "a purple torus", "an orange capsule", "a cyan cube", "a pink sphere",
    ],
    "surroundings": [
        "a red sphere on grass", "a blue cube on checkered floor", "a green cone on grass",
        "a yellow torus on checkered floor", "a purple cylinder on grass", "an orange cube on checkered floor",
        "a cyan capsule on grass", "a pink cone on checkered floor",
    ],
    "multi": [
        "a red cube and a blue sphere", "a green cylinder and a pink cone", "a yellow sphere and a purple cube",
        "an orange cone and a cyan torus", "a blue capsule and a red cylinder", "a pink torus and a green sphere",
        "a cyan cube and a yellow capsule", "a purple cone and an orange sphere",
    ],
}
QUICK_PROMPTS = ["a red cube", "a red sphere on grass", "a red cube and a blue sphere"]
DEFAULT_STEPS = 300  # per run (150 left most objects unformed); quick runs are a subset of the full ones (same folders)
CSV_COLUMNS = (
    "method", "cfg", "prompt", "seed", "alignment", "saturation_error", "artifact_score", "floater_score",
    "variant", "learned_lr", "category", "saturation", "world_saturation", "value", "clipped", "feature_distance",
    "world_floater_score", "steps", "seconds", "it_per_s",
)


@dataclass(frozen=True)
class Variant:
    """A method at one CFG weight (and, for the learned estimators, one learning rate)."""

    label: str
    method: str
    cfg: float
    learned_lr: float | None = None


VARIANTS = [
    Variant("SDS 7.5", "sds", 7.5),
    Variant("SDS 100", "sds", 100.0),
    Variant("SDS-ref", "sds-ref", 100.0),
    Variant("CFG-anneal 100", "cfg-anneal", 100.0),
    Variant("LODS-embed 100", "lods-embed", 100.0),
    Variant("LODS-embed 1000", "lods-embed", 1000.0),
    Variant("LODS-LoRA 100", "lods-lora", 100.0),
    Variant("VSD 7.5", "vsd", 7.5),
]
LR_SWEEP = [Variant(f"LODS-embed 100 lr {lr:g}", "lods-embed", 100.0, lr) for lr in (1e-4, 1e-3, 1e-2)]
QUICK_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[4], VARIANTS[5], VARIANTS[7]]


def category_of(prompt: str) -> str:
    for cat, prompts in QUALITY_PROMPTS.items():
        if prompt in prompts:
            return cat
    from lods.priors.toy.world import parse_caption

    scene = parse_caption(prompt)
    return "surroundings" if scene.ground else ("multi" if len(scene.objects) > 1 else "single")


def plan(quick: bool, seeds: int, steps: int, out: Path, lr_sweep: bool = True) -> list[Job]:
    """The runs of the benchmark: prompts x variants x seeds, plus the embedding learning-rate sweep on the
    quick prompts."""
    # Prompts outermost, categories interleaved: a run cut short still compares every method on the same prompts.
    prompts = QUICK_PROMPTS if quick else [p for trio in zip(*QUALITY_PROMPTS.values()) for p in trio]
    variants = QUICK_VARIANTS if quick else VARIANTS
    sweep_prompts = QUICK_PROMPTS[: 1 if quick else 3] if lr_sweep else []
    cells = [(p, v) for p in prompts for v in variants + (LR_SWEEP if p in sweep_prompts else [])]
    jobs = []
    for seed in range(seeds):
        for prompt, v in cells:
            config = {
                "prompt": prompt, "prior": "toy", "backbone": "gs", "method": v.method, "cfg": v.cfg,
                "steps": steps, "seed": seed, "batch": 1, "snapshot_every": steps, "checkpoint_every": 0,
                "gaussians": {"max_points": 5000},
            }
            if v.learned_lr is not None:
                config["learned_lr"] = v.learned_lr
            name = slug(v.label, 32) + "/" + slug(prompt) + f"/seed{seed}"
            jobs.append(Job(config, str(out / "runs" / name)))
    return jobs


# ---------------------------------------------------------------------------- measures


def _floater(alpha: torch.Tensor, n_objects: int) -> float:
    from lods.metrics import floater_score

    return floater_score(alpha, components=n_objects)


@functools.lru_cache(maxsize=64)
@torch.no_grad()
def world_reference(prompt: str, views: int = 8, size: int = 64) -> dict[str, Any]:
    """The world's renders of ``prompt`` from the benchmark's turntable: colour stats, floater score, judge
    features (the reference every run of the prompt is compared with)."""
    from lods.cameras import turntable
    from lods.metrics import color_stats
    from lods.priors.toy.judge import judge_images, shipped_judge
    from lods.priors.toy.world import parse_caption, render_captions

    r = render_captions([prompt] * views, size=size, seed=0, cameras=turntable(views, size))
    judge = shipped_judge()
    cs = color_stats(r.rgb, r.alpha > 0.5)
    feats = judge.features(r.rgb)
    return {
        "prompt": prompt,
        "saturation": cs["saturation"],
        "value": cs["value"],
        "clipped": cs["clipped"],
        "floater_score": _floater(r.alpha[:, None], len(parse_caption(prompt).objects)),
        "alignment": float(judge_images(judge, r.rgb, [prompt] * views)["objects_right"].float().mean()),
        "features": feats.mean(0).tolist(),
        "rgb": r.rgb,
    }


@torch.no_grad()
def measure(rgb: torch.Tensor, alpha: torch.Tensor, prompt: str, reference: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's measures of renders (B, 3, H, W) and alpha (B, 1, H, W) of ``prompt``."""
    from lods.metrics import color_stats
    from lods.priors.toy.judge import judge_images, shipped_judge
    from lods.priors.toy.world import parse_caption

    judge = shipped_judge()
    cs = color_stats(rgb, alpha[:, 0] > 0.5)
    feats = judge.features(rgb.clamp(0, 1))
    ref = torch.tensor(reference["features"])
    feature_distance = float((feats.mean(0) - ref).norm() / ref.norm().clamp_min(1e-8))
    clipped = cs["clipped"] if math.isfinite(cs["clipped"]) else 0.0
    saturation = cs["saturation"] if math.isfinite(cs["saturation"]) else 0.0
    return {
        "alignment": float(judge_images(judge, rgb, [prompt] * len(rgb))["objects_right"].float().mean()),
        "saturation": saturation,
        "world_saturation": reference["saturation"],
        "saturation_error": saturation - reference["saturation"],
        "value": cs["value"],
        "clipped": clipped,
        "feature_distance": feature_distance,
        "artifact_score": feature_distance + max(0.0, clipped - reference["clipped"]),
        "floater_score": _floater(alpha, len(parse_caption(prompt).objects)),
        "world_floater_score": reference["floater_score"],
        "features": feats,
    }


def _quality_job(job: Job) -> dict[str, Any]:
    """Train (or skip a finished run), then measure the result against the world; ``quality.json`` caches it."""
    out = Path(job.out)
    qpath = out / "quality.json"
    if qpath.exists():
        return json.loads(qpath.read_text())
    if not claim(out):
        raise Claimed(f"{out} is being run by another process")
    try:
        return _measure_job(job, out, qpath)
    finally:
        release_claim(out)


def _measure_job(job: Job, out: Path, qpath: Path) -> dict[str, Any]:
    from lods.cameras import turntable

    measured: dict[str, Any] = {}

    def evaluate(trainer, folder: Path) -> None:
        views = trainer.render_views(turntable(8, trainer.resolution))
        prompt = job.config["prompt"]
        measured.update(measure(views.rgb.float().cpu(), views.alpha.float().cpu(), prompt, world_reference(prompt)))

    summary = run_job(job, video=False, after=evaluate)
    np.save(out / "features.npy", measured.pop("features").numpy())
    row = {
        "method": job.config["method"], "cfg": job.config["cfg"], "prompt": job.config["prompt"],
        "seed": job.config["seed"], "learned_lr": job.config.get("learned_lr", ""),
        "category": category_of(job.config["prompt"]), "steps": summary["steps"], "seconds": summary["seconds"],
        "it_per_s": summary["it_per_s"], **measured,
    }
    qpath.write_text(json.dumps(row, indent=2))
    (out / "checkpoint.pt").unlink(missing_ok=True)  # 24 x 8 x seeds checkpoints would fill the disk
    return row


# ---------------------------------------------------------------------------- report


def _variant_label(row: dict[str, Any]) -> str:
    for v in VARIANTS + LR_SWEEP:
        lr = row.get("learned_lr")
        same_lr = (v.learned_lr is None and lr in ("", None)) or (
            v.learned_lr is not None and lr not in ("", None) and math.isclose(float(lr), v.learned_lr)
        )
        if v.method == row["method"] and math.isclose(float(row["cfg"]), v.cfg) and same_lr:
            return v.label
    return f"{row['method']} {row['cfg']:g}"


def diversity(folders: list[Path], reference: dict[str, Any]) -> float:
    """Mean distance between the same views of different seeds, relative to the world's feature norm."""
    feats = [np.load(f / "features.npy") for f in folders if (f / "features.npy").exists()]
    if len(feats) < 2:
        return float("nan")
    norm = max(float(np.linalg.norm(reference["features"])), 1e-8)
    return float(np.mean([np.linalg.norm(a - b, axis=1).mean() / norm for a, b in combinations(feats, 2)]))


def mean_table(rows: list[dict[str, Any]], div: dict[str, float]) -> list[dict[str, Any]]:
    order = [v.label for v in VARIANTS + LR_SWEEP]
    labels = sorted({r["variant"] for r in rows}, key=lambda x: order.index(x) if x in order else len(order))
    table = []
    for label in labels:
        rs = [r for r in rows if r["variant"] == label]
        entry = {"variant": label, "runs": len(rs)}
        for k in ("alignment", "saturation_error", "artifact_score", "floater_score", "clipped", "it_per_s"):
            entry[k] = float(np.mean([r[k] for r in rs]))
        for cat in QUALITY_PROMPTS:
            cr = [r["alignment"] for r in rs if r["category"] == cat]
            entry[f"alignment_{cat}"] = float(np.mean(cr)) if cr else float("nan")
        entry["diversity"] = div.get(label, float("nan"))
        table.append(entry)
    return table


SATURATION_TOLERANCE = 0.01  # differences of mean saturation below this are read as "no change"
FLOATER_TOLERANCE = 0.005


def claims(table: list[dict[str, Any]]) -> list[str]:
    """The paper's three claims, each checked against the measured means (a verdict, with its numbers)."""
    by = {t["variant"]: t for t in table}
    out = []
    if {"SDS 7.5", "SDS 100"} <= by.keys():
        lo, hi = by["SDS 7.5"], by["SDS 100"]
        delta = hi["saturation_error"] - lo["saturation_error"]
        if delta > SATURATION_TOLERANCE and hi["saturation_error"] > 0:
            verdict = "holds"
        elif delta < -SATURATION_TOLERANCE:
            verdict = "does not hold: high CFG washes the colours out instead"
        else:
            verdict = "does not hold: no measurable change of saturation"
        out.append(
            f"1. SDS at high CFG over-saturates: {verdict} (saturation error SDS 7.5 {lo['saturation_error']:+.3f}, "
            f"SDS 100 {hi['saturation_error']:+.3f}; clipped pixels {lo['clipped']:.3f} -> {hi['clipped']:.3f}; "
            f"artifact score {lo['artifact_score']:.3f} -> {hi['artifact_score']:.3f})."
        )
    if {"SDS 100", "LODS-embed 100"} <= by.keys():
        s, lo = by["SDS 100"], by["LODS-embed 100"]
        colour = abs(s["saturation_error"]) - abs(lo["saturation_error"]) > SATURATION_TOLERANCE
        artifacts = lo["artifact_score"] < s["artifact_score"] - 0.01
        keeps = lo["alignment"] >= s["alignment"] - 0.05
        if colour and keeps:
            verdict = "holds"
        elif artifacts and keeps:
            verdict = "holds in part: fewer artifacts, colours not closer to the world's"
        elif colour:
            verdict = "holds in part: colours closer to the world's, but fewer views judged right"
        else:
            verdict = "does not hold"
        out.append(
            f"2. LODS keeps detail and fixes the colours at the same CFG: {verdict} (|saturation error| SDS 100 "
            f"{abs(s['saturation_error']):.3f} vs LODS-embed 100 {abs(lo['saturation_error']):.3f}; artifact score "
            f"{s['artifact_score']:.3f} vs {lo['artifact_score']:.3f}; alignment {s['alignment']:.3f} vs "
            f"{lo['alignment']:.3f})."
        )
    if {"LODS-embed 100", "LODS-embed 1000"} <= by.keys():
        lo, hi = by["LODS-embed 100"], by["LODS-embed 1000"]
        vsd = by.get("VSD 7.5")
        holds = hi["floater_score"] > lo["floater_score"] + FLOATER_TOLERANCE
        extra = f", VSD {vsd['floater_score']:.3f}" if vsd else ""
        out.append(
            f"3. Very large CFG (the VSD-like limit) creates floaters: {'holds' if holds else 'does not hold'} "
            f"(floater score LODS-embed 100 {lo['floater_score']:.3f}, LODS-embed 1000 {hi['floater_score']:.3f}"
            f"{extra})."
        )
    return out


def write_report(rows: list[dict[str, Any]], references: dict[str, dict], out: Path, jobs: list[Job]) -> None:
    """``results.csv`` (one row per run), ``report.md`` (the mean table and the claims) and ``grid.png``."""
    for r in rows:
        r["variant"] = _variant_label(r)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["variant"], r["prompt"], r["seed"])):
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    div: dict[str, list[float]] = {}
    by_cell: dict[tuple[str, str], list[Path]] = {}
    for job in jobs:
        row = next((r for r in rows if Path(r["_folder"]) == Path(job.out)), None)
        if row:
            by_cell.setdefault((row["variant"], row["prompt"]), []).append(Path(job.out))
    for (label, prompt), folders in by_cell.items():
        d = diversity(folders, references[prompt])
        if math.isfinite(d):
            div.setdefault(label, []).append(d)
    table = mean_table(rows, {k: float(np.mean(v)) for k, v in div.items()})
    world = {k: float(np.mean([references[p][k] for p in references])) for k in ("saturation", "clipped",
                                                                                  "floater_score", "alignment")}
    lines = [
        "# Quality benchmark (toy prior, Gaussian splats)",
        "",
        f"{len(rows)} of {len(jobs)} planned runs, {len({r['prompt'] for r in rows})} prompts, seeds "
        f"{sorted({int(r['seed']) for r in rows})}, {rows[0]['steps'] if rows else 0} steps each. "
        f"World renders of the same prompts: saturation {world['saturation']:.3f}, clipped {world['clipped']:.3f}, "
        f"floater score {world['floater_score']:.3f}, judged right {world['alignment']:.3f}.",
        "",
        "| method | runs | alignment | single | surr. | multi | saturation error | artifact | floater | "
        "clipped | diversity | it/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in table:
        lines.append(
            f"| {t['variant']} | {t['runs']} | {t['alignment']:.3f} | {t['alignment_single']:.3f} | "
            f"{t['alignment_surroundings']:.3f} | {t['alignment_multi']:.3f} | {t['saturation_error']:+.3f} | "
            f"{t['artifact_score']:.3f} | {t['floater_score']:.3f} | {t['clipped']:.3f} | {t['diversity']:.3f} | "
            f"{t['it_per_s']:.2f} |"
        )
    lines += lr_table(rows)
    lines += ["", "## The paper's claims on this world", "", "Over every prompt:", "", *claims(table), ""]
    single = [r for r in rows if r["category"] == "single"]
    if single and len(single) < len(rows):
        lines += ["Over the single-object prompts only (the category where the toy prior forms the objects):", "",
                  *claims(mean_table(single, {})), ""]
    (out / "report.md").write_text("\n".join(lines).replace("nan", "-"))
    (out / "table.json").write_text(json.dumps(table, indent=2))
    _write_grid(rows, references, out)


def lr_table(rows: list[dict[str, Any]]) -> list[str]:
    """LODS-embed at CFG 100 by embedding learning rate, on the prompts the sweep ran (the default rate's
    runs restricted to the same prompts and seeds, so that the rows compare)."""
    sweep = [r for r in rows if r["variant"] in {v.label for v in LR_SWEEP}]
    if not sweep:
        return []
    cells = {(r["prompt"], r["seed"]) for r in sweep}
    from lods.priors.diffusers_prior import prior_defaults

    default = [r for r in rows if r["variant"] == "LODS-embed 100" and (r["prompt"], r["seed"]) in cells]
    groups = [(f"{prior_defaults('toy').learned_rate('lods-embed'):g} (default)", default)]
    groups += [(f"{v.learned_lr:g}", [r for r in sweep if r["variant"] == v.label]) for v in LR_SWEEP]
    lines = ["", f"Embedding learning rate (LODS-embed, CFG 100) on {len({p for p, _ in cells})} prompt(s): "
             + ", ".join(sorted({p for p, _ in cells})), "",
             "| learning rate | runs | alignment | saturation error | artifact | floater |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rs in groups:
        if rs:
            m = {k: float(np.mean([r[k] for r in rs])) for k in ("alignment", "saturation_error", "artifact_score",
                                                                  "floater_score")}
            lines.append(f"| {name} | {len(rs)} | {m['alignment']:.3f} | {m['saturation_error']:+.3f} | "
                         f"{m['artifact_score']:.3f} | {m['floater_score']:.3f} |")
    return lines


def _write_grid(rows: list[dict[str, Any]], references: dict[str, dict], out: Path) -> None:
    """One row per method (seed 0, first view), the world's render on top; one column per prompt."""
    from lods import export

    prompts = [p for ps in QUALITY_PROMPTS.values() for p in ps if p in references]
    labels = sorted({r["variant"] for r in rows}, key=[v.label for v in VARIANTS + LR_SWEEP].index)
    size = 64
    cells = [references[p]["rgb"][0] for p in prompts]
    for label in labels:
        for p in prompts:
            r = next((r for r in rows if r["variant"] == label and r["prompt"] == p and int(r["seed"]) == 0), None)
            img = torch.ones(3, size, size)
            if r:
                views = export.read_views(Path(r["_folder"]) / "views.png")
                img = torch.from_numpy(views[0]).permute(2, 0, 1).float() / 255
            cells.append(img)
    export.write_png(out / "grid.png", export.image_grid(torch.stack(cells), cols=len(prompts)))
    (out / "grid.txt").write_text(
        "rows: world, " + ", ".join(labels) + "\ncolumns: " + ", ".join(prompts) + "\n"
    )


def run_quality(
    out: Path, quick: bool = False, seeds: int = 2, steps: int = DEFAULT_STEPS, executor: str = "sequential",
    ray_address: str | None = None, lr_sweep: bool = True, report_only: bool = False,
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(quick, seeds, steps, out, lr_sweep)
    todo = [] if report_only else [j for j in jobs if not (Path(j.out) / "quality.json").exists()]
    print(f"quality benchmark: {len(jobs)} runs, {len(jobs) - len(todo)} already done; results in {out} "
          "(another process started on the same folder shares the work)")
    run_all(_quality_job, todo, executor, ray_address, "quality", lambda job: job.out)
    rows = []
    for job in jobs:
        q = Path(job.out) / "quality.json"
        if q.exists():
            rows.append({**json.loads(q.read_text()), "_folder": job.out})
    references = {p: world_reference(p) for p in sorted({r["prompt"] for r in rows})}
    if rows:
        write_report(rows, references, out, jobs)
    return rows


def run_from_args(args: argparse.Namespace) -> int:
    if args.prior != "toy":
        raise UserError("`bench quality` measures against the toy world: it runs on --prior toy only")
    seeds = args.seeds or (1 if args.quick else 2)
    if seeds < 1 or (args.steps is not None and args.steps < 1):
        raise UserError("--seeds and --steps must be at least 1")
    if not args.out:
        raise UserError("bench quality needs --out DIR")
    steps = args.steps or DEFAULT_STEPS
    rows = run_quality(Path(args.out), args.quick, seeds, steps, args.executor, args.ray_address,
                       report_only=args.report_only)
    print((Path(args.out) / "report.md").read_text() if rows else "no run finished")
    return 0 if rows else 1
