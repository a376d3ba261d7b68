"""Plain data for the page: DataFrames for the live plots and one image of the preview renders.

Each plot is one metric of ``Snapshot.history`` against the step, plus a second series that marks
every live knob change with a vertical tooth (hover it: ``CFG 100 → 30 @ 120``) so that a teacher
can point at the moment the CFG weight was turned and at what the curves did next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch


@dataclass(frozen=True)
class PlotSpec:
    key: str  # the history column
    title: str
    caption: str


PLOTS = (
    PlotSpec("loss", "Scene loss", "score-distillation loss on the renders (the theta step)"),
    PlotSpec("update_loss", "α / LoRA update loss",
             "denoising loss of the learned parameters: α (Eq. 8), the LoRA (Eq. 10) or VSD's LoRA"),
    PlotSpec("embedding_distance", "Embedding distance",
             "‖α − α₀‖ / ‖α₀‖: how far the learned unconditional embedding moved from the null one (lods-embed)"),
    PlotSpec("cfg", "Effective CFG weight", "the guidance weight w used at each step"),
    PlotSpec("saturation", "Saturation", "mean colour saturation of the object in the preview views"),
    PlotSpec("floater_score", "Floater score",
             "share of rendered opacity outside the largest connected object (3D backbones)"),
)

KNOB_LABELS = {"cfg": "CFG", "lr_scale": "scene lr ×", "learned_lr": "learned lr"}  # short, for plot marks
KNOB_SERIES = "knob change"
COLUMNS = ["step", "value", "series", "change"]


def plot_colors(spec: PlotSpec) -> dict[str, str]:
    """The two series of every plot and their colours (fixed: Gradio's plot keeps the series it first saw)."""
    return {spec.title: "#2563eb", KNOB_SERIES: "#ea580c"}


def _fmt(v: Any) -> str:
    if v is None:
        return "default"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def knob_label(change: dict[str, Any]) -> str:
    """``CFG 100 → 30 @ 120`` for one entry of ``Snapshot.knob_changes``."""
    name = KNOB_LABELS.get(change["knob"], change["knob"])
    return f"{name} {_fmt(change['old'])} → {_fmt(change['new'])} @ {change['step']}"


def metric_frame(history: Sequence[dict[str, Any]], knob_changes: Sequence[dict[str, Any]], spec: PlotSpec,
                 max_points: int = 120, max_marks: int = 12) -> pd.DataFrame:
    """Columns step, value, series, change for one plot.

    The metric is thinned to at most ``max_points`` rows (the last one always kept): a plot is about
    260 px wide, and Gradio walks every value it sends to every session looking for files. The newest
    ``max_marks`` knob changes form the second series: a comb along the bottom of the metric's range
    with one tooth, spanning the whole range, at each change (its ``change`` column says what changed).
    Without changes that series is a single point, which draws nothing but keeps the series known to
    the plot (Gradio's plot fixes its series when it is first drawn); without data both are.
    """
    rows = [(int(h["step"]), float(h[spec.key])) for h in history
            if isinstance(h.get(spec.key), (int, float)) and math.isfinite(h[spec.key])]
    if len(rows) > max_points:
        stride = math.ceil(len(rows) / max_points)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    if not rows:
        return placeholder_frame(spec)
    records = [(s, v, spec.title, "") for s, v in rows]
    values = [v for _, v in rows]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    low, high = low - pad, high + pad
    marks = list(knob_changes)[-max_marks:]
    for change in marks:
        step, label = int(change["step"]), knob_label(change)
        records += [(step, low, KNOB_SERIES, label), (step, high, KNOB_SERIES, label), (step, low, KNOB_SERIES, label)]
    if not marks:
        records.append((rows[0][0], low, KNOB_SERIES, ""))
    return _frame(records)


def placeholder_frame(spec: PlotSpec) -> pd.DataFrame:
    """One invisible point per series: what a plot shows before a run (lines need two points)."""
    return _frame([(0, 0.0, spec.title, ""), (0, 0.0, KNOB_SERIES, "")])


def _frame(records: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    return frame.astype({"step": "int64", "value": "float64", "series": "string", "change": "string"})


def preview_grid(previews: torch.Tensor, min_side: int = 192, cols: int = 4, gap: int = 4) -> np.ndarray:
    """The (V, 3, H, W) renders in [0, 1] as one uint8 (H', W', 3) image, enlarged (nearest) to ``min_side``."""
    views = previews.detach().float().clamp(0, 1).cpu()
    n, _, h, w = views.shape
    factor = max(1, math.ceil(min_side / max(h, 1)))
    views = views.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    h, w = h * factor, w * factor
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap)
    for i, view in enumerate(views):
        r, c = divmod(i, cols)
        grid[:, r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = view
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
