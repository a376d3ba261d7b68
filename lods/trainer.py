"""Algorithm 1 as a loop that a UI can steer while it runs.

The trainer owns every live tensor. Other threads talk to it in two ways, both cheap:

* in: :class:`~lods.config.Knobs` (CFG weight, learning rates, pause/stop), changed only through
  :meth:`Trainer.set_knobs`, which validates and records every change, and read once per step;
* out: one event channel (:meth:`Trainer.subscribe`): a ``"step"`` event after every step (the progress
  bar, the live splat feed), a ``"snapshot"`` event with a CPU copy of the previews, the splats and the
  statistics every ``snapshot_every`` steps (the page, the viewer), a ``"state"`` event when the run
  starts, pauses, resumes or ends.

Two locks: ``lock`` guards the knobs and the published snapshot (held for microseconds); ``scene_lock``
guards the live scene, held by a training step and by renders for a viewer (``render_camera``).

Checkpoints (safetensors + JSON, never unpickled; :mod:`lods.checkpoint`) are written atomically every
``checkpoint_every`` steps and at the end, only from a state that passed the divergence guard, and the
one before is kept; resuming from one continues exactly (the same parameters as an uninterrupted run
with the same seed).
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods import checkpoint
from lods.cameras import Cameras, sample_cameras, turntable, view_suffix
from lods.config import LIVE_KNOBS, Knobs, RunConfig, check_resumable, config_knob, with_knobs
from lods.errors import UserError
from lods.export import atomic_path
from lods.guidance import make_estimator
from lods.priors.base import DiffusionPrior
from lods.profiling import PhaseTimer
from lods.scenes.base import RenderOutput, Scene


@dataclass
class Snapshot:
    """A CPU copy of what the UI and the viewer show; never shares storage with live tensors."""

    step: int
    steps: int
    previews: torch.Tensor | None  # (V, 3, H, W) renders from fixed cameras; None in a splats-only update
    history: list[dict[str, float]]
    knob_changes: list[dict[str, Any]]
    gaussians: dict[str, np.ndarray] | None = None  # means, covariances, rgbs, opacities for the viewer
    it_per_s: float = 0.0
    status: str = "running"
    message: str = ""


@dataclass
class TrainerEvent:
    """What the trainer tells its subscribers (in the training thread; keep handlers short)."""

    kind: str  # "step", "snapshot" or "state"
    trainer: Trainer
    step: int
    stats: dict[str, float] | None = None  # "step": the step's statistics
    snapshot: Snapshot | None = None  # "snapshot": the published copy
    status: str = ""  # "state": ready, running, paused, done, stopped, diverged or failed


def resolve_device(name: str | None) -> torch.device:
    """The device a run uses: the one asked for, else CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class Trainer:
    """Builds the prior, the scene and the estimator from a :class:`RunConfig` and runs Algorithm 1."""

    def __init__(
        self,
        config: RunConfig,
        prior: DiffusionPrior | None = None,
        out_dir: str | Path | None = None,
        init_image: torch.Tensor | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = resolve_device(config.device)
        self.lock = threading.Lock()  # guards knobs and the published snapshot (held for microseconds)
        self.scene_lock = threading.Lock()  # guards the live scene: held by a training step and by renders
        self._subscribers: list[Callable[[TrainerEvent], None]] = []
        self.knobs = Knobs.of(config)
        self.knob_changes: list[dict[str, Any]] = []
        self.history: list[dict[str, float]] = []
        self.snapshot: Snapshot | None = None
        self.step = 0
        self.status = "ready"
        self.message = ""
        self._resume_event = threading.Event()
        self._resume_event.set()

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.camera_gen = torch.Generator().manual_seed(config.seed)
        self.prior = prior or load_prior(config.prior, self.device)
        # What the config leaves to the prior (None), resolved once; config.yaml records the result.
        defaults = self.prior.defaults
        threads = config.threads or defaults.cpu_threads
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.resolution = config.resolution or self.prior.image_size
        self.view_prompts = config.view_prompts if config.view_prompts is not None else defaults.view_prompts
        gaussians = config.gaussians
        if gaussians.max_points is None:
            gaussians = dataclasses.replace(gaussians, max_points=defaults.max_gaussians)
        learned_lr = config.learned_lr if config.learned_lr is not None else defaults.learned_rate(config.method)
        guidance = config.guidance if learned_lr is None else dataclasses.replace(config.guidance, lr=learned_lr)
        if guidance.anneal_steps is None:  # CFG-anneal anneals within the run, whatever its length
            guidance = dataclasses.replace(guidance, anneal_steps=config.steps)
        self._resolved = dict(device=str(self.device), resolution=self.resolution, view_prompts=self.view_prompts,
                              gaussians=gaussians, guidance=guidance)

        init = None
        if init_image is not None:
            with torch.no_grad():
                image = init_image.to(self.device, torch.float32)
                init = self.prior.encode_images(image).float() if config.image.space == "latent" else image
        self.scene = build_scene(dataclasses.replace(config, gaussians=gaussians), self.prior, self.device,
                                 torch.Generator().manual_seed(config.seed), init)
        self.optimizer = torch.optim.Adam(self.scene.param_groups(config.lr), eps=1e-15)
        self.base_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        try:
            self.estimator = make_estimator(config.method, self.prior, guidance)
        except ValueError as err:
            raise UserError(str(err)) from err
        with torch.no_grad():
            self.null_emb = self.prior.encode_text([config.negative_prompt])
            if config.source_prompt is not None:
                source_emb = self.prior.encode_text([config.source_prompt])
                if self.estimator.edit_only:
                    if init_image is None:
                        raise UserError(f"{config.method} needs the source image")
                    self.estimator.set_source(self.prior.encode_images(init_image.to(self.device).float()), source_emb)
                elif self.estimator.learns_null_condition:
                    # Section 3.5: when editing, the learned null condition starts at the source caption.
                    self.null_emb = source_emb
        self.preview_cameras = turntable(config.preview_views, self.resolution)
        self.timer = PhaseTimer(enabled=False, device=self.device)  # enabled by `bench speed`
        self.estimator.seed(config.seed + 1)
        lane = config.second_thread if config.second_thread is not None else self.device.type == "cpu"
        # The learned update's own thread, where the estimator allows it to run beside the next step
        self._lane = (ThreadPoolExecutor(1, thread_name_prefix="lods-update")
                      if lane and self.estimator.update_in_background else None)
        self._update: Future | None = None  # the learned update in flight in the lane
        self.update_early = True  # start it before the guidance where the estimator allows (``benchmarks.speed_ab``)
        self._update_stats: dict[str, float] | None = None  # the stats of the step that submitted it
        self._update_lock = threading.Lock()
        self.checkpoint_step: int | None = None  # step of the last checkpoint written or loaded
        self.trains_on: str | None = None  # where the steps run when not here (lods.zerogpu's GPU slices)
        self._t_last = time.perf_counter()
        self._rate_step = 0
        self._rate = 0.0

    # ------------------------------------------------------------------ events out (any thread subscribes)

    def subscribe(self, handler: Callable[[TrainerEvent], None]) -> None:
        """``handler(event)`` runs in the training thread for every step, snapshot and state change."""
        with self.lock:
            self._subscribers.append(handler)

    def emit(self, kind: str, **fields: Any) -> None:
        """Send an event to every subscriber (the trainer's own; a driver that trains it elsewhere, in GPU
        slices, announces the steps it brought back)."""
        with self.lock:
            handlers = list(self._subscribers)
        if handlers:
            event = TrainerEvent(kind=kind, trainer=self, step=self.step, **fields)
            for handler in handlers:
                handler(event)

    # ------------------------------------------------------------------ knobs in (any thread)

    def set_knobs(self, **changes: Any) -> Knobs:
        """Change live knobs (``LIVE_KNOBS``, ``paused``, ``stop``): validated by ``Knobs.replace``, applied at the
        start of the next step, and the changes of ``LIVE_KNOBS`` recorded for the plots and summary.json."""
        with self.lock:
            old = self.knobs
            new = old.replace(self.config.method, **changes)
            for name in [k for k in changes if k in LIVE_KNOBS]:  # in the order given
                if getattr(new, name) != getattr(old, name):
                    self.knob_changes.append(
                        {"step": self.step, "knob": name, "old": getattr(old, name), "new": getattr(new, name)})
            self.knobs = new
        if new.paused != old.paused:
            (self._resume_event.clear if new.paused else self._resume_event.set)()
            self.emit("state", status="paused" if new.paused else self.status)
        if new.stop:
            self._resume_event.set()
        return new

    def pause(self) -> None:
        self.set_knobs(paused=True)

    def resume(self) -> None:
        self.set_knobs(paused=False)

    def stop(self) -> None:
        self.set_knobs(stop=True)

    def latest(self) -> Snapshot | None:
        with self.lock:
            return self.snapshot

    # ------------------------------------------------------------------ the loop (training thread)

    def text_embeddings(self, cameras: Cameras) -> torch.Tensor:
        """Per-view text embeddings, with DreamFusion's view suffixes when ``view_prompts``."""
        prompts = [self.config.prompt] * len(cameras)
        if self.view_prompts:
            prompts = [
                f"{self.config.prompt}, {view_suffix(float(a), float(e))}"
                for a, e in zip(cameras.azimuth, cameras.elevation)
            ]
        with torch.no_grad():
            return self.prior.encode_text(prompts)  # the prior caches its embeddings

    def _apply_knobs(self, knobs: Knobs) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lrs.get(g["name"], g["lr"]) * knobs.lr_scale
        if knobs.learned_lr is not None:
            if knobs.learned_lr != self.estimator.lr:
                self.join_update()  # the update in flight keeps the rate it started with
            self.estimator.set_lr(knobs.learned_lr)

    @property
    def _background_update(self) -> bool:
        """Whether the learned update runs in the lane (Algorithm 1, line 6 beside the next step)."""
        return self._lane is not None

    def _run_update(self, z: torch.Tensor, text_emb: torch.Tensor, cams: Cameras) -> dict[str, float]:
        with self.timer.phase("learned_update"):
            return self.estimator.update(z, text_emb, self.null_emb, cams) or {}

    def _submit_update(self, z: torch.Tensor, text_emb: torch.Tensor, cams: Cameras, stats: dict[str, float]) -> None:
        """Start line 6 in the lane; its numbers join ``stats`` (this step's) when it ends (``join_update``)."""
        with self._update_lock:
            self._update = self._lane.submit(self._run_update, z, text_emb, cams)
            self._update_stats = stats

    @staticmethod
    def _update_fields(update: dict[str, float]) -> dict[str, float]:
        return {f"update_{k}" if not k.startswith("update") else k: v for k, v in update.items()}

    def join_update(self) -> None:
        """Wait for the learned update running in the lane, if any, and add its numbers to the stats of the step
        that started it. Every reader of the learned parameters calls this first (the next step's guidance, a
        checkpoint, a change of their rate, the end of the run)."""
        with self._update_lock:
            future, stats = self._update, self._update_stats
            self._update = self._update_stats = None
            if future is not None:
                stats.update(self._update_fields(future.result()))
                stats.update(self.estimator.statistics())

    def background(self, n: int) -> torch.Tensor | None:
        """Backgrounds of ``n`` views as ``config.background`` says (None: the scene's own)."""
        if self.config.background == "white":
            return torch.ones(n, 3, device=self.device)
        if self.config.background == "random":
            return torch.rand(n, 3, device=self.device)
        return None

    def train_step(self) -> dict[str, float]:
        """One iteration of Algorithm 1: theta step (line 5), then the learned parameters' step (line 6)."""
        with self.lock:
            knobs = self.knobs
        self._apply_knobs(knobs)
        cams = sample_cameras(self.config.batch, self.resolution, ranges=self.config.camera, generator=self.camera_gen)
        text_emb = self.text_embeddings(cams)
        z, out = self.scene.latents(self.prior, cams.to(self.device), self.background(len(cams)), self.timer)
        self.join_update()  # the guidance reads alpha as the previous step's update left it
        stats: dict[str, float] = {}
        # Line 6 learns on this step's latents, as rendered before the theta step: a copy, since z may be the scene's
        # own parameter (2D latents), which the optimizer changes in place (no copy where nothing is learned).
        z_seen = z.detach().clone() if self.estimator.learns else z.detach()
        early = self._background_update and self.update_early and self.estimator.update_beside_guidance
        if early:
            # Line 6 in the lane from here, beside line 5's UNet forwards (which read alpha as it is now), the
            # backward and the next step's render
            self.estimator.hold_learned(self.null_emb)
            self._submit_update(z_seen, text_emb, cams, stats)
        with self.timer.phase("guidance"):
            g = self.estimator.step(z, text_emb, self.null_emb, knobs.cfg, self.step, cams)
            loss, extra = self.total_loss(g, cams, out, knobs)
        if self._background_update and not early:
            # Line 6 in the lane, beside this step's backward and the next step's render
            self._submit_update(z_seen, text_emb, cams, stats)
        self.optimizer.zero_grad(set_to_none=True)
        with self.timer.phase("backward"):
            loss.backward()
        scene_grad = math.sqrt(
            sum(
                float(p.grad.square().sum())
                for grp in self.optimizer.param_groups
                for p in grp["params"]
                if p.grad is not None
            )
        )
        with self.timer.phase("optimizer"):
            self.optimizer.step()
        update: dict[str, float] = {}
        if not self._background_update:
            update = self._run_update(z_seen, text_emb, cams)
        with self.timer.phase("densify"):
            dens = self.scene.post_step(self.step, out, self.optimizer)
        if any(g["name"] not in self.base_lrs for g in self.optimizer.param_groups):
            self.base_lrs.update({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        stats.update({"step": self.step, "loss": float(g.loss.detach()), "scene_grad_norm": scene_grad, **g.stats,
                      **extra})
        stats.update(self._update_fields(update))
        stats.update({f"scene_{k}": float(v) for k, v in dens.items()})
        if not self._background_update:
            stats.update(self.estimator.statistics())
        stats.setdefault("cfg", knobs.cfg)  # the estimator's effective weight (annealed, 1 for sds-ref, ...)
        stats["cfg_knob"] = knobs.cfg
        stats["lr_scale"] = knobs.lr_scale
        stats["learned_lr"] = self.estimator.lr
        self.step += 1
        return stats

    def total_loss(self, g: Any, cams: Cameras, out: RenderOutput, knobs: Knobs) -> tuple[torch.Tensor, dict]:
        """The loss to backpropagate from the estimator's result ``g`` and the step's renders ``out``, with extra
        statistics; the text prior's loss alone here (image-to-3D adds its reference-view and view-prior terms)."""
        return g.loss, {}

    def _guard(self, stats: dict[str, float]) -> str | None:
        bad = [k for k, v in stats.items()
               if isinstance(v, float) and not math.isfinite(v) and k not in ("cfg", "cfg_knob")]
        if bad:
            return f"diverged at step {self.step}: {', '.join(bad)} became NaN or infinite"
        for p in self.scene.parameters():
            if not torch.isfinite(p).all():
                return f"diverged at step {self.step}: the scene's parameters became NaN or infinite"
        for p in getattr(self.estimator, "params", []):
            if not torch.isfinite(p).all():
                return f"diverged at step {self.step}: the learned {self.estimator.learns} became NaN or infinite"
        blown = self.scene.health()
        if blown:
            return f"diverged at step {self.step}: {blown}"
        norms = [h["scene_grad_norm"] for h in self.history[-50:]]
        if len(norms) >= 20:
            med = float(np.median(norms))
            if med > 0 and stats["scene_grad_norm"] > self.config.max_grad_norm_jump * med:
                return f"diverged at step {self.step}: the gradient norm jumped to {stats['scene_grad_norm']:.3g}"
        return None

    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> str:
        """Train until ``config.steps`` or a stop; returns the final status ("done", "stopped" or "diverged").

        ``progress(step, steps, stats)`` is a shorthand subscriber to the step events."""
        if progress is not None:
            self.subscribe(lambda e: progress(e.step, self.config.steps, e.stats) if e.kind == "step" else None)
        self.begin()
        while self.status == "running":
            self._resume_event.wait()
            self.advance()
        return self.finish()

    def begin(self) -> None:
        """Enter the running state (``run`` does this; a caller stepping with ``advance`` does it once)."""
        self.status = "running"
        self._t_last, self._rate_step = time.perf_counter(), self.step
        self.emit("state", status=self.status)

    def advance(self) -> bool:
        """At most one training step with its bookkeeping (guard, history, events, snapshot, checkpoint).

        Returns True when a step was taken; False when paused or when the run reached a final status
        (``status`` becomes "done", "stopped", "diverged" or "failed"). Lets a caller interleave runs.
        """
        if self.status != "running":
            return False
        if self.step >= self.config.steps:
            self.status = "done"
            return False
        with self.lock:
            if self.knobs.stop:
                self.status = "stopped"
                return False
            if self.knobs.paused:
                return False
        try:
            with self.scene_lock:
                stats = self.train_step()
            every = self.config.checkpoint_every
            if (self.out_dir and every and self.step % every == 0) or self.step >= self.config.steps:
                self.join_update()  # what is guarded and saved includes this step's learned update
        except torch.cuda.OutOfMemoryError as err:
            self.status = "failed"
            self.message = (
                f"CUDA ran out of memory at step {self.step} ({str(err).splitlines()[0][:120]}); "
                "lower the render resolution or the views per step (batch), or use fp16"
            )
            return False
        problem = self._guard(stats)
        if problem:
            self.status = "diverged"
            if self.checkpoint_step is None:
                where = ("no checkpoint was written, so there is nothing to resume; "
                         "lower the learning rates or the CFG weight")
            else:
                where = f"the last good checkpoint is at step {self.checkpoint_step}"
                if self.out_dir:
                    where += f" (--resume {self.out_dir}, with other settings)"
            self.message = f"{problem}; {where}"
            return False
        now = time.perf_counter()
        if now - self._t_last > 0.5:
            self._rate = (self.step - self._rate_step) / (now - self._t_last)
            self._t_last, self._rate_step = now, self.step
        stats["it_per_s"] = self._rate
        if self.step % self.config.log_every == 0 or self.step == self.config.steps:
            self.history.append(stats)
        self.emit("step", stats=stats)
        if self.step % self.config.snapshot_every == 0 or self.step == self.config.steps:
            self.publish()
        if self.out_dir and self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint(self.out_dir)
        if self.step >= self.config.steps:
            self.status = "done"
        return True

    def finish(self) -> str:
        """Final checkpoint (not after a divergence: the last good one stays) and snapshot; returns the status."""
        self.join_update()
        if self.status == "running":
            self.status = "stopped"
        if self.status != "diverged" and self.out_dir:
            self.save_checkpoint(self.out_dir)
        self.publish()
        self.emit("state", status=self.status)
        return self.status

    def close(self) -> None:
        """Detach what the estimator attached to the prior (LoRA adapters), so that the prior can be reused."""
        if self._lane is not None:
            try:
                self.join_update()
            finally:
                self._lane.shutdown()
        self.estimator.close()

    # ------------------------------------------------------------------ snapshots

    @torch.no_grad()
    def export_extra(self, out: Path) -> tuple[dict[str, Any], list[str]]:
        """Result files beyond the scene's, written into ``out`` at export: (summary entries, file names)."""
        return {}, []

    def render_views(self, cameras: Cameras) -> RenderOutput:
        """Display renders of the scene from ``cameras`` (the image itself for 2D runs); the run's RNG untouched."""
        return self.scene.previews(self.prior, cameras, self.background(len(cameras)))

    @torch.no_grad()
    def render_camera(self, c2w: np.ndarray, fovy: float, width: int, height: int) -> np.ndarray:
        """One view (H, W, 3) uint8 for a viewer: OpenCV camera-to-world ``c2w``, vertical fov in radians."""
        cams = Cameras(torch.as_tensor(c2w, dtype=torch.float32)[None], torch.tensor([float(fovy)]),
                       torch.zeros(1), torch.zeros(1), torch.zeros(1), int(width), int(height))
        with self.scene_lock:
            rgb = self.render_views(cams).rgb.float().cpu()
        return (rgb[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    @torch.no_grad()
    def publish(self) -> Snapshot:
        with self.timer.phase("snapshot"):
            with self.scene_lock:
                out = self.render_views(self.preview_cameras)
                gauss = self.scene.viewer_gaussians()
            rgb = out.rgb.float().cpu()
            if self.history:
                shown = self.scene.preview_metrics(out)
                self.history[-1].update({k: shown[k] for k in ("saturation", "clipped", "floater_score") if k in shown})
            with self.lock:
                self.snapshot = snap = Snapshot(
                    step=self.step, steps=self.config.steps, previews=rgb, history=list(self.history),
                    knob_changes=list(self.knob_changes), gaussians=gauss, it_per_s=self._rate,
                    status=self.status, message=self.message,
                )
        self.emit("snapshot", snapshot=snap)
        return snap

    # ------------------------------------------------------------------ checkpoints and what ran

    def resolved_config(self) -> RunConfig:
        """The config as it runs now: every default resolved (by the prior), the live knobs' current values."""
        with self.lock:
            knobs = self.knobs
        resolved = {**self._resolved, "device": self.trains_on or self._resolved["device"]}
        if knobs.learned_lr is None:
            knobs = dataclasses.replace(knobs, learned_lr=self.estimator.lr)
        return dataclasses.replace(
            with_knobs(self.config, knobs),
            threads=torch.get_num_threads(),  # torch's CPU threads (set here on CPU)
            **resolved,
        )

    def state(self) -> dict[str, Any]:
        """Everything the next step depends on (loaded by :meth:`load_checkpoint`)."""
        self.join_update()
        with self.lock:
            knobs = {k: getattr(self.knobs, k) for k in LIVE_KNOBS}
            knob_changes = list(self.knob_changes)
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "scene": {k: v.detach().cpu() for k, v in self.scene.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "knobs": knobs,
            "knob_changes": knob_changes,
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "camera": self.camera_gen.get_state(),
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self, out_dir: str | Path) -> Path:
        """``checkpoint.safetensors`` (the previous one kept as ``checkpoint-prev``) and ``config.yaml``."""
        out_dir = Path(out_dir)
        path = checkpoint.save(out_dir / checkpoint.LATEST, self.state())
        write_config(out_dir / "config.yaml", self.resolved_config())
        self.checkpoint_step = self.step
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint (a file, or a run folder's latest). What this trainer's config sets
        differently from the checkpoint's config applies from here on: the live knobs (CFG weight,
        learning-rate scale, learned rate) as recorded knob changes, the scene learning rates and the
        step count directly; a change of anything that shaped the saved state is refused."""
        self.load_state(checkpoint.load(path), where=str(path))

    def load_state(self, ck: dict[str, Any], where: str = "the checkpoint") -> None:
        """:meth:`load_checkpoint` from a :meth:`state` dictionary already in memory (a GPU slice's result)."""
        saved = RunConfig.from_dict(ck["config"])
        check_resumable(saved, self.config)
        self.join_update()
        try:
            load_scene_state(self.scene, ck["scene"], self.device)
            self.optimizer = torch.optim.Adam(self.scene.param_groups(self.config.lr), eps=1e-15)
            self.base_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
            self.optimizer.load_state_dict(ck["optimizer"])
            self.estimator.load_state_dict(ck["estimator"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(f"{where} does not fit this run ({str(err).splitlines()[0][:120]})") from err
        with self.lock:
            self.knobs = dataclasses.replace(self.knobs, **ck["knobs"])
            self.knob_changes = list(ck["knob_changes"])
        self.history = list(ck["history"])
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        self.camera_gen.set_state(rng["camera"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = self.checkpoint_step = ck["step"]
        self._apply_knobs(self.knobs)
        # This run's own settings of the live knobs win over the checkpoint's, as knob changes at this step.
        changes = {name: config_knob(self.config, name) for name in LIVE_KNOBS
                   if config_knob(self.config, name) is not None
                   and config_knob(self.config, name) != config_knob(saved, name)}
        if changes:
            self.set_knobs(**changes)


def write_config(path: str | Path, config: RunConfig) -> None:
    import yaml

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def load_scene_state(scene: Scene, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Load a scene's parameters, resizing those whose count changed (densified Gaussians)."""
    own = dict(scene.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name in own and own[name].shape != value.shape:
                own[name].data = torch.empty_like(value, device=device)
    scene.load_state_dict({k: v.to(device) for k, v in state.items()})


def load_prior(name: str, device: torch.device) -> DiffusionPrior:
    from lods.priors.diffusers_prior import DiffusersPrior

    return DiffusersPrior.from_pretrained(name, device=device)


class PriorCache:
    """The last prior loaded, reused while runs ask for the same (name, device); a different one replaces it
    (one model in memory at a time). ``factory(name, device)`` loads one (``load_prior``). Thread-safe."""

    def __init__(self, factory: Callable[[str, torch.device], DiffusionPrior] = load_prior) -> None:
        self.factory = factory
        self._lock = threading.Lock()
        self._held: tuple[tuple[str, str], DiffusionPrior] | None = None

    def __call__(self, name: str, device: torch.device | str | None = None) -> DiffusionPrior:
        device = resolve_device(str(device) if device is not None else None)
        key = (name, str(device))
        with self._lock:
            if self._held is None or self._held[0] != key:
                self._held = None  # drop the old model before loading the next one
                self._held = (key, self.factory(name, device))
            return self._held[1]

    def clear(self) -> None:
        with self._lock:
            self._held = None


shared_prior = PriorCache()  # the library's runs (batch, sweep, quality, the Python API, GPU slices) share it


def build_scene(
    config: RunConfig,
    prior: DiffusionPrior,
    device: torch.device,
    generator: torch.Generator,
    init: torch.Tensor | None = None,
) -> Scene:
    """The scene of ``config.backbone`` on ``device`` (its backend chosen by the device)."""
    from lods.scenes import SCENES

    try:
        return SCENES[config.backbone].build(config, prior, device, generator, init)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad {config.backbone} settings: {err}") from err
