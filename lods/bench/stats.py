"""Paired statistics for the benchmark's verdicts: one difference per prompt, its bootstrap interval, a
signed-rank test, and a verdict that says only what the interval shows.

Two methods run on the same prompts (and seeds), so each prompt gives one paired difference
``b - a`` of a measure (seeds of a prompt are averaged first: the prompt is the unit). A claim names the
direction it expects (``"less"``: b below a, ``"greater"``: b above a) and

- **holds** when the 95% bootstrap interval of the mean difference lies wholly on the claimed side of 0,
- **does not hold** when it lies wholly on the other side,
- is **not shown** otherwise (the interval includes 0, or there are fewer than two prompts).

The Wilcoxon signed-rank p-value (two-sided, scipy) and the count of prompts where b is better and
worse are reported beside it; the verdict follows the interval alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

HOLDS, FAILS, NOT_SHOWN = "holds", "does not hold", "not shown"


@dataclass(frozen=True)
class PairedResult:
    """``a`` and ``b``'s means over the paired prompts, the mean of ``b - a`` with its 95% interval."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    lo: float
    hi: float
    better: int  # prompts where b moved in the claimed direction
    worse: int  # prompts where b moved the other way
    p_value: float
    verdict: str

    def interval(self) -> str:
        return f"{self.diff:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}]"


def bootstrap_interval(d: np.ndarray, confidence: float = 0.95, resamples: int = 9999,
                       seed: int = 0) -> tuple[float, float]:
    """The ``confidence`` interval of mean(d) by scipy's BCa bootstrap (percentile where BCa is undefined,
    e.g. all differences equal); a fixed seed, so a report is the same each time it is written."""
    d = np.asarray(d, dtype=float)
    if len(d) < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                  method=method, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return float("nan"), float("nan")


def verdict(lo: float, hi: float, claimed: str) -> str:
    """``holds`` / ``does not hold`` / ``not shown`` from the interval of ``b - a`` and the claimed sign."""
    if claimed not in ("less", "greater"):
        raise ValueError(f"claimed must be 'less' or 'greater', not {claimed!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_SHOWN
    below, above = hi < 0, lo > 0
    if (claimed == "less" and below) or (claimed == "greater" and above):
        return HOLDS
    if (claimed == "less" and above) or (claimed == "greater" and below):
        return FAILS
    return NOT_SHOWN


def paired_test(a: Iterable[float], b: Iterable[float], claimed: str, seed: int = 0) -> PairedResult:
    """Paired comparison of equal-length samples ``a`` and ``b`` (one value per prompt, same order)."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    d = b - a
    n = len(d)
    lo, hi = bootstrap_interval(d, seed=seed)
    p = float("nan")
    if n >= 2 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    sign = -1 if claimed == "less" else 1
    return PairedResult(
        n=n,
        mean_a=float(a.mean()) if n else float("nan"),
        mean_b=float(b.mean()) if n else float("nan"),
        diff=float(d.mean()) if n else float("nan"),
        lo=lo, hi=hi,
        better=int((sign * d > 0).sum()),
        worse=int((sign * d < 0).sum()),
        p_value=p,
        verdict=verdict(lo, hi, claimed),
    )


def per_prompt(rows: list[dict[str, Any]], variant: str, measure: Callable[[dict[str, Any]], float]
               ) -> dict[str, float]:
    """``measure`` of ``variant``'s runs, averaged over each prompt's seeds: {prompt: value}."""
    values: dict[str, list[float]] = {}
    for r in rows:
        if r["variant"] == variant:
            v = measure(r)
            if math.isfinite(v):
                values.setdefault(r["prompt"], []).append(v)
    return {p: float(np.mean(v)) for p, v in values.items()}


def paired_rows(rows: list[dict[str, Any]], a: str, b: str, measure: Callable[[dict[str, Any]], float],
                claimed: str, prompts: Iterable[str] | None = None) -> PairedResult:
    """Variant ``b`` against ``a`` on the prompts both ran (restricted to ``prompts`` if given)."""
    pa, pb = per_prompt(rows, a, measure), per_prompt(rows, b, measure)
    keep = set(prompts) if prompts is not None else None
    common = sorted(p for p in pa.keys() & pb.keys() if keep is None or p in keep)
    return paired_test([pa[p] for p in common], [pb[p] for p in common], claimed)
