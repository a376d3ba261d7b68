"""The effective CFG of LODS-embed over training on the toy prior: does the learned null embedding lower the
guidance? (the weight of plain SDS whose direction is closest to LODS's, fitted every step;
``lods.guidance.effective_cfg``).

    python -m examples.effective_cfg --out runs/effective-cfg [--steps 300] [--report-only]

The settings were fixed before any run: the four prompts of the README's 2D comparison, seed 0, Gaussian
splats, LODS-embed at CFG 100 with the toy prior's embedding rate, 300 steps, the parts measured every
step. Per prompt: the median effective CFG over steps 0-29 (alpha has barely moved) and over the last
100 steps, and the median share of LODS's direction that the SDS fit explains (R^2). Across prompts: the
late median against w (claimed: below) and against the early median, paired, with 95% bootstrap
intervals (``lods.bench.stats``). One JSON per prompt in ``--out`` (a finished prompt is skipped: it
resumes), then ``effective_cfg.json`` with the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone on grass"]
CFG = 100.0
EARLY, LATE = 30, 100  # steps at the start and at the end whose medians are compared
KEYS = ("eff_cfg", "eff_cfg_r2", "classifier_norm", "denoising_norm", "drift_norm", "cos_drift_classifier",
        "cos_drift_denoising", "cos_classifier_denoising", "embedding_distance", "t")


def run_prompt(prompt: str, steps: int, seed: int) -> dict:
    from lods.config import RunConfig
    from lods.trainer import Trainer, shared_prior

    config = RunConfig.from_dict(dict(prompt=prompt, backbone="gs", method="lods-embed", cfg=CFG, steps=steps,
                                      seed=seed, guidance={"parts_every": 1}))
    trainer = Trainer(config, prior=shared_prior(config.prior))
    trainer.run()
    trainer.close()
    history = [{k: h[k] for k in ("step", *KEYS) if k in h} for h in trainer.history]
    return {"prompt": prompt, "seed": seed, "steps": steps, "cfg": CFG, "learned_lr": trainer.estimator.lr,
            "history": history}


def summarize(runs: list[dict]) -> dict:
    from lods.bench.stats import paired_test

    rows = []
    for r in runs:
        h = r["history"]
        n = r["steps"]
        early = [x["eff_cfg"] for x in h if x["step"] < EARLY and "eff_cfg" in x]
        late = [x["eff_cfg"] for x in h if x["step"] >= n - LATE and "eff_cfg" in x]
        r2 = [x["eff_cfg_r2"] for x in h if x["step"] >= n - LATE and "eff_cfg_r2" in x]
        rows.append({"prompt": r["prompt"], "early_median": statistics.median(early),
                     "late_median": statistics.median(late), "late_r2_median": statistics.median(r2),
                     "late_steps_without_fit": LATE - len(late),
                     "embedding_distance_end": h[-1].get("embedding_distance")})
    w = [CFG] * len(rows)
    vs_w = paired_test(w, [r["late_median"] for r in rows], "less")
    vs_early = paired_test([r["early_median"] for r in rows], [r["late_median"] for r in rows], "less")
    return {
        "settings": {"prompts": PROMPTS, "cfg": CFG, "method": "lods-embed", "backbone": "gs",
                     "steps": runs[0]["steps"], "seed": runs[0]["seed"], "learned_lr": runs[0]["learned_lr"],
                     "early_steps": EARLY, "late_steps": LATE},
        "per_prompt": rows,
        "late_minus_w": {"mean": vs_w.diff, "lo": vs_w.lo, "hi": vs_w.hi, "p": vs_w.p_value,
                         "verdict": vs_w.verdict, "below": vs_w.better},
        "late_minus_early": {"mean": vs_early.diff, "lo": vs_early.lo, "hi": vs_early.hi, "p": vs_early.p_value,
                             "verdict": vs_early.verdict, "below": vs_early.better},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    runs = []
    for i, prompt in enumerate(PROMPTS):
        path = out / f"{i}.json"
        if not path.exists():
            if args.report_only:
                continue
            path.write_text(json.dumps(run_prompt(prompt, args.steps, args.seed)))
            print(f"{prompt}: done", flush=True)
        runs.append(json.loads(path.read_text()))
    if runs:
        summary = summarize(runs)
        (out / "effective_cfg.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))


if __name__ == "__main__":
    main()
