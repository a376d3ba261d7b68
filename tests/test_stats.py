"""The benchmark's paired statistics on synthetic tables whose answer is known."""

import csv

import numpy as np
import pytest

from lods.bench import quality
from lods.bench.stats import FAILS, HOLDS, NOT_SHOWN, bootstrap_interval, paired_test, per_prompt, verdict


def test_verdict_follows_the_interval_and_the_claimed_side():
    assert verdict(-0.3, -0.1, "less") == HOLDS
    assert verdict(-0.3, -0.1, "greater") == FAILS
    assert verdict(0.1, 0.3, "greater") == HOLDS
    assert verdict(0.1, 0.3, "less") == FAILS
    assert verdict(-0.1, 0.3, "less") == NOT_SHOWN  # an interval including zero never holds
    assert verdict(-0.1, 0.3, "greater") == NOT_SHOWN
    assert verdict(float("nan"), float("nan"), "less") == NOT_SHOWN
    with pytest.raises(ValueError):
        verdict(0.1, 0.2, "better")


def test_bootstrap_interval_matches_the_normal_theory_one_on_a_large_sample():
    rng = np.random.default_rng(3)
    d = rng.normal(0.4, 1.0, 400)
    lo, hi = bootstrap_interval(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - half, abs=0.02)
    assert hi == pytest.approx(d.mean() + half, abs=0.02)
    assert bootstrap_interval([0.2, 0.2, 0.2]) == (0.2, 0.2)  # no spread: the interval is the value
    assert all(np.isnan(bootstrap_interval([0.5])))  # one prompt shows nothing


def test_interval_including_zero_does_not_hold_whatever_the_means():
    a = [0.30, 0.10, 0.25, 0.05, 0.20, 0.15, 0.35, 0.12]
    b = [0.10, 0.30, 0.05, 0.25, 0.20, 0.10, 0.30, 0.15]  # lower on average, but both ways across prompts
    r = paired_test(a, b, "less")
    assert r.lo < 0 < r.hi
    assert r.verdict == NOT_SHOWN
    assert (r.better, r.worse) == (4, 3)
    assert r.diff == pytest.approx(np.mean(b) - np.mean(a))


def test_consistent_paired_gain_holds_and_loss_does_not():
    a = np.array([0.30, 0.10, 0.25, 0.05, 0.20, 0.15, 0.35, 0.12])
    better = paired_test(a, a - np.linspace(0.04, 0.06, 8), "less")
    assert better.verdict == HOLDS and better.hi < 0 and better.better == 8
    assert better.p_value < 0.01
    worse = paired_test(a, a + np.linspace(0.04, 0.06, 8), "less")
    assert worse.verdict == FAILS and worse.lo > 0 and worse.worse == 8
    with pytest.raises(ValueError):
        paired_test([1, 2], [1], "less")


def _rows(variant, errors, prompts, seed=0, key="saturation_error"):
    return [{"variant": variant, "prompt": p, "seed": seed, "category": quality.category_of(p), key: e}
            for p, e in zip(prompts, errors)]


SINGLE = quality.QUALITY_PROMPTS["single"]
MULTI = quality.QUALITY_PROMPTS["multi"]


def _verdict(rows, measure, a, b, category="all"):
    for c, cat, r in quality.paired_results(rows):
        if (c.what, c.a, c.b, cat) == (measure, a, b, category):
            return r
    raise AssertionError(f"no {measure} {b} vs {a} ({category})")


def test_opposite_sign_errors_do_not_cancel():
    # SDS is off by 0.2 either way (its mean signed error is 0); LODS by 0.01: LODS is closer on every prompt.
    sds = [0.2 if i % 2 else -0.2 for i in range(8)]
    lods = [0.01 if i % 2 else -0.01 for i in range(8)]
    rows = _rows("SDS 100", sds, SINGLE) + _rows("LODS-embed 100", lods, SINGLE)
    r = _verdict(rows, "abs. saturation error", "SDS 100", "LODS-embed 100")
    assert r.verdict == HOLDS
    assert r.mean_a == pytest.approx(0.2) and r.mean_b == pytest.approx(0.01)
    # ... and the other way round: a method whose errors cancel on average is still far off.
    swapped = _rows("SDS 100", lods, SINGLE) + _rows("LODS-embed 100", sds, SINGLE)
    assert _verdict(swapped, "abs. saturation error", "SDS 100", "LODS-embed 100").verdict == FAILS


def test_verdicts_per_category_and_overall():
    # LODS better on single objects, worse by as much on two objects: holds, does not hold, not shown overall.
    prompts = SINGLE + MULTI
    sds = [0.15] * 8 + [0.05] * 8
    lods = list(np.linspace(0.03, 0.05, 8)) + list(np.linspace(0.15, 0.17, 8))
    rows = _rows("SDS 100", sds, prompts) + _rows("LODS-embed 100", lods, prompts)
    m, a, b = "abs. saturation error", "SDS 100", "LODS-embed 100"
    assert _verdict(rows, m, a, b, "single").verdict == HOLDS
    assert _verdict(rows, m, a, b, "multi").verdict == FAILS
    overall = _verdict(rows, m, a, b)
    assert overall.n == 16 and overall.verdict == NOT_SHOWN
    assert not any(cat == "surroundings" for _, cat, _ in quality.paired_results(rows))


def test_seeds_of_a_prompt_are_averaged_before_pairing():
    rows = _rows("SDS 100", [0.1, 0.3], SINGLE[:2], seed=0) + _rows("SDS 100", [0.3, 0.5], SINGLE[:2], seed=1)
    assert per_prompt(rows, "SDS 100", lambda r: r["saturation_error"]) == pytest.approx(
        {SINGLE[0]: 0.2, SINGLE[1]: 0.4})
    both = rows + _rows("LODS-embed 100", [0.0, 0.0], SINGLE[:2])
    assert _verdict(both, "abs. saturation error", "SDS 100", "LODS-embed 100").n == 2


def test_claims_report_states_the_interval_and_verdict(tmp_path):
    """``--report-only`` on a results.csv alone (no run folders) writes the paired report."""
    out = tmp_path / "q"
    out.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(SINGLE[:4] + MULTI[:4]):
        for label, method, cfg, sat in (("SDS 7.5", "sds", 7.5, 0.05), ("SDS 100", "sds", 100.0, 0.15),
                                        ("LODS-embed 100", "lods-embed", 100.0, 0.01)):
            rows.append({"method": method, "cfg": cfg, "prompt": p, "seed": 0, "alignment": 1.0,
                         "saturation_error": sat + 0.01 * rng.random(), "artifact_score": 0.2,
                         "floater_score": 0.05, "variant": label, "learned_lr": "",
                         "category": quality.category_of(p), "saturation": 0.5 + sat, "world_saturation": 0.5,
                         "value": 0.7, "clipped": 0.0, "feature_distance": 0.2 + 0.01 * i,
                         "world_floater_score": 0.02, "steps": 300, "seconds": 20.0, "it_per_s": 10.0})
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=quality.CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    back = quality.run_quality(out, report_only=True, seeds=1)
    assert len(back) == len(rows)
    report = (out / "report.md").read_text()
    assert "read from results.csv" in report
    line = next(s for s in report.splitlines() if s.startswith("| LODS-embed 100 vs SDS 100 | abs. saturation")
                and "| all (8) |" in s)
    assert "| holds" in line and "8 / 0" in line
    assert "floater score (soft alpha)" not in report  # no floater comparison without the variants it needs
    assert "| SDS 100 | 8 |" in report


def test_learning_rate_tables_compare_each_learned_estimator_on_its_sweep_prompts():
    def row(variant, prompt, sat):
        return {"variant": variant, "prompt": prompt, "seed": 0, "alignment": 1.0, "saturation_error": sat,
                "artifact_score": 0.2, "floater_score": 0.1, "floater_hard": 0.05}

    rows = [row("VSD 7.5", "a red cube", 0.3), row("VSD 7.5", "a blue sphere", 0.9),  # the second is not swept
            row("VSD 7.5 lr 0.0001", "a red cube", 0.1), row("LODS-embed 100", "a red cube", 0.0)]
    lines = quality.lr_table(rows)
    assert any(s.startswith("Learning rate of VSD 7.5 on 1 prompt(s)") for s in lines)
    assert "| 0.001 (default) | 1 | 1.000 | +0.300 | 0.200 | 0.050 |" in lines  # the same prompt only
    assert "| 0.0001 | 1 | 1.000 | +0.100 | 0.200 | 0.050 |" in lines
    assert not any("LODS-embed" in s for s in lines)  # no LODS sweep ran
