"""The render history: a strip of one preview view every N steps, with the live knob changes marked between
the frames, so that the renders before and after a change of the CFG weight sit side by side.

:class:`RenderHistory` subscribes to each run's trainer (through ``JobManager.add_trainer_listener``) and
keeps, for every ``"snapshot"`` event, the first preview view as a small PNG with its step and CFG weight
(about 5 KB at 64 px). :func:`history_html` picks at most ``max_frames`` of them (evenly spaced, plus the
frames just before and just after each of the newest knob changes) and writes the strip.
"""

from __future__ import annotations

import html
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from app.plots import knob_label, png_data_uri, preview_grid


@dataclass(frozen=True)
class Frame:
    step: int
    cfg: float | None
    uri: str  # the view as a PNG data address


class RenderHistory:
    """Frames of every run's snapshots, by trainer (forgotten with the trainer)."""

    def __init__(self, max_frames: int = 4000) -> None:
        self._frames: weakref.WeakKeyDictionary[Any, list[Frame]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.max_frames = max_frames

    def follow(self, trainer: Any) -> None:
        """A ``JobManager`` trainer listener: record the snapshots of ``trainer``."""
        with self._lock:
            self._frames[trainer] = []
        trainer.subscribe(lambda event: self.add(trainer, event.snapshot) if event.kind == "snapshot" else None)

    def add(self, trainer: Any, snapshot: Any) -> None:
        if snapshot is None or snapshot.previews is None or not len(snapshot.previews):
            return
        cfg = snapshot.history[-1].get("cfg") if snapshot.history else None
        if cfg is None:
            cfg = float(trainer.knobs.cfg)
        frame = Frame(int(snapshot.step), cfg, png_data_uri(preview_grid(snapshot.previews[:1], min_side=1)))
        with self._lock:
            frames = self._frames.setdefault(trainer, [])
            if frames and frames[-1].step == frame.step:
                frames[-1] = frame
            else:
                frames.append(frame)
            if len(frames) > self.max_frames:  # keep every other one of the older half
                half = len(frames) // 2
                frames[:half] = frames[:half:2]

    def frames(self, trainer: Any) -> list[Frame]:
        with self._lock:
            return list(self._frames.get(trainer, ()))


def pick_frames(frames: list[Frame], knob_changes: list[dict[str, Any]], max_frames: int = 10,
                max_changes: int = 3) -> list[Frame]:
    """At most ``max_frames`` frames in step order: the first and the latest, for each of the newest
    ``max_changes`` knob changes the last frame before it and the first after it, and then, one at a time,
    the frame farthest (in steps) from those already chosen, so that the rest fall about every N steps."""
    if len(frames) <= max_frames:
        return list(frames)
    chosen = {0, len(frames) - 1}
    for change in knob_changes[-max_changes:]:
        before = max((i for i, f in enumerate(frames) if f.step <= change["step"]), default=None)
        if before is not None:
            chosen.update(i for i in (before, before + 1) if i < len(frames))
    while len(chosen) < max_frames:
        steps = [frames[i].step for i in chosen]
        best = max((i for i in range(len(frames)) if i not in chosen),
                   key=lambda i: min(abs(frames[i].step - s) for s in steps))
        chosen.add(best)
    return [frames[i] for i in sorted(chosen)][-max_frames:]


def _w(cfg: float | None) -> str:
    if cfg is None:
        return ""
    return " · w ∞" if math.isinf(cfg) else f" · w {cfg:g}"


def history_html(frames: list[Frame], knob_changes: list[dict[str, Any]], max_frames: int = 10) -> str:
    """The strip: frames captioned with their step and CFG weight, each knob change a labelled mark
    between the last frame before it and the first after it."""
    if not frames:
        return '<div class="lods-history-empty">The render history fills in as the run goes.</div>'
    shown = pick_frames(frames, list(knob_changes), max_frames)
    parts = []
    for i, frame in enumerate(shown):
        if i:
            between = [c for c in knob_changes if shown[i - 1].step <= c["step"] < frame.step]
            if between:
                labels = "<br>".join(html.escape(knob_label(c)) + f" @ {int(c['step'])}" for c in between)
                parts.append(f'<div class="lods-mark" title="knob change">{labels}</div>')
        caption = f"step {frame.step}{_w(frame.cfg)}"
        parts.append(f'<figure class="lods-frame"><img src="{frame.uri}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if len(shown) > 1:
        every = (shown[-1].step - shown[0].step) / max(1, len(shown) - 1)
        head = f"Render history (view 1, about every {max(1, round(every))} steps; knob changes in orange)"
    else:
        head = "Render history (view 1)"
    return f'<div class="lods-history-head">{head}</div><div class="lods-history">{"".join(parts)}</div>'
