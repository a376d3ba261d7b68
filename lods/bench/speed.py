"""``python -m lods bench speed``: iterations per second, time per phase and peak memory, per backbone and
estimator.

Phases of one step (milliseconds per step): ``render`` (the scene's differentiable render, or the 2D
latents), ``encode`` (the VAE encoder), ``unet_forward`` (every UNet forward, wherever it runs),
``guidance_other`` (the estimator's own arithmetic around its forwards), ``backward`` (into the scene,
through the encoder and the renderer), ``optimizer`` (the scene's Adam step), ``unet_backward`` (the
learned update without its forwards: the backward through the UNet into the null embedding or LoRA,
and their small optimizer step), ``densify`` (Gaussian densification and pruning), ``snapshot``
(preview renders for the UI, every ``snapshot_every`` steps) and ``other``. ``unet_share`` is
(forward + backward) / step. With the trainer's second CPU thread the phases overlap and their sum exceeds
the step: the learned update (LODS-embed) runs beside the backward, the bookkeeping and the next render.
On CPU the peak memory is
the process's resident set size during the measurement; on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lods.errors import UserError
from lods.guidance import METHODS

BACKBONE_BATCH = {"gs": 2, "nerf": 1, "image": 1}
PHASES = ("render", "encode", "unet_forward", "guidance_other", "backward", "optimizer", "unet_backward",
          "densify", "snapshot", "other")


class PeakMemory:
    """Peak resident memory (MB) of this process while the ``with`` block runs (CPU), or peak CUDA memory."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
                    self._stop.wait(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def measure_config(
    prior, backbone: str, method: str, steps: int = 20, warmup: int = 3, seed: int = 0, prior_name: str = "toy",
    second_thread: bool | None = None,
) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one configuration and time the last ``steps`` by phase."""
    from lods.config import RunConfig
    from lods.trainer import Trainer

    config = RunConfig(
        prompt="a red cube", prior=prior_name, backbone=backbone,
        method=method, cfg=7.5 if method == "vsd" else 100.0, steps=warmup + steps, seed=seed,
        device=str(prior.device), batch=BACKBONE_BATCH[backbone], snapshot_every=10, checkpoint_every=0,
        source_prompt="a blue cube" if METHODS[method].edit_only else None, second_thread=second_thread,
    )
    init = torch.rand(1, 3, prior.image_size, prior.image_size) if METHODS[method].edit_only else None
    trainer = Trainer(config, prior=prior, init_image=init)
    timer = trainer.timer
    timer.watch_unet(prior.unet_call)
    mark: dict[str, float] = {}

    def progress(step: int, total: int, stats: dict) -> None:
        if step == warmup:
            if prior.device.type == "cuda":
                torch.cuda.synchronize()
            timer.reset()
            timer.enabled = True
            mark["t0"] = time.perf_counter()

    try:
        with PeakMemory(prior.device) as mem:
            status = trainer.run(progress)
        if prior.device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - mark["t0"]
    finally:
        timer.enabled = False
        timer.close()
        trainer.close()
    if status != "done":
        raise UserError(f"{backbone}/{method} did not finish: {trainer.message or status}")
    sec = dict(timer.seconds)
    ms = {k: 1000 * v / steps for k, v in sec.items()}
    step_ms = 1000 * total / steps
    # The final publish after the loop is outside the measured window; snapshots inside it are kept.
    phases = {
        "render": ms.get("render", 0.0),
        "encode": ms.get("encode", 0.0),
        "unet_forward": ms.get("unet_forward", 0.0),
        "guidance_other": ms.get("guidance", 0.0) - ms.get("unet_forward_in_guidance", 0.0),
        "backward": ms.get("backward", 0.0),
        "optimizer": ms.get("optimizer", 0.0),
        "unet_backward": ms.get("learned_update", 0.0) - ms.get("unet_forward_in_learned_update", 0.0),
        "densify": ms.get("densify", 0.0),
        "snapshot": ms.get("snapshot", 0.0),
    }
    top = ("render", "encode", "guidance", "backward", "optimizer", "learned_update", "densify", "snapshot")
    phases["other"] = max(0.0, step_ms - sum(ms.get(k, 0.0) for k in top))
    return {
        "backbone": backbone,
        "method": method,
        "batch": config.batch,
        "steps": steps,
        "it_per_s": steps / total,
        "ms_per_step": step_ms,
        "phases_ms": phases,
        "unet_share": (phases["unet_forward"] + phases["unet_backward"]) / step_ms,
        "unet_forward_calls_per_step": timer.calls.get("unet_forward", 0) / steps,
        "peak_memory_mb": mem.peak_mb,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["backbone", "method", "it/s", "ms/step", *PHASES, "UNet share", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["backbone"], r["method"], f"{r['it_per_s']:.2f}", f"{r['ms_per_step']:.1f}",
                 *(f"{r['phases_ms'][p]:.1f}" for p in PHASES), f"{100 * r['unet_share']:.0f}%",
                 f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_speed(prior_name: str, backbones: list[str], methods: list[str] | None = None, steps: int = 20,
              device: str | None = None, out: str | Path | None = None,
              second_thread: bool | None = None) -> list[dict[str, Any]]:
    """``measure_config`` for every backbone x estimator (``methods`` None: all); prints the table and writes
    ``speed.json`` and ``speed.md`` into ``out`` when given."""
    from lods.trainer import load_prior, resolve_device

    bad = [b for b in backbones if b not in BACKBONE_BATCH]
    if bad or not backbones:
        raise UserError(f"unknown backbone(s) {', '.join(bad)}; choose from: gs, nerf, image")
    methods = methods or list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from: {', '.join(METHODS)}")
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    prior = load_prior(prior_name, dev)
    configs = [(b, m) for b in backbones for m in methods if not METHODS[m].edit_only or b == "image"]
    rows = []
    for backbone, method in tqdm(configs, desc="bench speed", unit="config"):
        rows.append(measure_config(prior, backbone, method, steps=steps, prior_name=prior_name,
                                   second_thread=second_thread))
        tqdm.write(f"{backbone:6s} {method:11s} {rows[-1]['it_per_s']:6.2f} it/s")
    report = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "second_thread": dev.type == "cpu" if second_thread is None else second_thread,
        "prior": prior_name,
        "rows": rows,
    }
    table = format_table(rows)
    print(table)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(report, indent=2))
        lane = "with" if report["second_thread"] else "without"
        (out / "speed.md").write_text(f"device {report['device_name']}, {report['torch_threads']} torch threads "
                                      f"{lane} the second thread, prior {prior_name}\n\n{table}\n")
    return rows
