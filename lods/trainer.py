"""Algorithm 1 as a loop that a UI can steer while it runs.

The trainer owns every live tensor. Other threads talk to it through two small objects guarded by
one lock: :class:`Knobs` (CFG weight, learning rates, timestep range, pause/stop; read once per
step) and the latest :class:`Snapshot` (a CPU copy of the renders, the scene and the statistics,
published every ``snapshot_every`` steps). Checkpoints are written atomically every
``checkpoint_every`` steps and at the end; resuming from one continues exactly (same parameters
as an uninterrupted run with the same seed).
"""

from __future__ import annotations

import copy
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lods import metrics
from lods.cameras import CameraRange, Cameras, sample_cameras, turntable, view_suffix
from lods.errors import UserError
from lods.export import atomic_path
from lods.guidance import METHODS, Dds, LodsEmbed, make_estimator
from lods.priors.base import DiffusionPrior
from lods.profiling import PhaseTimer
from lods.scenes.base import RenderOutput, Scene
from lods.scenes.image import ImageConfig, ImageScene

BACKBONES = ("gs", "nerf", "image")
# On the small toy prior the paper's SD rates (1e-4 embedding, 5e-7 LoRA) barely move in a few hundred steps.
TOY_LEARNED_LR = {"lods-embed": 3e-3, "lods-lora": 1e-4}


@dataclass
class RunConfig:
    """Everything a run needs; the same keys in YAML, on the command line and in the app."""

    prompt: str = "a red cube"
    negative_prompt: str = ""
    source_prompt: str | None = None  # editing: the caption of the input image
    prior: str = "toy"
    backbone: str = "gs"
    method: str = "lods-embed"
    cfg: float = 100.0
    steps: int = 600
    seed: int = 0
    device: str | None = None
    threads: int | None = None  # CPU threads for torch; None: 1 with the toy prior (its ops are too small to split)
    batch: int = 4  # views per step
    resolution: int | None = None  # render size; None: the prior's native size
    lr: dict[str, float] = field(default_factory=dict)  # scene learning rates by group name (empty: defaults)
    lr_scale: float = 1.0  # multiplies every scene learning rate (a live knob)
    learned_lr: float | None = None  # alpha / LoRA learning rate (None: the method's default)
    view_prompts: bool | None = None  # append "front view" etc.; None: on for real priors, off for the toy prior
    background: str = "white"
    log_every: int = 1
    snapshot_every: int = 10
    checkpoint_every: int = 200
    preview_views: int = 4
    max_grad_norm_jump: float = 1e4  # divergence guard: stop when the scene's grad norm exceeds this x its median
    guidance: dict[str, Any] = field(default_factory=dict)  # GuidanceConfig fields
    gaussians: dict[str, Any] = field(default_factory=dict)  # GaussianConfig fields
    nerf: dict[str, Any] = field(default_factory=dict)  # NerfConfig fields
    image: dict[str, Any] = field(default_factory=dict)  # ImageConfig fields
    camera: dict[str, Any] = field(default_factory=dict)  # CameraRange fields

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> None:
        """A one-line ``UserError`` for anything a run cannot start with."""
        if not self.prompt or not self.prompt.strip():
            raise UserError("the prompt is empty")
        if len(self.prompt) > 1000:
            raise UserError("the prompt is longer than 1000 characters")
        if self.backbone not in BACKBONES:
            raise UserError(f"unknown backbone {self.backbone!r}; choose one of: {', '.join(BACKBONES)}")
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        check_cfg(self.cfg)
        if math.isinf(self.cfg) and METHODS[self.method].finite_cfg_only:
            raise UserError(f"{self.method} diverges at an infinite CFG weight; use a finite one, or sds-norm / "
                            "lods-embed / lods-lora for the infinite limit")
        if self.steps < 1 or self.steps > 10_000_000:
            raise UserError(f"steps must be between 1 and 10,000,000, not {self.steps}")
        if self.batch < 1:
            raise UserError("batch (views per step) must be at least 1")
        for name, value in self.lr.items():
            check_lr(value, f"learning rate of {name}")
        check_lr(self.lr_scale, "scene learning-rate scale")
        if self.learned_lr is not None:
            check_lr(self.learned_lr, "learned-parameter learning rate")
        if self.method == "dds" and self.source_prompt is None:
            raise UserError("dds is an editing method: use `python -m lods edit`")
        if self.source_prompt is not None and self.backbone != "image":
            raise UserError("editing works on images: use --backbone image")


def check_cfg(value: float) -> float:
    """CFG weight: a number >= 1 (inf allowed: the VSD-like limit)."""
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 1:
        raise UserError(f"the CFG weight must be a number >= 1 (inf allowed), not {value}")
    return float(value)


def check_lr(value: float, what: str = "learning rate") -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or value > 10:
        raise UserError(f"the {what} must be a finite number between 0 and 10, not {value}")
    return float(value)


@dataclass
class Knobs:
    """What may change while a run trains. Read once per step, under the trainer's lock."""

    cfg: float
    scene_lr_scale: float = 1.0  # multiplies every scene learning rate
    learned_lr: float | None = None
    t_min: float | None = None  # fractions of T; None keeps the schedule
    t_max: float | None = None
    paused: bool = False
    stop: bool = False


@dataclass
class Snapshot:
    """A CPU copy of what the UI and the viewer show; never shares storage with live tensors."""

    step: int
    steps: int
    previews: torch.Tensor  # (V, 3, H, W) renders from fixed cameras
    history: list[dict[str, float]]
    knob_changes: list[dict[str, Any]]
    gaussians: dict[str, np.ndarray] | None = None  # means, covariances, rgbs, opacities for the viewer
    it_per_s: float = 0.0
    status: str = "running"
    message: str = ""


class Trainer:
    """Builds the prior, the scene and the estimator from a :class:`RunConfig` and runs Algorithm 1."""

    def __init__(
        self,
        config: RunConfig,
        prior: DiffusionPrior | None = None,
        out_dir: str | Path | None = None,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        init_image: torch.Tensor | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
        if self.device.type == "cpu" and (config.threads or config.prior == "toy"):
            # Measured on 2 cores: the toy prior's UNet forward takes 23 ms on 1 thread and 36 ms on 2.
            torch.set_num_threads(config.threads or 1)
        self.on_snapshot = on_snapshot
        self.step_listeners: list[Callable[[Trainer], None]] = []  # called in the training thread after each step
        self.lock = threading.Lock()  # guards knobs and the published snapshot (held for microseconds)
        self.scene_lock = threading.Lock()  # guards the live scene: held by a training step and by renders
        self.knobs = Knobs(cfg=config.cfg, scene_lr_scale=config.lr_scale, learned_lr=config.learned_lr)
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
        self.resolution = config.resolution or self.prior.image_size
        self.camera_range = CameraRange(**config.camera)
        init = None
        if init_image is not None:
            with torch.no_grad():
                image = init_image.to(self.device, torch.float32)
                init = (
                    self.prior.encode_images(image).float() if ImageConfig(**config.image).space == "latent" else image
                )
        self.scene = build_scene(config, self.prior, self.device, torch.Generator().manual_seed(config.seed), init)
        self.optimizer = torch.optim.Adam(self.scene.param_groups(config.lr), eps=1e-15)
        self.base_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        guidance = dict(config.guidance)
        if config.learned_lr is not None:
            guidance["lr"] = config.learned_lr
        elif config.prior == "toy" and config.method in TOY_LEARNED_LR:
            guidance["lr"] = TOY_LEARNED_LR[config.method]
        if config.method == "cfg-anneal" and guidance.get("anneal_steps") is None:
            guidance["anneal_steps"] = config.steps  # anneal within the run, whatever its length
        try:
            self.estimator = make_estimator(config.method, self.prior, guidance)
        except ValueError as err:
            raise UserError(str(err)) from err
        self.view_prompts = config.view_prompts if config.view_prompts is not None else config.prior != "toy"
        with torch.no_grad():
            self.null_emb = self.prior.encode_text([config.negative_prompt])
            self._text_cache: dict[str, torch.Tensor] = {}
            if config.source_prompt is not None:
                source_emb = self.prior.encode_text([config.source_prompt])
                if isinstance(self.estimator, Dds):
                    if init_image is None:
                        raise UserError("dds needs the source image")
                    self.estimator.set_source(self.prior.encode_images(init_image.to(self.device).float()), source_emb)
                elif config.method in ("lods-embed", "lods-lora"):
                    # Section 3.5: when editing, the learned null condition starts at the source caption.
                    self.null_emb = source_emb
        self.preview_cameras = turntable(config.preview_views, self.resolution)
        self.timer = PhaseTimer(enabled=False, device=self.device)  # enabled by `bench speed`
        self.checkpoint_step = 0
        self._t_last = time.perf_counter()
        self._rate_step = 0
        self._rate = 0.0

    # ------------------------------------------------------------------ knobs (any thread)

    def set_knobs(self, **changes: Any) -> None:
        """Change live knobs; applied at the start of the next step and recorded for the plots."""
        if "cfg" in changes:
            changes["cfg"] = check_cfg(changes["cfg"])
            if math.isinf(changes["cfg"]) and self.estimator.finite_cfg_only:
                raise UserError(f"{self.config.method} diverges at an infinite CFG weight; the run keeps its weight")
        if "scene_lr_scale" in changes:
            changes["scene_lr_scale"] = check_lr(changes["scene_lr_scale"], "scene learning-rate scale")
        if changes.get("learned_lr") is not None:
            changes["learned_lr"] = check_lr(changes["learned_lr"], "learned-parameter learning rate")
        for key in ("t_min", "t_max"):
            if changes.get(key) is not None and not 0 <= changes[key] <= 1:
                raise UserError(f"{key} must be a fraction between 0 and 1")
        with self.lock:
            for key, value in changes.items():
                if not hasattr(self.knobs, key):
                    raise UserError(f"unknown knob {key!r}")
                old = getattr(self.knobs, key)
                if old != value:
                    setattr(self.knobs, key, value)
                    if key not in ("paused", "stop"):
                        self.knob_changes.append({"step": self.step, "knob": key, "old": old, "new": value})
        if "paused" in changes:
            (self._resume_event.clear if changes["paused"] else self._resume_event.set)()
        if changes.get("stop"):
            self._resume_event.set()

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
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                for p, e in zip(missing, self.prior.encode_text(missing)):
                    self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def _apply_knobs(self, knobs: Knobs) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lrs.get(g["name"], g["lr"]) * knobs.scene_lr_scale
        if knobs.learned_lr is not None:
            self.estimator.set_lr(knobs.learned_lr)
        sched = self.estimator.config.schedule
        if knobs.t_min is not None:
            sched.min_frac = knobs.t_min
        if knobs.t_max is not None:
            sched.max_frac, sched.anneal = max(knobs.t_max, sched.min_frac), "none"

    def _background(self, n: int) -> torch.Tensor | None:
        if self.config.background == "white":
            return torch.ones(n, 3, device=self.device)
        if self.config.background == "random":
            return torch.rand(n, 3, device=self.device)
        return None

    def render_latents(self, cameras: Cameras) -> tuple[torch.Tensor, RenderOutput | None]:
        if isinstance(self.scene, ImageScene):
            with self.timer.phase("render"):
                return self.scene.latents(self.prior, len(cameras)), None
        with self.timer.phase("render"):
            out = self.scene.render(cameras.to(self.device), self._background(len(cameras)))
        with self.timer.phase("encode"):
            return self.prior.encode_images(out.rgb), out

    def train_step(self) -> dict[str, float]:
        """One iteration of Algorithm 1: theta step (line 5), then the learned parameters' step (line 6)."""
        with self.lock:
            knobs = copy.copy(self.knobs)
        self._apply_knobs(knobs)
        cams = sample_cameras(self.config.batch, self.resolution, ranges=self.camera_range, generator=self.camera_gen)
        text_emb = self.text_embeddings(cams)
        z, out = self.render_latents(cams)
        with self.timer.phase("guidance"):
            g = self.estimator.step(z, text_emb, self.null_emb, knobs.cfg, self.step, cams)
        self.optimizer.zero_grad(set_to_none=True)
        with self.timer.phase("backward"):
            g.loss.backward()
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
        with self.timer.phase("learned_update"):
            update = self.estimator.update(z.detach(), text_emb, self.null_emb, cams) or {}
        with self.timer.phase("densify"):
            dens = self.scene.post_step(self.step, out, self.optimizer)
        if any(g["name"] not in self.base_lrs for g in self.optimizer.param_groups):
            self.base_lrs.update({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        stats = {"step": self.step, "loss": float(g.loss.detach()), "scene_grad_norm": scene_grad, **g.stats}
        stats.update({f"update_{k}" if not k.startswith("update") else k: v for k, v in update.items()})
        stats.update({f"scene_{k}": float(v) for k, v in dens.items()})
        stats.setdefault("cfg", knobs.cfg)  # the estimator's effective weight (annealed, 1 for sds-ref, ...)
        stats["cfg_knob"] = knobs.cfg
        stats["learned_lr"] = self.estimator.lr
        if isinstance(self.estimator, LodsEmbed) and self.estimator.alpha is not None:
            init = self.estimator.alpha_init
            stats["embedding_distance"] = float((self.estimator.alpha.detach() - init).norm() / init.norm())
        self.step += 1
        return stats

    def _guard(self, stats: dict[str, float]) -> str | None:
        bad = [k for k, v in stats.items()
               if isinstance(v, float) and not math.isfinite(v) and k not in ("cfg", "cfg_knob")]
        if bad:
            return f"diverged at step {self.step}: {', '.join(bad)} became NaN or infinite"
        for p in self.scene.parameters():
            if not torch.isfinite(p).all():
                return f"diverged at step {self.step}: the scene's parameters became NaN or infinite"
        norms = [h["scene_grad_norm"] for h in self.history[-50:]]
        if len(norms) >= 20:
            med = float(np.median(norms))
            if med > 0 and stats["scene_grad_norm"] > self.config.max_grad_norm_jump * med:
                return f"diverged at step {self.step}: the gradient norm jumped to {stats['scene_grad_norm']:.3g}"
        return None

    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> str:
        """Train until ``config.steps`` or a stop; returns the final status ("done", "stopped" or "diverged")."""
        self.begin()
        while self.status == "running":
            self._resume_event.wait()
            self.advance(progress)
        return self.finish()

    def begin(self) -> None:
        """Enter the running state (``run`` does this; a caller stepping with ``advance`` does it once)."""
        self.status = "running"
        self._t_last, self._rate_step = time.perf_counter(), self.step

    def advance(self, progress: Callable[[int, int, dict], None] | None = None) -> bool:
        """At most one training step with its bookkeeping (guard, history, snapshot, checkpoint).

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
            self.message = f"{problem}; the last good checkpoint is at step {self.checkpoint_step}"
            return False
        now = time.perf_counter()
        if now - self._t_last > 0.5:
            self._rate = (self.step - self._rate_step) / (now - self._t_last)
            self._t_last, self._rate_step = now, self.step
        stats["it_per_s"] = self._rate
        if self.step % self.config.log_every == 0 or self.step == self.config.steps:
            self.history.append(stats)
        if progress:
            progress(self.step, self.config.steps, stats)
        for listener in self.step_listeners:
            listener(self)
        if self.step % self.config.snapshot_every == 0 or self.step == self.config.steps:
            self.publish()
        if self.out_dir and self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint(self.out_dir)
        if self.step >= self.config.steps:
            self.status = "done"
        return True

    def finish(self) -> str:
        """Final checkpoint (not after a divergence: the last good one stays) and snapshot; returns the status."""
        if self.status == "running":
            self.status = "stopped"
        if self.status != "diverged" and self.out_dir:
            self.save_checkpoint(self.out_dir)
        self.publish()
        return self.status

    def close(self) -> None:
        """Detach what the estimator attached to the prior (LoRA adapters), so that the prior can be reused."""
        self.estimator.close()

    # ------------------------------------------------------------------ snapshots

    @torch.no_grad()
    def render_views(self, cameras: Cameras) -> RenderOutput:
        """Renders (display resolution) of the scene from ``cameras``; the image itself for 2D runs."""
        if isinstance(self.scene, ImageScene):
            return self.scene.render(prior=self.prior)
        # Eval mode (no jitter) and a forked RNG: previews must not change the training run's random stream.
        was_training = self.scene.training
        self.scene.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                return self.scene.render(cameras.to(self.device), self._background(len(cameras)))
        finally:
            self.scene.train(was_training)

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
            return self._publish()

    def _publish(self) -> Snapshot:
        with self.scene_lock:
            out = self.render_views(self.preview_cameras)
            gauss = self.scene.viewer_gaussians() if hasattr(self.scene, "viewer_gaussians") else None
        rgb, alpha = out.rgb.float().cpu(), out.alpha.float().cpu()
        if self.history:
            obj = alpha[:, 0] > 0.5 if not isinstance(self.scene, ImageScene) else metrics.foreground_mask(rgb)
            cs = metrics.color_stats(rgb, obj)
            self.history[-1]["saturation"] = cs["saturation"]
            self.history[-1]["clipped"] = cs["clipped"]
            if not isinstance(self.scene, ImageScene):
                self.history[-1]["floater_score"] = metrics.floater_score(alpha)
        with self.lock:
            self.snapshot = Snapshot(
                step=self.step,
                steps=self.config.steps,
                previews=rgb,
                history=list(self.history),
                knob_changes=list(self.knob_changes),
                gaussians=gauss,
                it_per_s=self._rate,
                status=self.status,
                message=self.message,
            )
            snap = self.snapshot
        if self.on_snapshot:
            self.on_snapshot(snap)
        return snap

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": asdict(self.config),
            "scene": {k: v.detach().cpu() for k, v in self.scene.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "knobs": asdict(self.knobs),
            "knob_changes": self.knob_changes,
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
        path = Path(out_dir) / "checkpoint.pt"
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        self.checkpoint_step = self.step
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        ck = torch.load(Path(path), map_location="cpu", weights_only=False)
        load_scene_state(self.scene, ck["scene"], self.device)
        self.optimizer = torch.optim.Adam(self.scene.param_groups(self.config.lr), eps=1e-15)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.base_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if ck["estimator"]:
            self.estimator.load_state_dict(ck["estimator"])
        knobs = {k: v for k, v in ck["knobs"].items() if k not in ("paused", "stop")}
        self.knobs = Knobs(**{**asdict(self.knobs), **knobs})
        self.knob_changes, self.history = ck["knob_changes"], ck["history"]
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        self.camera_gen.set_state(rng["camera"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = self.checkpoint_step = ck["step"]


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


def build_scene(
    config: RunConfig,
    prior: DiffusionPrior,
    device: torch.device,
    generator: torch.Generator,
    init: torch.Tensor | None = None,
) -> Scene:
    """The scene of ``config.backbone`` on ``device`` (its backend chosen by the device)."""
    try:
        if config.backbone == "image":
            image_cfg = ImageConfig(**config.image)
            return ImageScene(image_cfg, prior.latent_shape, prior.image_size, init=init, generator=generator).to(
                device
            )
        if config.backbone == "gs":
            from lods.scenes.gaussians import GaussianConfig, GaussianScene

            return GaussianScene(GaussianConfig(**config.gaussians), generator=generator).to(device)
        from lods.scenes.hashgrid import HashGridConfig
        from lods.scenes.nerf import NerfConfig, NerfScene

        nerf = dict(config.nerf)
        if isinstance(nerf.get("grid"), dict):
            nerf["grid"] = HashGridConfig(**nerf["grid"])
        return NerfScene(NerfConfig(**nerf), device=device)
    except (TypeError, ValueError) as err:
        raise UserError(f"bad {config.backbone} settings: {err}") from err

