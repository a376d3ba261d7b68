"""Plain data for the page: DataFrames for the live plots, images of the preview renders, and the render history.

Each plot is one metric of ``Snapshot.history`` against the step. Every live knob change is a series of
its own, a vertical mark named by what changed (``w 100 → 7.5``) and listed in the plot's legend, so
that a teacher can point at the moment the CFG weight was turned and at what the curves did next.
Losses are drawn on a log scale (their log10: Gradio's line plot has no log axis), and a plot that does
not apply to the run's method or backbone is hidden (:meth:`PlotSpec.applies`).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lods.guidance import METHODS


def _learns(method: str, backbone: str) -> bool:
    return method in METHODS and METHODS[method].learns is not None


def _learns_embedding(method: str, backbone: str) -> bool:
    cls = METHODS.get(method)
    return cls is not None and cls.learns_null_condition and "embedding" in (cls.learns or "")


def _three_d(method: str, backbone: str) -> bool:
    return backbone != "image"


def _always(method: str, backbone: str) -> bool:
    return True


@dataclass(frozen=True)
class PlotSpec:
    key: str  # the history column
    title: str
    caption: str
    log: bool = False  # drawn as log10 of the value (losses spanning orders of magnitude)
    when: Callable[[str, str], bool] = field(default=_always, compare=False)  # (method, backbone) -> shown

    def applies(self, method: str, backbone: str) -> bool:
        """Whether a run of ``method`` on ``backbone`` logs this metric (the estimator's metadata says)."""
        return self.when(method, backbone)

    @property
    def y_title(self) -> str:
        return f"log₁₀ {self.key}" if self.log else self.key


PLOTS = (
    PlotSpec("loss", "Scene loss", "score-distillation loss on the renders (the theta step), log scale", log=True),
    PlotSpec("update_loss", "α / LoRA update loss",
             "denoising loss of the learned parameters: α (Eq. 8), the LoRA (Eq. 10) or VSD's LoRA; log scale; "
             "shown for methods that learn parameters", log=True, when=_learns),
    PlotSpec("embedding_distance", "Embedding distance",
             "‖α − α₀‖ / ‖α₀‖: how far the learned unconditional embedding moved from the null one (lods-embed)",
             when=_learns_embedding),
    PlotSpec("cfg", "Effective CFG weight", "the guidance weight w used at each step"),
    PlotSpec("saturation", "Saturation", "mean colour saturation of the object in the preview views"),
    PlotSpec("floater_score", "Floater score",
             "share of rendered opacity outside the largest connected object (3D backbones)", when=_three_d),
)

KNOB_LABELS = {"cfg": "w", "lr_scale": "scene lr ×", "learned_lr": "learned lr"}  # short, for plot marks
MARK_COLORS = ("#ea580c", "#9333ea", "#16a34a", "#dc2626", "#0891b2", "#ca8a04")
METRIC_COLOR = "#2563eb"
COLUMNS = ["step", "value", "series", "shown"]


def _fmt(v: Any) -> str:
    if v is None:
        return "default"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.6g}"
    return str(v)


def knob_label(change: dict[str, Any]) -> str:
    """``w 100 → 30`` for one entry of ``Snapshot.knob_changes``."""
    name = KNOB_LABELS.get(change["knob"], change["knob"])
    return f"{name} {_fmt(change['old'])} → {_fmt(change['new'])}"


def mark_names(knob_changes: Sequence[dict[str, Any]], max_marks: int = 3) -> list[str]:
    """The series names of the newest ``max_marks`` knob changes: ``w 100 → 7.5 @ 120`` (unique per change)."""
    return [f"{knob_label(c)} @ {int(c['step'])}" for c in list(knob_changes)[-max_marks:]]


def plot_colors(spec: PlotSpec, knob_changes: Sequence[dict[str, Any]] = (), max_marks: int = 3) -> dict[str, str]:
    """The colour of every series of a plot: the metric blue, each knob-change mark its own colour."""
    colors = {spec.title: METRIC_COLOR}
    for i, name in enumerate(mark_names(knob_changes, max_marks)):
        colors[name] = MARK_COLORS[i % len(MARK_COLORS)]
    return colors


def metric_frame(history: Sequence[dict[str, Any]], knob_changes: Sequence[dict[str, Any]], spec: PlotSpec,
                 max_points: int = 120, max_marks: int = 3) -> pd.DataFrame:
    """Columns step, value, series, shown for one plot.

    The metric is thinned to at most ``max_points`` rows (the last one always kept): a plot is a few
    hundred pixels wide, and Gradio walks every value it sends to every session looking for files. A
    log-scale metric keeps its positive values, as log10 (``shown`` is the value itself, for the
    tooltip). Each of the newest ``max_marks`` knob changes is a series of two points, at the bottom and
    the top of the metric's range at the change's step: a vertical mark named by what changed.
    """
    rows = []
    for h in history:
        v = h.get(spec.key)
        if isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not spec.log):
            rows.append((int(h["step"]), math.log10(v) if spec.log else float(v), f"{v:.4g}"))
    if len(rows) > max_points:
        stride = math.ceil(len(rows) / max_points)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    if not rows:
        return placeholder_frame(spec)
    records = [(s, v, spec.title, shown) for s, v, shown in rows]
    values = [v for _, v, _ in rows]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
    low, high = low - pad, high + pad
    for change, name in zip(list(knob_changes)[-max_marks:], mark_names(knob_changes, max_marks)):
        step = int(change["step"])
        records += [(step, low, name, name), (step, high, name, name)]
    return _frame(records)


def placeholder_frame(spec: PlotSpec) -> pd.DataFrame:
    """One invisible point: what a plot shows before a run (lines need two points)."""
    return _frame([(0, 0.0, spec.title, "")])


def _frame(records: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    return frame.astype({"step": "int64", "value": "float64", "series": "string", "shown": "string"})


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


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as a ``data:image/png;base64,...`` address (for HTML panels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_panel(images: Sequence[tuple[np.ndarray, str, int]], elem_class: str, view_px: int = 300) -> str:
    """HTML of captioned images (image, caption, number of views side by side), one per row, each drawn
    pixelated at ``view_px`` pixels per view (narrower only where the page is): the Compare panes. The
    images go out at their own resolution; the browser enlarges them without smoothing."""
    rows = [f'<figure class="{elem_class}"><figcaption>{html.escape(caption)}</figcaption>'
            f'<img src="{png_data_uri(image)}" alt="{html.escape(caption)}" style="width: {views * view_px}px">'
            f"</figure>" for image, caption, views in images]
    return "".join(rows)
