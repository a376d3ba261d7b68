"""``python -m lods bench quality``: the paper's claims, measured on the toy world against its own renders.

Every run is a Gaussian-splat generation on the toy prior; after training it is seen from 8 turntable
views and compared with the world's renders of the same caption from the same cameras:

- ``alignment``: the share of the 8 views the judge names right (colour and shape of every object);
- ``saturation_error``: mean HSV saturation of the rendered pixels (alpha > 0.5) minus the world's
  (> 0: over-saturated, < 0: washed out);
- ``artifact_score``: ``feature_distance + clipped_excess``, the distance of the mean judge features of
  the views from the world's, relative to the world's norm, plus the share of clipped pixels beyond the
  world's;
- ``floater_hard``: the share of opaque pixels (alpha > 0.5) outside the caption's objects' main
  components (:func:`lods.metrics.floater_score` with ``hard=True``, one component per object);
  ``floater_score`` is the older soft-alpha measure (which also counts the objects' soft edges);
- ``detail_ratio``: the high-frequency energy of the rendered object (:func:`lods.metrics.detail_energy`)
  over the world's (1: as detailed as the world, < 1 smoother, > 1 noisier);
- ``diversity`` (per method and prompt, in the report): mean feature distance between seeds' views.

The report's verdicts are paired per prompt (:mod:`lods.bench.stats`): absolute errors, so that errors of
opposite sign do not cancel, and the mean paired difference with a bootstrap 95% interval, overall and
per category. Runs are resumable (finished folders are skipped) and can run on Ray, as ``batch`` does;
``--report-only`` writes the report again from the run folders or, where they are gone, ``results.csv``.
"""

from __future__ import annotations

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

from lods import checkpoint
from lods.bench.stats import NOT_SHOWN, PairedResult, paired_rows
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
    "world_floater_score", "steps", "seconds", "it_per_s", "floater_hard", "world_floater_hard", "detail_ratio",
)
NUMERIC_COLUMNS = set(CSV_COLUMNS) - {"method", "prompt", "variant", "category"}


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
    Variant("CFG-rescale 100", "cfg-rescale", 100.0),
    Variant("ISM 100", "ism", 100.0),
    Variant("LODS-embed 100", "lods-embed", 100.0),
    Variant("LODS-embed 1000", "lods-embed", 1000.0),
    Variant("LODS-LoRA 100", "lods-lora", 100.0),
    Variant("VSD 7.5", "vsd", 7.5),
]
# Claim 3: the normalized estimators towards the infinite weight (the paper places floaters beyond 1000).
WEIGHT_SWEEP = [
    Variant("SDS 30", "sds", 30.0),  # SDS's own CFG sweep: 7.5, 30, 100
    Variant("LODS-embed 1e4", "lods-embed", 1e4),
    Variant("LODS-embed inf", "lods-embed", math.inf),
    Variant("SDS-norm 100", "sds-norm", 100.0),
    Variant("SDS-norm 1e4", "sds-norm", 1e4),
    Variant("SDS-norm inf", "sds-norm", math.inf),
]
# The learned estimators' learning rates, swept on the first prompts beside the default: LODS's embedding and
# VSD's LoRA (which learns from scratch, so it is the one most likely to want another rate).
LR_SWEEPS = {
    "LODS-embed 100": [Variant(f"LODS-embed 100 lr {lr:g}", "lods-embed", 100.0, lr) for lr in (1e-4, 1e-3, 1e-2)],
    "VSD 7.5": [Variant(f"VSD 7.5 lr {lr:g}", "vsd", 7.5, lr) for lr in (1e-4, 1e-2)],
}
LR_SWEEP = [v for vs in LR_SWEEPS.values() for v in vs]
ALL_VARIANTS = VARIANTS + WEIGHT_SWEEP + LR_SWEEP
QUICK_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[6], VARIANTS[7], VARIANTS[9]]


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
    variants = QUICK_VARIANTS if quick else VARIANTS + WEIGHT_SWEEP
    sweep_prompts = QUICK_PROMPTS[: 1 if quick else 3] if lr_sweep else []
    cells = [(p, v) for p in prompts for v in variants + (LR_SWEEP if p in sweep_prompts else [])]
    return [job_for(v, prompt, seed, steps, out) for seed in range(seeds) for prompt, v in cells]


def plan_from_file(path: Path, out: Path) -> list[Job]:
    """The runs a plan file declares, in its order: JSON with ``prompts``, ``variants`` (labels of
    ``ALL_VARIANTS``), ``seeds`` and ``steps``, and optionally ``steps_by_variant`` (label: steps, for a table at
    the same wall-clock budget); prompts outermost, so that a run cut short still compares every variant on the
    prompts it reached. A subset is fixed in such a file before any result is seen."""
    try:
        spec = json.loads(Path(path).read_text())
        prompts, labels, seeds, steps = spec["prompts"], spec["variants"], spec["seeds"], int(spec["steps"])
        own_steps = {str(k): int(v) for k, v in spec.get("steps_by_variant", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"cannot read the plan {path}: {err}") from err
    by_label = {v.label: v for v in ALL_VARIANTS}
    unknown = [x for x in labels if x not in by_label]
    if unknown:
        raise UserError(f"unknown variant(s) in {path}: {', '.join(unknown)}; choose from: {', '.join(by_label)}")
    from lods.priors.toy.world import parse_caption

    for p in prompts:
        try:
            parse_caption(p)
        except ValueError as err:
            raise UserError(f"{path}: {err}") from err
    if steps < 1 or not seeds or any(n < 1 for n in own_steps.values()):
        raise UserError(f"{path}: steps must be at least 1 and seeds not empty")
    if set(own_steps) - set(labels):
        raise UserError(f"{path}: steps_by_variant names variants the plan does not run")
    return [job_for(by_label[x], p, int(seed), own_steps.get(x, steps), out)
            for seed in seeds for p in prompts for x in labels]


def job_for(v: Variant, prompt: str, seed: int, steps: int, out: Path) -> Job:
    """One run of the benchmark: ``v`` on ``prompt`` with ``seed``, in ``out/runs/<variant>/<prompt>/seed<n>``."""
    config: dict[str, Any] = {
        "prompt": prompt, "prior": "toy", "backbone": "gs", "method": v.method, "cfg": v.cfg,
        "steps": steps, "seed": seed, "batch": 1, "snapshot_every": steps, "checkpoint_every": 0,
        "gaussians": {"max_points": 5000},
    }
    if v.method == "cfg-anneal":
        config["guidance"] = {"anneal_steps": steps}  # from cfg to cfg_end within the run, not over 1000 steps
    if v.learned_lr is not None:
        config["learned_lr"] = v.learned_lr
    name = slug(v.label, 32) + "/" + slug(prompt) + f"/seed{seed}"
    return Job(config, str(out / "runs" / name))


# ---------------------------------------------------------------------------- measures


def _floater(alpha: torch.Tensor, n_objects: int, hard: bool = False) -> float:
    from lods.metrics import floater_score

    return floater_score(alpha, components=n_objects, hard=hard)


@functools.lru_cache(maxsize=64)
@torch.no_grad()
def world_reference(prompt: str, views: int = 8, size: int = 64) -> dict[str, Any]:
    """The world's renders of ``prompt`` from the benchmark's turntable: colour stats, floater score, judge
    features (the reference every run of the prompt is compared with)."""
    from lods.cameras import turntable
    from lods.metrics import color_stats, detail_energy
    from lods.priors.toy.judge import judge_images, shipped_judge
    from lods.priors.toy.world import parse_caption, render_captions

    r = render_captions([prompt] * views, size=size, seed=0, cameras=turntable(views, size))
    judge = shipped_judge()
    cs = color_stats(r.rgb, r.alpha > 0.5)
    feats = judge.features(r.rgb)
    n_objects = len(parse_caption(prompt).objects)
    return {
        "prompt": prompt,
        "saturation": cs["saturation"],
        "value": cs["value"],
        "clipped": cs["clipped"],
        "detail": detail_energy(r.rgb, r.alpha > 0.5),
        "floater_score": _floater(r.alpha[:, None], n_objects),
        "floater_hard": _floater(r.alpha[:, None], n_objects, hard=True),
        "alignment": float(judge_images(judge, r.rgb, [prompt] * views)["objects_right"].float().mean()),
        "features": feats.mean(0).tolist(),
        "rgb": r.rgb,
    }


@torch.no_grad()
def measure(rgb: torch.Tensor, alpha: torch.Tensor, prompt: str, reference: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's measures of renders (B, 3, H, W) and alpha (B, 1, H, W) of ``prompt``."""
    from lods.metrics import color_stats, detail_energy
    from lods.priors.toy.judge import judge_images, shipped_judge
    from lods.priors.toy.world import parse_caption

    judge = shipped_judge()
    n_objects = len(parse_caption(prompt).objects)
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
        "floater_score": _floater(alpha, n_objects),
        "world_floater_score": reference["floater_score"],
        "floater_hard": _floater(alpha, n_objects, hard=True),
        "world_floater_hard": reference["floater_hard"],
        "detail_ratio": detail_energy(rgb.clamp(0, 1), alpha[:, 0] > 0.5) / max(reference["detail"], 1e-8),
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
    for name in (checkpoint.LATEST, checkpoint.PREVIOUS):  # 24 x 8 x seeds checkpoints would fill the disk
        (out / name).unlink(missing_ok=True)
    return row


# ---------------------------------------------------------------------------- report


def _variant_label(row: dict[str, Any]) -> str:
    for v in ALL_VARIANTS:
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


def mean_table(rows: list[dict[str, Any]], div: dict[str, float], floater: str = "floater_score"
               ) -> list[dict[str, Any]]:
    order = [v.label for v in ALL_VARIANTS]
    labels = sorted({r["variant"] for r in rows}, key=lambda x: order.index(x) if x in order else len(order))
    table = []
    for label in labels:
        rs = [r for r in rows if r["variant"] == label]
        entry = {"variant": label, "runs": len(rs)}
        for k in ("alignment", "saturation_error", "artifact_score", "floater_score", "clipped", "it_per_s"):
            entry[k] = float(np.mean([_num(r, k) for r in rs]))
        entry["floater"] = float(np.nanmean([_num(r, floater) for r in rs]))
        for cat in QUALITY_PROMPTS:
            cr = [r["alignment"] for r in rs if r["category"] == cat]
            entry[f"alignment_{cat}"] = float(np.mean(cr)) if cr else float("nan")
        entry["diversity"] = div.get(label, float("nan"))
        table.append(entry)
    return table


def _num(row: dict[str, Any], key: str) -> float:
    try:
        return float(row.get(key, ""))
    except (TypeError, ValueError):
        return float("nan")


def floater_key(rows: list[dict[str, Any]]) -> str:
    """``floater_hard`` (opaque pixels) where the runs measured it; older results have the soft measure only."""
    return "floater_hard" if any(math.isfinite(_num(r, "floater_hard")) for r in rows) else "floater_score"


@dataclass(frozen=True)
class Comparison:
    """One paired test of a claim: ``b`` against ``a`` on ``key`` (absolute value with ``absolute``), the
    claim expecting b ``claimed`` ("less" or "greater") than a."""

    claim: int
    a: str
    b: str
    key: str
    what: str
    claimed: str
    absolute: bool = False

    def value(self, row: dict[str, Any]) -> float:
        if self.key == "detail_ratio":  # distance from the world's level of detail, either way, in octaves
            v = _num(row, self.key)
            return abs(math.log2(v)) if v > 0 else float("nan")
        v = _num(row, self.key)
        return abs(v) if self.absolute else v


CLAIMS = {
    1: "SDS at high CFG over-saturates",
    2: "LODS fixes the colours and keeps the detail at the same CFG",
    3: "Very large CFG (the VSD-like limit) creates floaters",
}


def comparisons(rows: list[dict[str, Any]]) -> list[Comparison]:
    """The paired tests of the three claims that ``rows`` have both variants for."""
    fl = floater_key(rows)
    fl_what = "floater score (opaque pixels)" if fl == "floater_hard" else "floater score (soft alpha)"
    out = [
        Comparison(1, "SDS 7.5", "SDS 100", "saturation", "saturation", "greater"),
        Comparison(1, "SDS 7.5", "SDS 100", "saturation_error", "abs. saturation error", "greater", absolute=True),
        Comparison(1, "SDS 7.5", "SDS 100", "clipped", "clipped pixels", "greater"),
        Comparison(2, "SDS 100", "LODS-embed 100", "saturation_error", "abs. saturation error", "less", absolute=True),
        Comparison(2, "SDS 100", "LODS-embed 100", "feature_distance", "judge-feature distance to the world",
                   "less"),
        Comparison(2, "SDS 100", "LODS-embed 100", "detail_ratio", "abs. log2 detail ratio (high frequencies)", "less"),
        Comparison(2, "SDS 100", "LODS-embed 100", "alignment", "alignment", "greater"),
    ]
    for other in ("CFG-anneal 100", "CFG-rescale 100", "ISM 100"):  # LODS against the simple fixes
        out.append(Comparison(2, other, "LODS-embed 100", "saturation_error", "abs. saturation error", "less",
                              absolute=True))
    for a, b in (("LODS-embed 100", "LODS-embed 1000"), ("LODS-embed 100", "LODS-embed 1e4"),
                 ("LODS-embed 100", "LODS-embed inf"), ("SDS-norm 100", "SDS-norm 1e4"),
                 ("SDS-norm 100", "SDS-norm inf")):
        out.append(Comparison(3, a, b, fl, fl_what, "greater"))
    variants = {r["variant"] for r in rows}
    return [c for c in out if {c.a, c.b} <= variants and any(math.isfinite(c.value(r)) for r in rows
                                                             if r["variant"] == c.b)]


def paired_results(rows: list[dict[str, Any]]) -> list[tuple[Comparison, str, PairedResult]]:
    """Every comparison over all prompts and per category: (comparison, category or "all", result)."""
    out = []
    for c in comparisons(rows):
        for cat in ("all", *QUALITY_PROMPTS):
            prompts = None if cat == "all" else {r["prompt"] for r in rows if r["category"] == cat}
            res = paired_rows(rows, c.a, c.b, c.value, c.claimed, prompts)
            if res.n:
                out.append((c, cat, res))
    return out


def claims(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's three claims as paired per-prompt tables (markdown lines)."""
    results = paired_results(rows)
    lines = []
    for number, text in CLAIMS.items():
        mine = [(c, cat, r) for c, cat, r in results if c.claim == number]
        if not mine:
            continue
        lines += [f"**{number}. {text}.**", "",
                  "| B vs A | measure | prompts | A | B | B - A [95% interval] | prompts as claimed / against | "
                  "Wilcoxon p | verdict |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for c, cat, r in mine:
            arrow = "<" if c.claimed == "less" else ">"
            lines.append(
                f"| {c.b} vs {c.a} | {c.what} (claimed B {arrow} A) | {cat} ({r.n}) | {r.mean_a:.3f} | "
                f"{r.mean_b:.3f} | {r.interval()} | {r.better} / {r.worse} | {r.p_value:.3f} | {r.verdict}"
                f"{'' if r.verdict == NOT_SHOWN or r.p_value < 0.05 else ' (weak)'} |"
            )
        lines.append("")
    return lines


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv`` with numbers as floats (empty cells stay empty)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in NUMERIC_COLUMNS and v not in ("", None):
                r[k] = int(float(v)) if k in ("seed", "steps") else float(v)
    return rows


def _steps_text(rows: list[dict[str, Any]]) -> str:
    """"300 steps each", or each variant's steps where they differ (a same-wall-clock plan)."""
    by_variant: dict[str, set[int]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], set()).add(int(r["steps"]))
    counts = set().union(*by_variant.values()) if by_variant else {0}
    if len(counts) == 1:
        return f"{counts.pop()} steps each"
    return "steps: " + ", ".join(f"{v} {'/'.join(str(n) for n in sorted(s))}" for v, s in by_variant.items())


def write_report(rows: list[dict[str, Any]], references: dict[str, dict], out: Path, jobs: list[Job],
                 note: str = "") -> None:
    """``results.csv`` (one row per run), ``report.md`` (the mean table and the paired claims) and ``grid.png``
    (where the runs' folders are there to draw it from)."""
    for r in rows:
        r["variant"] = _variant_label(r)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["variant"], r["prompt"], int(r["seed"]))):
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    div: dict[str, list[float]] = {}
    by_cell: dict[tuple[str, str], list[Path]] = {}
    for job in jobs:
        row = next((r for r in rows if r.get("_folder") and Path(r["_folder"]) == Path(job.out)), None)
        if row:
            by_cell.setdefault((row["variant"], row["prompt"]), []).append(Path(job.out))
    for (label, prompt), folders in by_cell.items():
        d = diversity(folders, references[prompt])
        if math.isfinite(d):
            div.setdefault(label, []).append(d)
    fl = floater_key(rows)
    table = mean_table(rows, {k: float(np.mean(v)) for k, v in div.items()}, fl)
    world = {k: float(np.mean([references[p][k] for p in references])) for k in ("saturation", "clipped",
                                                                                  fl, "alignment")}
    fl_name = "opaque pixels (alpha > 0.5)" if fl == "floater_hard" else "soft alpha"
    about = (out / "about.txt").read_text().strip() if (out / "about.txt").exists() else ""
    lines = [
        "# Quality benchmark (toy prior, Gaussian splats)",
        "",
        *([about, ""] if about else []),
        f"{len(rows)} runs{note}, {len({r['prompt'] for r in rows})} prompts, seeds "
        f"{sorted({int(r['seed']) for r in rows})}, {_steps_text(rows)}. "
        f"World renders of the same prompts: saturation {world['saturation']:.3f}, clipped {world['clipped']:.3f}, "
        f"floater score {world[fl]:.3f}, judged right {world['alignment']:.3f}. Floater scores count "
        f"{fl_name} outside one component per object.",
        "",
        "| method | runs | alignment | single | surr. | multi | saturation error | artifact | floater | "
        "clipped | diversity | it/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in table:
        lines.append(
            f"| {t['variant']} | {t['runs']} | {t['alignment']:.3f} | {t['alignment_single']:.3f} | "
            f"{t['alignment_surroundings']:.3f} | {t['alignment_multi']:.3f} | {t['saturation_error']:+.3f} | "
            f"{t['artifact_score']:.3f} | {t['floater']:.3f} | {t['clipped']:.3f} | {t['diversity']:.3f} | "
            f"{t['it_per_s']:.2f} |"
        )
    lines += lr_table(rows)
    lines += [
        "", "## The paper's claims on this world, paired per prompt", "",
        "Each prompt gives one difference B - A (its seeds averaged); the interval is a bootstrap 95% interval "
        "of the mean difference (BCa, 9,999 resamples); Wilcoxon p is the two-sided signed-rank test. A "
        "comparison **holds** where the interval lies wholly on the claimed side of 0, **does not hold** where "
        "it lies wholly on the other side, and is **not shown** where it includes 0. Errors are compared as "
        "absolute values per prompt, so that over- and under-saturation do not cancel. With 7 or 8 prompts a "
        "category the bootstrap interval tends to be too narrow: a verdict marked (weak) has a signed-rank p of "
        "0.05 or more.", "",
        *claims(rows),
    ]
    (out / "report.md").write_text("\n".join(lines).replace("nan", "-"))
    (out / "table.json").write_text(json.dumps(table, indent=2))
    if all(r.get("_folder") for r in rows):
        _write_grid(rows, references, out)


def lr_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each learned estimator by learning rate, on the prompts its sweep ran (the default rate's runs restricted
    to the same prompts and seeds, so that the rows compare)."""
    from lods.priors.diffusers_prior import prior_defaults

    lines = []
    for base, variants in LR_SWEEPS.items():
        sweep = [r for r in rows if r["variant"] in {v.label for v in variants}]
        if not sweep:
            continue
        cells = {(r["prompt"], r["seed"]) for r in sweep}
        method = variants[0].method
        default_lr = prior_defaults("toy").learned_rate(method)
        default = [r for r in rows if r["variant"] == base and (r["prompt"], r["seed"]) in cells]
        groups = [(f"{default_lr:g} (default)", default)]
        groups += [(f"{v.learned_lr:g}", [r for r in sweep if r["variant"] == v.label]) for v in variants]
        lines += ["", f"Learning rate of {base} on {len({p for p, _ in cells})} prompt(s): "
                  + ", ".join(sorted({p for p, _ in cells})), "",
                  "| learning rate | runs | alignment | saturation error | artifact | floater |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        fl = floater_key(rows)
        for name, rs in groups:
            if rs:
                m = {k: float(np.mean([_num(r, k) for r in rs]))
                     for k in ("alignment", "saturation_error", "artifact_score", fl)}
                lines.append(f"| {name} | {len(rs)} | {m['alignment']:.3f} | {m['saturation_error']:+.3f} | "
                             f"{m['artifact_score']:.3f} | {m[fl]:.3f} |")
    return lines


def _write_grid(rows: list[dict[str, Any]], references: dict[str, dict], out: Path) -> None:
    """One row per method (seed 0, first view), the world's render on top; one column per prompt."""
    from lods import export

    prompts = [p for ps in QUALITY_PROMPTS.values() for p in ps if p in references]
    order = [v.label for v in ALL_VARIANTS]
    labels = sorted({r["variant"] for r in rows}, key=lambda x: order.index(x) if x in order else len(order))
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
    plan_file: Path | None = None,
) -> list[dict[str, Any]]:
    jobs = plan_from_file(plan_file, out) if plan_file else plan(quick, seeds, steps, out, lr_sweep)
    out.mkdir(parents=True, exist_ok=True)
    todo = [] if report_only else [j for j in jobs if not (Path(j.out) / "quality.json").exists()]
    print(f"quality benchmark: {len(jobs)} runs, {len(jobs) - len(todo)} already done; results in {out} "
          "(another process started on the same folder shares the work)")
    run_all(_quality_job, todo, executor, ray_address, "quality", lambda job: job.out)
    rows = []
    for job in jobs:
        q = Path(job.out) / "quality.json"
        if q.exists():
            rows.append({**json.loads(q.read_text()), "_folder": job.out})
    note = f" of {len(jobs)} planned"
    if not rows and report_only and (out / "results.csv").exists():
        rows = read_results(out / "results.csv")  # the run folders are gone: the report from the table alone
        note = " (read from results.csv; no run folders, so no grid and no diversity)"
    references = {p: world_reference(p) for p in sorted({r["prompt"] for r in rows})}
    if rows:
        write_report(rows, references, out, jobs, note)
    return rows
