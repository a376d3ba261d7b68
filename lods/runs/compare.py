"""Side-by-side runs for teaching: 2 to 4 configurations of one prompt and seed, stepped in turn
(round-robin) on one device and one prior, so that every run sees the same hardware share.

Presets: ``PRESETS["cfg-vs-lods"]`` (SDS at CFG 100, LODS-embed at CFG 100, LODS-embed at an infinite
weight: saturation against floaters) and ``PRESETS["cfg-sweep"]`` (the paper's Fig. 5: LODS-embed with
the CFG weight from 30 to infinity).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from lods.config import RunConfig, cfg_label
from lods.errors import UserError
from lods.guidance import METHODS
from lods.priors.base import DiffusionPrior
from lods.runs.image3d import build_trainer
from lods.trainer import Snapshot, Trainer

MIN_RUNS, MAX_RUNS = 2, 4


@dataclass(frozen=True)
class Slot:
    """One configuration of a comparison: a method at a CFG weight."""

    method: str
    cfg: float

    @property
    def label(self) -> str:
        return f"{self.method} · {cfg_label(self.cfg)}"


PRESETS: dict[str, list[Slot]] = {
    "cfg-vs-lods": [Slot("sds", 100.0), Slot("lods-embed", 100.0), Slot("lods-embed", math.inf)],
    "cfg-sweep": [Slot("lods-embed", 30.0), Slot("lods-embed", 100.0), Slot("lods-embed", 1000.0),
                  Slot("lods-embed", math.inf)],
}


def comparison_configs(base: RunConfig, slots: list[Slot]) -> list[RunConfig]:
    """``base`` (prompt, seed, backbone, steps, ...) once per slot; each one validated."""
    if not MIN_RUNS <= len(slots) <= MAX_RUNS:
        raise UserError(f"a comparison runs {MIN_RUNS} to {MAX_RUNS} configurations, not {len(slots)}")
    configs = []
    for slot in slots:
        config = replace(base, method=slot.method, cfg=slot.cfg, learned_lr=None)  # each method's default rate
        config.validate()
        configs.append(config)
    return configs


class Comparison:
    """Trainers of ``configs`` on one shared prior; :meth:`run` steps them in turn until all have ended.

    Every trainer publishes its own snapshots (``on_snapshot(index, snapshot)``). Pause, resume and
    stop act on all of them and may be called from any thread.
    """

    def __init__(self, configs: list[RunConfig], prior: DiffusionPrior,
                 on_snapshot: Callable[[int, Snapshot], None] | None = None) -> None:
        if not MIN_RUNS <= len(configs) <= MAX_RUNS:
            raise UserError(f"a comparison runs {MIN_RUNS} to {MAX_RUNS} configurations, not {len(configs)}")
        # A learned update in a lane of its own must not meet another run's adapter switches on the shared UNet.
        if any(METHODS[c.method].learns and not METHODS[c.method].update_in_background for c in configs):
            configs = [replace(c, second_thread=False) for c in configs]
        self.configs = configs
        self.trainers: list[Trainer] = []
        # Every run's published previews, (step, views (V, 3, H, W)), for replaying the runs side by side.
        self.frames: list[list[tuple[int, torch.Tensor]]] = [[] for _ in configs]
        try:
            for i, config in enumerate(configs):
                trainer = build_trainer(config, prior)  # image-to-3D where the config has an input image
                trainer.subscribe(lambda e, i=i: self._record(i, e.snapshot) if e.kind == "snapshot" else None)
                if on_snapshot is not None:
                    trainer.subscribe(lambda e, i=i: on_snapshot(i, e.snapshot) if e.kind == "snapshot" else None)
                self.trainers.append(trainer)
        except BaseException:
            self.close()
            raise
        self._resume = threading.Event()
        self._resume.set()
        self._stop = False

    def _record(self, index: int, snapshot: Snapshot) -> None:
        frames = self.frames[index]
        if not frames or frames[-1][0] != snapshot.step:
            frames.append((snapshot.step, snapshot.previews))

    def frames_at(self, step: int) -> list[tuple[int, torch.Tensor] | None]:
        """Per run, its last published previews at or before ``step`` (None where it had none yet)."""
        out: list[tuple[int, torch.Tensor] | None] = []
        for frames in self.frames:
            shown = [f for f in list(frames) if f[0] <= step]
            out.append(shown[-1] if shown else None)
        return out

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def pause(self) -> None:
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def stop(self) -> None:
        self._stop = True
        for t in self.trainers:
            t.stop()
        self._resume.set()

    def run(self) -> list[str]:
        """Round-robin: one step of each unfinished run in turn; returns the final statuses."""
        for t in self.trainers:
            t.begin()
        while not self._stop and any(t.status == "running" for t in self.trainers):
            self._resume.wait()
            for t in self.trainers:
                t.advance()
        return [t.finish() for t in self.trainers]

    def close(self) -> None:
        """Detach what the estimators attached to the shared prior (LoRA adapters)."""
        for t in self.trainers:
            t.close()

    def rows(self) -> list[dict[str, Any]]:
        """The latest logged metrics of every run, for a side-by-side table."""
        out = []
        for config, t in zip(self.configs, self.trainers):
            snap = t.latest()
            last = snap.history[-1] if snap is not None and snap.history else {}
            out.append({
                "label": Slot(config.method, config.cfg).label,
                "method": config.method,
                "cfg": config.cfg,
                "step": t.step,
                "status": t.status,
                "it_per_s": snap.it_per_s if snap is not None else 0.0,
                **{k: last.get(k) for k in ("saturation", "clipped", "floater_score", "embedding_distance")},
            })
        return out
