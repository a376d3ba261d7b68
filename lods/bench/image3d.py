"""Table 2 on the toy world: image to 3D from one view of held-out world scenes, measured against the world's
true novel views.

Inputs: scenes of the view-conditioned prior's held-out stream (each with a colour-shape pair neither prior
trained on), the categories in turn (single, with surroundings, two objects), each seen from the stream's random
camera (:func:`lods.runs.image3d.world_input`). Rows (fixed before any result was seen):

* ``view-only``: the view-conditioned prior's SDS and the reference-view losses, no text prior (Zero-1-to-3);
* ``magic123-sds``: Magic123, SDS on the text prior (CFG 100);
* ``lods-embed``, ``lods-lora``: Magic123 with LODS on the text prior (the paper's rows).

Measures on the three novel views (input azimuth + 90, 180, 270 degrees, elevation 20): PSNR against the true
views; a perceptual distance, 1 - cosine similarity of the judge's pooled features (no download; LPIPS would need
downloaded weights); alignment, the share of views the judge reads as the scene's caption (in place of CLIP
similarity). Paired statistics over scenes (seeds averaged first) with 95% bootstrap intervals. Each run is a
folder; a rerun skips finished ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lods.bench.stats import paired_test

VARIANTS: dict[str, dict[str, Any]] = {
    "view-only": {"method": "sds", "image3d": {"text_weight": 0.0}},
    "magic123-sds": {"method": "sds"},
    "lods-embed": {"method": "lods-embed"},
    "lods-lora": {"method": "lods-lora"},
}
FULL_SCENES = tuple(range(9))  # three per category
QUICK_SCENES = (0, 1, 2)
DEFAULT_STEPS = 300
MEASURES = {"psnr": "greater", "feature_distance": "less", "judged_right": "greater"}
COMPARISONS = (("view-only", "magic123-sds"), ("magic123-sds", "lods-embed"), ("magic123-sds", "lods-lora"),
               ("view-only", "lods-embed"))


def run_image3d_bench(out: Path, quick: bool = False, seeds: int = 1, steps: int = DEFAULT_STEPS,
                      report_only: bool = False, variants: tuple[str, ...] = tuple(VARIANTS),
                      scenes: tuple[int, ...] | None = None, prior: Any = None, view_prior: Any = None,
                      run_settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run what is missing (unless ``report_only``), then write ``report.json`` and ``report.md``; the rows."""
    from lods.runs.image3d import generate_from_image, world_input

    out = Path(out)
    scenes = scenes if scenes is not None else (QUICK_SCENES if quick else FULL_SCENES)
    plan = {"scenes": list(scenes), "variants": list(variants), "seeds": seeds, "steps": steps,
            "settings": run_settings or {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    for i in scenes:
        image = world_input(out / "inputs" / f"scene_{i}.png", i)
        for name in variants:
            for seed in range(seeds):
                folder = out / "runs" / f"scene{i}-{name}-seed{seed}"
                if report_only or (folder / "summary.json").is_file():
                    continue
                if prior is None or view_prior is None:
                    prior, view_prior = _priors(prior, view_prior)
                cfg = {"steps": steps, "seed": seed, "cfg": 100.0, **(run_settings or {}), **VARIANTS[name]}
                cfg["image3d"] = {**(run_settings or {}).get("image3d", {}), **VARIANTS[name].get("image3d", {})}
                generate_from_image(cfg, image, folder, prior=prior, view_prior=view_prior, progress=False,
                                    video=False)
    rows = collect(out)
    write_report(out, rows, plan)
    return rows


def _priors(prior: Any, view_prior: Any) -> tuple[Any, Any]:
    import torch

    from lods.runs.image3d import load_view_prior
    from lods.trainer import load_prior

    cpu = torch.device("cpu")
    return prior or load_prior("toy", cpu), view_prior or load_view_prior("toy-views", cpu)


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per finished run: scene, variant, seed and the measures of its novel views."""
    rows = []
    for path in sorted((out / "runs").glob("scene*-*-seed*/summary.json")):
        scene, rest = path.parent.name[len("scene"):].split("-", 1)
        variant, seed = rest.rsplit("-seed", 1)
        s = json.loads(path.read_text())
        m = s.get("image3d", {})
        if "novel_psnr_mean" not in m:
            continue
        rows.append({"scene": int(scene), "variant": variant, "seed": int(seed), "psnr": m["novel_psnr_mean"],
                     "feature_distance": m["novel_feature_distance"], "judged_right": m["novel_judged_right"],
                     "reference_psnr": m["reference_psnr"], "seconds": s.get("seconds"), "caption": s["prompt"]})
    return rows


def _per_scene(rows: list[dict[str, Any]], variant: str, measure: str) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for r in rows:
        if r["variant"] == variant:
            by.setdefault(r["scene"], []).append(float(r[measure]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def write_report(out: Path, rows: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    variants = [v for v in plan["variants"] if any(r["variant"] == v for r in rows)]
    means = {v: {m: _mean([r[m] for r in rows if r["variant"] == v]) for m in (*MEASURES, "reference_psnr")}
             for v in variants}
    tests = []
    for a, b in COMPARISONS:
        if a not in variants or b not in variants:
            continue
        for measure, claimed in MEASURES.items():
            pa, pb = _per_scene(rows, a, measure), _per_scene(rows, b, measure)
            common = sorted(set(pa) & set(pb))
            res = paired_test([pa[k] for k in common], [pb[k] for k in common], claimed)
            tests.append({"a": a, "b": b, "measure": measure, "claimed": claimed, "n": res.n, "diff": res.diff,
                          "lo": res.lo, "hi": res.hi, "p_value": res.p_value, "verdict": res.verdict})
    report = {"plan": plan, "means": means, "tests": tests, "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| variant | PSNR (dB) | feature distance | judged right | reference PSNR |", "|---|---|---|---|---|"]
    for v in variants:
        m = means[v]
        lines.append(f"| {v} | {m['psnr']:.2f} | {m['feature_distance']:.3f} | {m['judged_right']:.3f} | "
                     f"{m['reference_psnr']:.2f} |")
    lines += ["", "| b vs a | measure | b - a [95% CI] | n scenes | verdict (claimed) |", "|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t['b']} vs {t['a']} | {t['measure']} | {t['diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}] | "
                     f"{t['n']} | {t['verdict']} ({t['claimed']}) |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def _mean(xs: list[float]) -> float:
    return sum(float(x) for x in xs) / len(xs) if xs else float("nan")
